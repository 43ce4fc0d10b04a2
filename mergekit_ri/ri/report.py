"""The ξ report of an RI merge: interference of the same merge without RI and with it.

Analysis only (`-v`, `MergeOptions(interference=True)`): it costs a second merge, of the
original experts, into a temporary folder, and is never used to tune anything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..recipe import Recipe


def interference_report(
    original: Recipe, recipe_dir: Path | None, merged: Path, device: str
) -> dict[str, float]:
    """ξ on the auxiliary data of `merged` (RI) and of `original` merged without RI."""
    from ..engine import resolve_device, run_merge
    from ..plan import build_plan
    from .interference import interference
    from .prepare import ri_context

    ctx = ri_context(original, recipe_dir)
    target = resolve_device(device)
    plain = original.model_copy(update={"resolve_interference": None, "heads": ctx.heads})
    with tempfile.TemporaryDirectory(prefix="ri-merge-xi-") as scratch:
        without = Path(scratch) / "without-ri"
        run_merge(build_plan(plain, recipe_dir), without, device=str(target))
        before = interference(without, ctx.experts, ctx.model_class, ctx.aux, target)
    after = interference(merged, ctx.experts, ctx.model_class, ctx.aux, target)
    return {"without_ri": before, "with_ri": after}
