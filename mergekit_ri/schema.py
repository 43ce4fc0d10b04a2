"""Typed records for the recipe: the part of pydantic's model API the recipe uses, in plain Python.

Why not pydantic itself: importing it and building the recipe's eleven models took ~0.2 s, two
thirds of `ri-merge validate` and `--dry-run`, for a schema this small. The records keep
pydantic's names and meaning — `model_validate`, `model_copy`, `model_dump`, `model_fields`,
`model_fields_set`, `Field(ge=, lt=, min_length=, default_factory=)`, `field_validator`,
`model_validator`, `ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)` — and its lax
coercions (an int field takes 5.0 and "5", a float field takes 1, a union takes the member the
value already is), so recipes, the library API and error texts are those of pydantic 2.

What is left out: JSON schemas, aliases, serializers, generics, strict mode as a config, and
`extra` other than "forbid".
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin

__all__ = [
    "ConfigDict",
    "Field",
    "Record",
    "StrictInt",
    "ValidationError",
    "field_validator",
    "model_validator",
]

Loc = tuple[Any, ...]


class ValidationError(ValueError):
    """The first problem found in a value: where (`loc`, field names and list indices) and what."""

    def __init__(self, loc: Loc, msg: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc)) or 'value'}: {msg}")
        self.loc, self.msg = tuple(loc), msg

    def errors(self) -> list[dict[str, Any]]:
        """pydantic's shape: a list of {loc, msg}; here always one, the first found."""
        return [{"loc": self.loc, "msg": self.msg}]


class _Strict:
    """`Annotated` marker: no coercion (an int is an int, not 5.0, "5" or True)."""

    def __repr__(self) -> str:
        return "Strict"


STRICT = _Strict()
StrictInt = typing.Annotated[int, STRICT]

_MISSING: Any = object()


