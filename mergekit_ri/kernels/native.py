"""Fused CPU kernels (`native.c`), compiled on first use and loaded with ctypes.

The torch path makes half a dozen passes over N fp32 copies of each block; the C kernels read
every input once and write the result once, with the very same fp32 operations (tested bit for
bit against `blocked`). They are optional: without a C compiler, on an unsupported dtype, or with
RI_MERGE_KERNELS=torch, the torch kernels run instead. The shared library is built once per
machine into the user's cache folder (`$XDG_CACHE_HOME/mergekit-ri`, ~0.5 s with gcc), named by
the hash of the source, the flags and the CPU's features, and renamed into place atomically so
that concurrent merges never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..hugepages import advise_huge_pages
from .blocked import column, float_below, rescale_factor, safe_divisor
from .parallel import run_blocks, workers
from .rng import keep_threshold

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MODE_SUM, MODE_TIES, MODE_DARE = 0, 1, 2
DARE_SKIP = 0xFFFFFFFF
BLOCK = 1 << 19  # entries per call: big enough that ctypes' ~20 µs per call is noise
UNDECIDED = 1024  # room for undecided entries per call (at least; 1/16 of the block) before a rerun

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class Params(ctypes.Structure):
    """Mirror of `Params` in native.c (natural alignment on both sides)."""

    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "mode",
            "elect",
            "normalize",
            "unit",
            "clamp_count",
            "subtract_base",
            "rescale",
            "base_dtype",
            "expert_dtype",
            "out_dtype",
            "count",
            "pad",
        )
    ] + [
        ("expert_stride", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("lam", ctypes.c_float),
        ("divisor", ctypes.c_float),
        ("out_scale", ctypes.c_float),
        ("pad2", ctypes.c_float),
        ("weights", ctypes.c_void_p),
        ("below", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("keep_below", ctypes.c_void_p),
        ("inverse", ctypes.c_void_p),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mergekit-ri" / "native"


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's flags, so a shared cache never hands a library
    built for another CPU to this one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, flags: list[str]) -> Path:
    """The cached library, compiled first if needed; into a temporary folder (once per process)
    where the cache cannot be written (a read-only home)."""
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(flags).encode(),
        compiler.encode(),
        _cpu_features().encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
    name = f"native-{digest.hexdigest()[:16]}.so"
    target: Path | None = _cache_dir() / name
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=target.parent))
    except OSError:
        target, folder = None, Path(tempfile.mkdtemp(prefix="mergekit-ri-native-"))
    built = folder / name
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise OSError(f"{Path(compiler).name} {' '.join(flags)} failed: {detail}")
        if target is None:
            return built  # stays in the temporary folder: it is loaded from there
        os.replace(built, target)  # atomic: a concurrent merge loads this file or its own, never half of one
    finally:
        if target is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return target


def _compile(compiler: str) -> Path:
    """Built for this CPU, or portably where the compiler knows no -march=native."""
    try:
        return _build(compiler, FLAGS)
    except OSError:
        return _build(compiler, [f for f in FLAGS if f != "-march=native"])


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (and `failure()` says why) where they cannot be used."""
    global _library, _failure
    if os.environ.get("RI_MERGE_KERNELS", "auto") == "torch":
        return None
    with _lock:
        if _library is None and _failure is None:
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            try:
                if compiler is None:
                    raise FileNotFoundError("no C compiler (cc/gcc) on PATH")
                lib = ctypes.CDLL(str(_compile(compiler)))
                lib.ri_merge.restype = ctypes.c_int64
                lib.ri_merge.argtypes = (
                    [ctypes.POINTER(Params)]
                    + [ctypes.c_void_p] * 3
                    + [ctypes.c_int64] * 2
                    + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                )
                lib.ri_band.restype = ctypes.c_int
                lib.ri_band.argtypes = (
                    [ctypes.POINTER(Params), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                    + [ctypes.c_void_p] * 3
                    + [ctypes.c_int64]
                    + [ctypes.c_void_p] * 2
                )
                lib.ri_histogram.restype = ctypes.c_int
                lib.ri_histogram.argtypes = [
                    ctypes.POINTER(Params),
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                ]
                lib.ri_kth_largest.restype = ctypes.c_float
                lib.ri_kth_largest.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                _library = lib
            except (OSError, subprocess.SubprocessError) as exc:
                _failure = f"{type(exc).__name__}: {exc}"
        return _library


def failure() -> str | None:
    return _failure


def describe() -> str:
    """One line for `-v`: which CPU kernels run, and why not the C ones."""
    if os.environ.get("RI_MERGE_KERNELS", "auto") == "torch":
        return "torch (RI_MERGE_KERNELS=torch)"
    lib = library()
    return f"C ({lib._name})" if lib is not None else f"torch (no C kernels: {_failure})"


def usable(device: torch.device, *tensors: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the C kernels can merge these CPU tensors (dtypes they know, unit-stride rows)."""
    if device.type != "cpu" or (out_dtype is not None and out_dtype not in DTYPES):
        return False
    for t in tensors:
        if t is not None and (t.dtype not in DTYPES or (t.numel() and t.stride(-1) != 1)):
            return False
    return library() is not None


def _spans(numel: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `step` entries covering a tensor: one kernel call each."""
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


def _floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _uint32(values: list[int]) -> torch.Tensor:
    """uint32 values in an int32 tensor (same bits), for C's uint32_t arrays."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def _params(
    experts: torch.Tensor,
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    mode: int,
    elect: bool,
    weights: list[float],
    lam: float,
    normalize: bool,
    divisor: float = 1.0,
    out_scale: float = 1.0,
    below: list[float] | None = None,
    keys: list[tuple[int, int]] | None = None,
    densities: list[float] | None = None,
    rescale: bool = False,
    offset: int = 0,
) -> tuple[Params, list]:
    """The C struct and the tensors its pointers point into (kept alive by the caller)."""
    count = experts.shape[0]
    weight_t = _floats(weights)
    below_t = _floats(below if below is not None else [0.0] * count)
    keeps = densities if densities is not None else [1.0] * count
    key_t = _uint32([k for pair in (keys or [(0, 0)] * count) for k in pair])
    keep_t = _uint32([DARE_SKIP if d >= 1.0 else keep_threshold(d) for d in keeps])
    inverse_t = _floats([rescale_factor(d) if 0 < d < 1.0 else 0.0 for d in keeps])
    p = Params(
        mode=mode,
        elect=int(elect),
        normalize=int(normalize),
        unit=int(all(w == 1.0 for w in weights)),
        clamp_count=int(all(w == 1.0 for w in weights) or min(weights) >= 1e-8),
        subtract_base=int(base is not None),
        rescale=int(rescale),
        base_dtype=DTYPES[base.dtype] if base is not None else 0,
        expert_dtype=DTYPES[experts.dtype],
        out_dtype=DTYPES[out_dtype],
        count=count,
        expert_stride=experts.stride(0) if count > 1 else 0,
        offset=offset,
        lam=lam,
        divisor=divisor,
        out_scale=out_scale,
        weights=weight_t.data_ptr(),
        below=below_t.data_ptr(),
        keys=key_t.data_ptr(),
        keep_below=keep_t.data_ptr(),
        inverse=inverse_t.data_ptr(),
    )
    return p, [weight_t, below_t, key_t, keep_t, inverse_t]


def _input_params(base: torch.Tensor, experts: torch.Tensor) -> tuple[Params, list]:
    """The struct for the kernels that only read inputs (band, histograms): dtypes and strides."""
    return _params(
        experts,
        base,
        torch.float32,
        mode=MODE_SUM,
        elect=False,
        weights=[1.0] * experts.shape[0],
        lam=1.0,
        normalize=False,
    )


def merge(
    base: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    mode: int,
    elect: bool,
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
    thresholds: list[float] | None = None,
    keys: list[tuple[int, int]] | None = None,
    densities: list[float] | None = None,
    rescale: bool = True,
    offset: int = 0,
    out_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """One fused pass over flat base [n] (None: linear, no base) and experts [N, n], in blocks over
    the kernel threads; the arguments are `fused.fused_merge`'s, plus `out` to write into.
    Returns (merged [n], Σ sign of the elected sums, indices of the undecided entries, their values
    merged with γ = −1 in fp32): see `Election`; if the tensor's majority turns out negative the
    caller writes those values at those indices, with no re-read."""
    lib = library()
    assert lib is not None
    numel = experts.shape[1]
    if mode == MODE_DARE and offset + numel > 1 << 32:
        raise ValueError("tensors of more than 2^32 entries are not supported by the DARE generator")
    if out is None:
        out = torch.empty(numel, dtype=out_dtype)
        advise_huge_pages(out.data_ptr(), numel * out.element_size())
    divisor = float(safe_divisor(column(weights, experts).sum())) if normalize and not elect else 1.0
    params, keep_alive = _params(
        experts,
        base,
        out_dtype,
        mode=mode,
        elect=elect,
        weights=weights,
        lam=lam,
        normalize=normalize,
        divisor=divisor,
        out_scale=out_scale,
        offset=offset,
        below=[float_below(t) for t in thresholds] if thresholds is not None else None,
        keys=keys,
        densities=densities,
        rescale=rescale,
    )
    pointers = (base.data_ptr() if base is not None else None, experts.data_ptr(), out.data_ptr())

    def block(start: int, stop: int) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
        found, bad, cap = ctypes.c_int64(0), ctypes.c_int32(0), max(UNDECIDED, (stop - start) // 16)
        while True:  # a buffer for 1/16 of the block, and a rerun with one big enough if not
            where, minus = torch.empty(cap, dtype=torch.int64), torch.empty(cap, dtype=torch.float32)
            balance = lib.ri_merge(
                ctypes.byref(params),
                *pointers,
                start,
                stop,
                where.data_ptr(),
                minus.data_ptr(),
                cap,
                ctypes.byref(found),
                ctypes.byref(bad),
            )
            if balance == -(1 << 63):
                raise MemoryError("native merge kernel: out of memory")
            if found.value <= cap:
                return balance, where[: found.value], minus[: found.value], bool(bad.value)
            cap = found.value

    results = run_blocks(block, _spans(numel, BLOCK))
    del keep_alive
    WATCH.record(numel, any(r[3] for r in results))
    if not results:
        return out, 0, torch.empty(0, dtype=torch.int64), torch.empty(0)
    return (
        out,
        sum(r[0] for r in results),
        torch.cat([r[1] for r in results]),
        torch.cat([r[2] for r in results]),
    )


class FiniteWatch:
    """What the merge kernel saw of NaN/±Inf in its inputs: it checks every entry it loads (an
    integer OR over each tile, next to the maths), so the engine need not read anything twice.
    The engine merges one tensor at a time: `start` before it, then `entries` (per input) and
    `nonfinite` after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries = 0
        self.nonfinite = False

    def start(self) -> None:
        with self._lock:
            self.entries, self.nonfinite = 0, False

    def record(self, entries: int, nonfinite: bool) -> None:
        with self._lock:
            self.entries += entries
            self.nonfinite = self.nonfinite or nonfinite


WATCH = FiniteWatch()


def task_arithmetic(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`blocked.task_arithmetic`, fused."""
    scale = lam / float(safe_divisor(column(weights, experts).sum())) if normalize else lam
    return merge(
        base,
        experts,
        mode=MODE_SUM,
        elect=False,
        weights=weights,
        lam=scale,
        normalize=False,
        out_dtype=out_dtype,
    )[0]


def weighted_sum(
    experts: torch.Tensor, weights: list[float], normalize: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """`blocked.weighted_sum`, fused."""
    scale = 1.0 / float(safe_divisor(column(weights, experts).sum())) if normalize else 1.0
    return merge(
        None,
        experts,
        mode=MODE_SUM,
        elect=False,
        weights=weights,
        lam=1.0,
        normalize=False,
        out_dtype=out_dtype,
        out_scale=scale,
    )[0]


def band(
    base: torch.Tensor, experts: torch.Tensor, lo: list[float], hi: list[float], limit: int
) -> tuple[list[int], list[torch.Tensor | None]]:
    """The threshold search's counting pass (see `blocked.magnitude_thresholds_source`): per
    expert, the count of |τ_i| >= hi_i and the values in [lo_i, hi_i) (None if more than `limit`)."""
    lib = library()
    assert lib is not None
    count, numel = experts.shape
    params, keep_alive = _input_params(base, experts)
    lo_t, hi_t = _floats(lo), _floats(hi)

    def block(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cap = min(stop - start, limit + 1)
        values = torch.empty((count, cap), dtype=torch.float32)
        above, inside = torch.zeros(count, dtype=torch.int64), torch.zeros(count, dtype=torch.int64)
        if lib.ri_band(
            ctypes.byref(params),
            base.data_ptr(),
            experts.data_ptr(),
            start,
            stop,
            lo_t.data_ptr(),
            hi_t.data_ptr(),
            values.data_ptr(),
            cap,
            above.data_ptr(),
            inside.data_ptr(),
        ):
            raise MemoryError("native band kernel: out of memory")
        # keep what was found, not the block-sized buffer: every block's result waits for the last
        return values[:, : int(inside.max())].clone(), above, inside

    results = run_blocks(block, _spans(numel, BLOCK))
    del keep_alive
    above = [int(sum(int(r[1][i]) for r in results)) for i in range(count)]
    bands: list[torch.Tensor | None] = []
    for i in range(count):
        sizes = [int(r[2][i]) for r in results]
        if sum(sizes) > limit:
            bands.append(None)
        else:
            bands.append(torch.cat([r[0][i, :s] for r, s in zip(results, sizes)] or [torch.empty(0)]))
    return above, bands


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest (1-based) of a 1-D tensor of non-negative values (|τ|), which is left as it
    was (a copy is overwritten): `kthvalue`'s answer in a few linear passes."""
    lib = library()
    assert lib is not None and 1 <= k <= values.numel()
    scratch = values.to(torch.float32, copy=True).contiguous()
    return float(lib.ri_kth_largest(scratch.data_ptr(), scratch.numel(), k))


SKIP_BUCKET = -2


def histograms(base: torch.Tensor, experts: torch.Tensor, buckets: list[int | None] | None) -> torch.Tensor:
    """`select.magnitude_histograms` in C: [N, 65536] counts of |τ_i|'s high 16 bits (buckets None),
    or of the low 16 bits inside bucket[i] (None: that expert skipped)."""
    lib = library()
    assert lib is not None
    count, numel = experts.shape
    params, keep_alive = _input_params(base, experts)
    wanted = torch.tensor(
        [-1] * count if buckets is None else [SKIP_BUCKET if b is None else b for b in buckets],
        dtype=torch.int32,
    )
    per_call = max(1, -(-numel // max(1, workers())))  # one call per worker: one counts array each

    def block(start: int, stop: int) -> torch.Tensor:
        counts = torch.zeros((count, 1 << 16), dtype=torch.int64)
        if lib.ri_histogram(
            ctypes.byref(params),
            base.data_ptr(),
            experts.data_ptr(),
            start,
            stop,
            wanted.data_ptr(),
            counts.data_ptr(),
        ):
            raise MemoryError("native histogram kernel: out of memory")
        return counts

    parts = run_blocks(block, _spans(numel, per_call))
    del keep_alive
    return torch.stack(parts).sum(0) if parts else torch.zeros((count, 1 << 16), dtype=torch.int64)
