"""RI — Resolving Interference: adapt experts on unlabeled auxiliary data before any merge.

`adapt` and `data` need only torch (+ transformers to build models); the rest is imported on
first use, so scripts such as `scripts/bench_ri.py` run without the merge tool's dependencies.
"""

__all__ = ["RIStatus", "resolve_interference"]


def __getattr__(name: str):
    if name == "RIStatus":  # torch-free (`--dry-run` reports it)
        from .keys import RIStatus

        return RIStatus
    if name in __all__:
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
