"""What a merge reports while it runs: subclass `MergeEvents` and override what you need.

Every method is a no-op here, so a script that wants nothing passes no events at all, and one
that wants a progress bar overrides `on_plan` (the total) and `on_progress` (each step). The CLI
renders the same calls with rich. Calls come from the thread that called `merge`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import MergePlan


class MergeEvents:
    """No-op callbacks of one merge, in the order they come."""

    def on_ri_start(self, expert: str, steps: int) -> None:
        """RI starts adapting `expert` (RI recipes, experts not yet in the cache)."""

    def on_ri_step(self, expert: str, step: int, l1: float, l2: float) -> None:
        """One RI step done: the expert's own-head loss l1 and the other heads' loss l2."""

    def on_stage(self, name: str | None, index: int, count: int, out: Path) -> None:
        """Multi-stage recipes: stage `index` of `count` (`name` None for the final one) starts,
        writing to `out`; the events of its merge follow."""

    def on_plan(self, plan: MergePlan, total_bytes: int) -> None:
        """The plan is ready, nothing read yet: `on_progress` will add up to `total_bytes`."""

    def on_warning(self, text: str) -> None:
        """Something the user should know that does not stop the merge (e.g. a tensor copied)."""

    def on_progress(self, advance: int) -> None:
        """`advance` more input bytes processed."""

    def on_layer(self, name: str, figures: Mapping[str, float]) -> None:
        """A solved layer's figures (`MergeOptions(report_layers=True)`; WUDI: loss_before/after)."""
