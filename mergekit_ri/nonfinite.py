"""NaN and ±Inf in the weights being merged: found while streaming, named, refused (or merged
with a warning under `on_nonfinite: warn`).

Merged, a NaN is silently dropped (TIES trims it: |NaN| > t is false) or spread (a sum); either
way the model is wrong and nothing says so. The C merge kernel checks every entry it loads
(`native.WATCH`: an integer test next to the maths, nothing re-read); every other path — the GPU,
the torch fallback, methods that work in fp32 — checks the loaded inputs with torch. Only when
something is found are the inputs read again, to name the file and the first bad entry.
"""

from __future__ import annotations

import threading

import torch

from .errors import UserError
from .io.sources import FLOAT_CODES, ST_DTYPES, TensorReader
from .kernels import native
from .plan import MergePlan, TensorTask


class NonFiniteError(UserError):
    """An input tensor holds NaN or ±Inf: merged, it would yield a silently wrong model."""


def all_finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.numel() == 0 or bool(torch.isfinite(t).all()) for t in tensors)


class NonFiniteGuard:
    """Checks one merge's inputs; `mode` is the recipe's `on_nonfinite` (error | warn)."""

    def __init__(self, plan: MergePlan, reader: TensorReader, mode: str = "error") -> None:
        self.plan, self.reader, self.mode = plan, reader, mode
        self.warnings: list[str] = []
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def native_checks(self, task: TensorTask, device: torch.device) -> bool:
        """Whether the C merge kernel will see every input entry of this tensor (and so check it)."""
        if not (self.plan.method.raw_inputs and device.type == "cpu" and native.library() is not None):
            return False
        codes = {task.out_dtype, *(ref.dtype for ref in task.experts)}
        if task.base is not None:
            codes.add(task.base.dtype)
        return all(ST_DTYPES[code] in native.DTYPES for code in codes)

    def check(self, task: TensorTask, rows: tuple[int, int] | None, *inputs: torch.Tensor | None) -> None:
        """Inputs already loaded (any device, any dtype): name the tensor if one is not finite."""
        if not all_finite(*inputs):
            self.found(task, rows)

    def found(self, task: TensorTask, rows: tuple[int, int] | None) -> None:
        """Some input of `task` (rows `rows`) is not finite: stop naming it, or note it once."""
        message = self._locate(task, rows)
        if self.mode != "warn":
            raise NonFiniteError(
                f"{message}; fix the checkpoint, or set on_nonfinite: warn in the recipe to merge it anyway"
            )
        with self._lock:
            if task.name not in self._named:
                self._named.add(task.name)
                self.warnings.append(f"{message}; merged anyway (on_nonfinite: warn)")

    def _locate(self, task: TensorTask, rows: tuple[int, int] | None) -> str:
        """The first input file holding a bad entry, and that entry's flat index (reads again)."""
        for ref in (task.base, *task.experts):
            if ref is None or ref.dtype not in FLOAT_CODES:
                continue
            values = self.reader.read(ref, rows)
            bad = (~torch.isfinite(values)).reshape(-1).nonzero()
            if bad.numel():
                first = int(bad[0]) + (rows[0] * (ref.numel // ref.shape[0]) if rows else 0)
                return f"{ref.path}: tensor '{task.name}' holds NaN or Inf (first at flat index {first})"
        return f"tensor '{task.name}': NaN or Inf in the merged inputs"
