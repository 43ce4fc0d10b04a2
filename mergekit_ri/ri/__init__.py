"""RI — Resolving Interference: adapt experts on unlabeled auxiliary data before any merge."""

from .prepare import RIStatus, resolve_interference

__all__ = ["RIStatus", "resolve_interference"]