@dataclass(frozen=True)
class FieldInfo:
    """A field's default and bounds; `annotation` is filled in when the record is first used."""

    default: Any = _MISSING
    default_factory: Callable[[], Any] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    validate_default: bool = False

    @property
    def required(self) -> bool:
        return self.default is _MISSING and self.default_factory is None

    def get_default(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default


def Field(  # noqa: N802 - pydantic's name
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    min_length: int | None = None,
    validate_default: bool = False,
) -> Any:
    return FieldInfo(default, default_factory, ge, gt, le, lt, min_length, validate_default)


def ConfigDict(**settings: Any) -> dict[str, Any]:  # noqa: N802 - pydantic's name
    """The record's settings: extra ("forbid"), allow_inf_nan (True) and frozen (False)."""
    unknown = set(settings) - {"extra", "allow_inf_nan", "frozen"}
    if unknown or settings.get("extra", "forbid") != "forbid":
        raise TypeError(f"unsupported record settings: {sorted(unknown) or settings['extra']}")
    return settings


@dataclass(frozen=True)
class _Validator:
    """A function checking (and possibly changing) one or more fields, or the whole record."""

    func: Any
    fields: tuple[str, ...]
    mode: str  # "before" / "after" for fields; "model" for the whole record, after its fields

    def call(self, owner: type, value: Any) -> Any:
        func = self.func.__get__(None, owner) if isinstance(self.func, classmethod) else self.func
        return func(value)


def field_validator(*fields: str, mode: Literal["before", "after"] = "after") -> Callable[[Any], Any]:
    """`before` sees the value as given, `after` the value of the field's type; raise ValueError."""
    return lambda func: _Validator(func, fields, mode)


def model_validator(mode: Literal["after"] = "after") -> Callable[[Any], Any]:
    """Checks the whole record once its fields are valid; returns the record."""
    return lambda func: _Validator(func, (), "model")


class Record:
    """A validated record: construct with keywords or `model_validate(mapping)`."""

    __slots__ = ("__dict__", "_fields_set")  # the fields live in __dict__, which is compared and dumped

    model_config: ClassVar[dict[str, Any]] = {}
    model_fields: ClassVar[dict[str, FieldInfo]] = {}
    _validators: ClassVar[tuple[_Validator, ...]] = ()
    _types: ClassVar[dict[str, Any] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = dict(cls.model_fields)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if name.startswith("_") or "ClassVar" in str(annotation):
                continue
            value = cls.__dict__.get(name, _MISSING)
            fields[name] = value if isinstance(value, FieldInfo) else FieldInfo(default=value)
            if name in cls.__dict__:
                delattr(cls, name)  # the instance's value, not the class default, is what is read
        cls.model_fields = fields
        cls._validators = cls._validators + tuple(
            v for v in cls.__dict__.values() if isinstance(v, _Validator)
        )
        cls._types = None

    # ---------------------------------------------------------------- construction

    def __init__(self, **data: Any) -> None:
        type(self)._fill(self, data, ())

    @classmethod
    def model_validate(cls, data: Any) -> Any:
        """`data` as this record: a record of this type as it is, a mapping validated."""
        return _as_record(cls, data, ())

    @classmethod
    def _fill(cls, record: Record, data: dict[str, Any], loc: Loc) -> None:
        hints = cls._field_types()
        settings = cls.model_config
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            where = (*loc, name)
            if name in data:
                value = data[name]
                for v in cls._validators:
                    if v.mode == "before" and name in v.fields:
                        value = _run(v, cls, value, where)
            elif info.required:
                raise ValidationError(where, "Field required")
            else:
                value = info.get_default()
                if not info.validate_default:
                    values[name] = value
                    continue
            value = _check(hints[name], value, where, settings, False)
            if value is not None:
                _check_bounds(info, value, where)
            for v in cls._validators:
                if v.mode == "after" and name in v.fields:
                    value = _run(v, cls, value, where)
            values[name] = value
        for key in data:
            if key not in cls.model_fields:
                raise ValidationError((*loc, key), "Extra inputs are not permitted")
        object.__setattr__(record, "__dict__", values)
        object.__setattr__(record, "_fields_set", frozenset(k for k in data if k in cls.model_fields))
        for v in cls._validators:
            if v.mode == "model":
                _run(v, cls, record, loc)

    @classmethod
    def _field_types(cls) -> dict[str, Any]:
        if cls._types is None:  # each subclass starts with its own None (__init_subclass__)
            hints = typing.get_type_hints(cls, include_extras=True)
            cls._types = {name: hints[name] for name in cls.model_fields}
        return cls._types  # type: ignore[return-value]

    # ---------------------------------------------------------------- pydantic's model API

    @property
    def model_fields_set(self) -> frozenset[str]:
        """The fields the input named (a default taken is not among them)."""
        return self._fields_set

    def model_copy(self, update: dict[str, Any] | None = None) -> Any:
        """A shallow copy with `update` applied as given (not validated, as in pydantic)."""
        copy = object.__new__(type(self))
        object.__setattr__(copy, "__dict__", {**self.__dict__, **(update or {})})
        object.__setattr__(copy, "_fields_set", self._fields_set | set(update or {}))
        return copy

    def model_dump(
        self, *, mode: str = "python", exclude_defaults: bool = False, exclude: Any = None
    ) -> dict[str, Any]:
        """The fields as plain values (mode="json": tuples as lists), records as mappings."""
        out = {}
        for name, info in self.model_fields.items():
            if exclude and name in exclude:
                continue
            value = self.__dict__[name]
            if exclude_defaults and not info.required and value == info.get_default():
                continue
            out[name] = _dump(value, mode, exclude_defaults)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        if self.model_config.get("frozen"):
            raise TypeError(f"{type(self).__name__} is frozen: use model_copy(update=...)")
        if name not in self.model_fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        self.__dict__[name] = value
        object.__setattr__(self, "_fields_set", self._fields_set | {name})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        if not self.model_config.get("frozen"):
            raise TypeError(f"unhashable type: '{type(self).__name__}'")
        return hash((type(self), *(_hashable(v) for v in self.__dict__.values())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"

    def __getstate__(self) -> dict[str, Any]:
        return {"fields": self.__dict__, "set": self._fields_set}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "__dict__", state["fields"])
        object.__setattr__(self, "_fields_set", state["set"])


def _run(validator: _Validator, owner: type, value: Any, loc: Loc) -> Any:
    try:
        return validator.call(owner, value)
    except ValidationError:
        raise
    except (ValueError, AssertionError) as exc:
        raise ValidationError(loc, f"Value error, {exc}") from None


def _as_record(cls: type[Record], value: Any, loc: Loc) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValidationError(loc, f"Input should be a valid dictionary or instance of {cls.__name__}")
    record = object.__new__(cls)
    cls._fill(record, value, loc)
    return record


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _dump(value: Any, mode: str, exclude_defaults: bool) -> Any:
    if isinstance(value, Record):
        return value.model_dump(mode=mode, exclude_defaults=exclude_defaults)
    if isinstance(value, dict):
        return {k: _dump(v, mode, exclude_defaults) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_dump(v, mode, exclude_defaults) for v in value]
        return items if mode == "json" or isinstance(value, list) else tuple(items)
    return value


# ---------------------------------------------------------------- values against types

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}
_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _check(tp: Any, value: Any, loc: Loc, settings: dict[str, Any], strict: bool) -> Any:
    """`value` as type `tp` (pydantic's lax mode unless `strict`), or ValidationError at `loc`."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        return _check(base, value, loc, settings, strict or any(m is STRICT for m in meta))
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise ValidationError(loc, "Input should be None")
    if origin is Union or origin is types.UnionType:
        return _check_union(get_args(tp), value, loc, settings, strict)
    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ValidationError(loc, f"Input should be {_or([repr(c) for c in choices])}")
    if origin is list:
        if not isinstance(value, list) and (strict or not isinstance(value, tuple)):
            raise ValidationError(loc, "Input should be a valid list")
        (item,) = get_args(tp)
        return [_check(item, v, (*loc, i), settings, strict) for i, v in enumerate(value)]
    if origin is tuple:
        return _check_tuple(get_args(tp), value, loc, settings, strict)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValidationError(loc, "Input should be a valid dictionary")
        key_type, value_type = get_args(tp)
        return {
            _check(key_type, k, (*loc, k), settings, strict): _check(
                value_type, v, (*loc, k), settings, strict
            )
            for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, Record):
        return _as_record(tp, value, loc)
    if tp in _SCALARS:
        return _SCALARS[tp](value, loc, settings, strict)
    raise TypeError(f"{tp!r} is not a type records support")


def _check_union(
    members: tuple[Any, ...], value: Any, loc: Loc, settings: dict[str, Any], strict: bool
) -> Any:
    """pydantic's smart mode: the first member the value already is, else the first that takes it."""
    for member in members:
        try:
            return _check(member, value, loc, settings, True)
        except ValidationError:
            continue
    if strict:
        raise ValidationError(loc, f"Input should be {_or([_describe(m) for m in members])}")
    errors: list[tuple[Any, ValidationError]] = []
    for member in members:
        try:
            return _check(member, value, loc, settings, False)
        except ValidationError as exc:
            errors.append((member, exc))
    if len([m for m in members if m is not type(None)]) == 1:
        raise next(exc for m, exc in errors if m is not type(None))  # Optional[X]: X's own message
    alike = [exc for m, exc in errors if _same_kind(m, value)]
    for exc in alike:  # a mapping refused by a record's fields rather than by its `kind:`
        if not exc.msg.startswith("Input should be '"):
            raise exc
    if alike:
        raise alike[0]
    raise ValidationError(loc, f"Input should be {_or([_describe(m) for m in members])}")


def _same_kind(tp: Any, value: Any) -> bool:
    """Whether `value` is the kind of thing `tp` describes: a mapping, a list or a scalar."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _same_kind(get_args(tp)[0], value)
    if isinstance(value, dict):
        return origin is dict or (isinstance(tp, type) and issubclass(tp, Record))
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return tp in _SCALARS or origin is Literal


def _check_tuple(
    items: tuple[Any, ...], value: Any, loc: Loc, settings: dict[str, Any], strict: bool
) -> tuple:
    if not isinstance(value, tuple) and (strict or not isinstance(value, list)):
        raise ValidationError(loc, "Input should be a valid tuple")
    if len(value) > len(items):
        raise ValidationError(
            loc, f"Tuple should have at most {len(items)} items after validation, not {len(value)}"
        )
    if len(value) < len(items):
        raise ValidationError((*loc, len(value)), "Field required")
    return tuple(_check(t, v, (*loc, i), settings, strict) for i, (t, v) in enumerate(zip(items, value)))


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _describe(get_args(tp)[0])
    if tp is type(None):
        return "null"
    if origin is list:
        return "a list"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Record)):
        return "a mapping"
    if origin is Literal:
        return _or([repr(c) for c in get_args(tp)])
    name = _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _check_str(value: Any, loc: Loc, settings: dict[str, Any], strict: bool) -> str:
    if isinstance(value, str):
        return value
    if not strict and isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise ValidationError(
                loc, "Input should be a valid string, unable to parse raw data as a unicode string"
            ) from None
    raise ValidationError(loc, "Input should be a valid string")


def _check_bool(value: Any, loc: Loc, settings: dict[str, Any], strict: bool) -> bool:
    if isinstance(value, bool):
        return value
    if strict:
        raise ValidationError(loc, "Input should be a valid boolean")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    unreadable = ", unable to interpret input" if isinstance(value, (str, int, float)) else ""
    raise ValidationError(loc, f"Input should be a valid boolean{unreadable}")


def _check_int(value: Any, loc: Loc, settings: dict[str, Any], strict: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if strict:
        raise ValidationError(loc, "Input should be a valid integer")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(loc, "Input should be a finite number")
        if value != int(value):
            raise ValidationError(loc, "Input should be a valid integer, got a number with a fractional part")
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValidationError(
                loc, "Input should be a valid integer, unable to parse string as an integer"
            ) from None
    raise ValidationError(loc, "Input should be a valid integer")


def _check_float(value: Any, loc: Loc, settings: dict[str, Any], strict: bool) -> float:
    if isinstance(value, bool):
        if strict:
            raise ValidationError(loc, "Input should be a valid number")
        number = float(value)
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and not strict:
        try:
            number = float(value.strip())
        except ValueError:
            raise ValidationError(
                loc, "Input should be a valid number, unable to parse string as a number"
            ) from None
    else:
        raise ValidationError(loc, "Input should be a valid number")
    if not math.isfinite(number) and not settings.get("allow_inf_nan", True):
        raise ValidationError(loc, "Input should be a finite number")
    return number


_SCALARS: dict[Any, Callable[[Any, Loc, dict[str, Any], bool], Any]] = {
    str: _check_str,
    bool: _check_bool,
    int: _check_int,
    float: _check_float,
}


def _check_bounds(info: FieldInfo, value: Any, loc: Loc) -> None:
    """pydantic's constraint messages: ge/gt/le/lt on numbers, min_length on text and lists."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for bound, test, words in (
            (info.gt, lambda b: value > b, "greater than"),
            (info.ge, lambda b: value >= b, "greater than or equal to"),
            (info.lt, lambda b: value < b, "less than"),
            (info.le, lambda b: value <= b, "less than or equal to"),
        ):
            if bound is not None and not test(bound):
                raise ValidationError(loc, f"Input should be {words} {bound}")
    if info.min_length is not None and isinstance(value, (str, list)) and len(value) < info.min_length:
        if isinstance(value, str):
            unit = "character" if info.min_length == 1 else "characters"
            raise ValidationError(loc, f"String should have at least {info.min_length} {unit}")
        unit = "item" if info.min_length == 1 else "items"
        raise ValidationError(
            loc, f"List should have at least {info.min_length} {unit} after validation, not {len(value)}"
        )
