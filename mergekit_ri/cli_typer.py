"""typer's command classes for `ri-merge`, adjusted so that a short command loads no pydantic.

typer (0.2x) turns every parameter's value into its declared type through a pydantic
`TypeAdapter`, built on first use, unless the value is already a bool: importing pydantic and
building the adapters cost ~0.2 s of every `ri-merge validate` and `--dry-run` (two thirds of
them), to turn text into text and a default of 4 into 4. These classes answer the values that
need no conversion — nothing given, text for a text option, a path for a `Path`, a number
already of its type and in range, digits for an int option — as typer's adapters would, and
hand everything else (choices, lists, out-of-range numbers, unreadable paths) to typer itself,
so its error messages are unchanged. On a typer without adapters (before 0.2x, click's types)
they change nothing but the --help flag's default.
"""

import os
import re
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

_UNCHANGED = object()
_INTEGER = re.compile(r"[+-]?\d{1,18}")
# the path options of typer's ParameterInfo with which a Path parameter is plain Path(value)
_PLAIN_PATH = {
    "exists": False,
    "file_okay": True,
    "dir_okay": True,
    "writable": False,
    "readable": True,
    "resolve_path": False,
    "allow_dash": False,
    "path_type": None,
    "parser": None,
}


def _optional_of(annotation: Any) -> Any:
    """X for Optional[X], the annotation itself otherwise."""
    if get_origin(annotation) is Union:
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def plain_value(annotation: Any, info: Any, value: Any) -> Any:
    """`value` as typer's adapter would return it, or `_UNCHANGED` when only typer can say."""
    if getattr(info, "parser", None) is not None or getattr(info, "clamp", False):
        return _UNCHANGED
    kind = _optional_of(annotation)
    if kind is str and isinstance(value, str):
        return value
    if kind is Path and isinstance(value, str):
        if any(getattr(info, name, default) != default for name, default in _PLAIN_PATH.items()):
            return _UNCHANGED
        if os.path.exists(value) and not os.access(value, os.R_OK):
            return _UNCHANGED  # typer says it is not readable
        return Path(value)
    if kind is int and not isinstance(value, bool):
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if isinstance(value, int) and _in_range(value, info):
            return value
    if kind is float and isinstance(value, float) and value == value and abs(value) != float("inf"):
        if _in_range(value, info):
            return value
    return _UNCHANGED


def _in_range(value: float, info: Any) -> bool:
    low, high = getattr(info, "min", None), getattr(info, "max", None)
    return (low is None or value >= low) and (high is None or value <= high)


class _PlainValues:
    """A parameter's coercion: `plain_value` first, typer's own (pydantic) for the rest."""

    def __init__(self, param: Any, typer_runtime: Any) -> None:
        self._param, self._typer_runtime = param, typer_runtime
        descriptor = param.type_descriptor
        self._annotation, self._info = descriptor.annotation, descriptor.parameter_info

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:
            return () if param.multiple or param.nargs == -1 else None  # as typer's own
        plain = plain_value(self._annotation, self._info, value)
        if plain is not _UNCHANGED:
            return plain
        return self._typer_runtime().coerce(value, param=param, ctx=ctx)


def plain_coercion(param: Any) -> None:
    """Give one of typer's parameters `_PlainValues` (where typer has runtime coercion)."""
    typer_runtime = getattr(param, "get_runtime_param", None)
    if typer_runtime is None or not hasattr(param, "type_descriptor"):
        return
    plain = _PlainValues(param, typer_runtime)
    param.get_runtime_param = lambda: plain


class _Adjusted:
    """The --help flag with the default a flag has, False, rather than None (a None flag went
    through pydantic too), and every parameter's plain values answered without pydantic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:  # type: ignore[attr-defined]
            plain_coercion(param)

    def get_help_option(self, ctx: typer.Context) -> Optional[Any]:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None and option.default is None:
            option.default = False
        return option


class Group(_Adjusted, TyperGroup):
    pass


class Command(_Adjusted, TyperCommand):
    pass
