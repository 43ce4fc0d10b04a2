"""The recipe: YAML in, a validated `Recipe` out.

We accept mergekit's syntax for everything we share (`base_model`, `models`, `merge_method`,
`parameters` with per-model overrides, filtered values and layer gradients, `dtype`,
`out_dtype`, `tokenizer_source`) so users can bring their mergekit recipes unchanged. Unknown
keys, methods and parameters are refused with the closest valid spelling, before any weight
is read.

A recipe is untrusted input: the loader refuses, as one-line `UserError`s naming the file and the
field, what would otherwise hang, eat memory or quietly give a wrong model — alias bombs, deep
nesting, duplicate keys, non-UTF-8 bytes, non-regular files, NaN/Inf, empty lists, mistyped
parameter values.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import UserError, hint, shown
from .schema import ConfigDict, Field, Record, StrictInt, ValidationError, field_validator, model_validator
from .sizes import SHARD_UNITS, read_size
from .vocab.config import TokenizerConfig, check_chat_template

Scalar = Union[bool, int, float, str]

# a recipe is a few KB: these bounds are far above any real one and far below harm
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000  # values in the recipe once YAML aliases are expanded
MAX_DOCUMENTS = 64  # stages of a multi-stage recipe
MAX_DEPTH = 32  # nesting of mappings and lists (a real recipe nests 5 deep)
INT64 = 2**63  # integers are kept below it: they end up in JSON, hashes and file offsets


class FilteredValue(Record):
    """One entry of a filtered parameter: `value` applies to tensors whose name contains `filter`
    (every tensor when `filter` is left out or is "*", as in mergekit)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


ParamValue = Union[Scalar, list[Scalar], list[FilteredValue]]


def _model_path(value: object, where: str) -> str:
    """mergekit's ModelPath: a string, or {path, revision}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and isinstance(value.get("path"), str):
        revision = value.get("revision")
        if revision is None:
            return value["path"]
        if not isinstance(revision, str):
            raise ValueError(f"{where}.revision must be text")
        return f"{value['path']}@{revision}"
    raise ValueError(f"{where} must be a path, Hub id or {{path: ..., revision: ...}}")


def model_reference(value: object) -> object:
    """mergekit's ModelReference written as a mapping ({model: ..., lora: ...}) → its string form
    `model+lora`, which every other part of ri-merge reads."""
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - {"model", "lora"})
    if unknown:
        extra = " (override_architecture is not supported)" if "override_architecture" in unknown else ""
        raise ValueError(f"a model given as a mapping takes model and lora, not {', '.join(unknown)}{extra}")
    if "model" not in value:
        raise ValueError("a model given as a mapping needs model: (and optionally lora:)")
    model = _model_path(value["model"], "model")
    if value.get("lora") is None:
        return model
    return f"{model}+{_model_path(value['lora'], 'lora')}"


class ModelEntry(Record):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _reference = field_validator("model", mode="before")(model_reference)


class SliceSource(Record):
    """mergekit's InputSliceDefinition: layers [start, end) of one model (see `slices.py`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _reference = field_validator("model", mode="before")(model_reference)


class SliceEntry(Record):
    """mergekit's OutputSliceDefinition: sources of one length merged; slices in sequence stack.
    `base_model` replaces the top-level one for this slice (it must be one of the sources);
    `residual_weight` is accepted and, as in mergekit 0.1.5, has no effect (a plan warning)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _reference = field_validator("base_model", mode="before")(model_reference)


DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}


class ResolveInterference(Record):
    """RI (Resolving Interference): adapt each expert on unlabeled auxiliary data before merging.

    Defaults are the paper's (CLIP ViT scale); tiny models want a larger lr (see README).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    auxiliary_data: (
        str  # a .safetensors file (key "inputs"), a folder of images, a .txt/.jsonl file, or "gaussian"
    )
    steps: int = Field(2500, ge=0, lt=INT64)
    batch_size: int = Field(128, ge=1, lt=INT64)
    lr: float = Field(1.0e-6, ge=0, le=1.0)  # AdamW: a step of ~lr per weight; above 1 only diverges
    weight_decay: float = Field(1.0e-4, ge=0, le=1e30)  # torch's optimiser takes fp32 scalars
    alpha: float = Field(1.0, ge=0, le=1e30)
    heads: str | None = None  # default: the recipe's heads, else auto
    max_length: int = Field(128, ge=1, lt=INT64)  # text auxiliary data: tokens per example
    cache_dir: str | None = None  # default: $RI_MERGE_CACHE or ~/.cache/ri-merge
    devices: list[str] | None = (
        None  # adapt experts in parallel, one worker process per entry (default: every GPU)
    )

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
                raise ValueError(f"unknown device '{shown(name)}'; use cpu, cuda or cuda:N")
        if value is not None and not value:
            raise ValueError("give at least one device, or leave devices out")
        return value


class Distributed(Record):
    """Where the merge's work units run (ours): `ray` is a Ray cluster's address (host:port,
    ray://host:port, auto for the cluster this machine belongs to), or local for Ray's default
    (the cluster RAY_ADDRESS names or one started on this machine, else a new one here)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ray: str = Field(min_length=1)
    cpus_per_task: float = Field(1.0, gt=0, le=1024)
    gpus_per_task: float | None = Field(
        None, ge=0, le=64
    )  # None: 1 when the cluster has GPUs and device allows
    retries: int = Field(3, ge=0, le=100)  # per unit, when its worker or node is lost


class Recipe(Record):
    """A validated recipe.

    `on_nonfinite` (ours) says what the engine does when an expert tensor holds NaN or Inf:
    `error` (default) stops the merge naming the model and tensor, since such a tensor would
    silently poison the merged model; `warn` reports it and merges anyway.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    merge_method: str
    name: str | None = Field(None, min_length=1)  # mergekit-multi: a stage that later stages use as a model
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = Field(None, min_length=1)  # instead of models (mergekit's slices:)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = "base"
    tokenizer: TokenizerConfig | None = None  # mergekit's tokenizer section (vocab/config.py)
    chat_template: str | None = None
    # task heads (classifier experts): kept per expert, never merged
    heads: str | None = None
    heads_default: str | None = None
    resolve_interference: ResolveInterference | None = None
    # ours, on top of mergekit's syntax
    device: str = "auto"
    seed: int = Field(0, ge=-INT64, lt=INT64)
    out_shard_size: Union[int, str] = Field("5GB", validate_default=True)
    on_nonfinite: Literal["error", "warn"] = "error"
    distributed: Distributed | None = None  # how to run, not what to merge: left out of to_yaml
    max_memory: Union[int, str, None] = (
        None  # cap on the tensors a merge holds (memory.py); None: a share of RAM
    )

    _reference = field_validator("base_model", mode="before")(model_reference)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(
                f"unknown dtype '{shown(value)}'{hint(value, DTYPES)}; use one of float32, float16, bfloat16"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return check_chat_template(value)

    @model_validator(mode="after")
    def _one_tokenizer_choice(self) -> Recipe:
        """mergekit refuses both: the section's `source` says what tokenizer_source would."""
        if self.tokenizer is not None and "tokenizer_source" in self.model_fields_set:
            if self.tokenizer_source is not None:
                raise ValueError("give tokenizer_source or a tokenizer section, not both (as in mergekit)")
        return self

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        """mergekit takes exactly one of `models:` and `slices:`."""
        if self.slices is not None and self.models:
            raise ValueError("give models or slices, not both (as in mergekit)")
        if self.slices is None and not self.models:
            raise ValueError("models: missing or empty; list the models to merge (or give slices)")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device '{shown(value)}'; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("max_memory")
    @classmethod
    def _parse_memory(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        from .memory import parse_memory

        try:
            return parse_memory(value, "max_memory")
        except UserError as exc:  # pydantic reports a ValueError with the field's name
            raise ValueError(str(exc).removeprefix("max_memory: ")) from None

    @field_validator("out_shard_size")
    @classmethod
    def _parse_size(cls, value: int | str) -> int:
        return parse_size(value)

    @property
    def shard_size_bytes(self) -> int:
        return int(self.out_shard_size)

    def output_dtype_code(self) -> str | None:
        """The safetensors dtype code of merged float tensors, or None to keep the base's."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def to_yaml(self) -> str:
        fields = self.model_dump(mode="json", exclude_defaults=True, exclude={"distributed"})
        return yaml.safe_dump(fields, sort_keys=False)


def parse_size(value: int | str) -> int:
    """Bytes from 123, mergekit's '500M' or '5B' (five billion), or '2GB', '1GiB'."""
    if isinstance(value, int):
        size = value
    else:
        read = read_size(str(value), SHARD_UNITS)
        if read is None:
            raise ValueError(
                f"cannot read size '{shown(value)}'; write e.g. 5B (mergekit's 5·10^9), 500M, 2GB or 1GiB"
            )
        size = read
    if size <= 0:
        raise ValueError("out_shard_size must be positive")
    if size >= INT64:
        raise ValueError("out_shard_size is larger than any file can be")
    return size


# top-level keys of mergekit's that ri-merge refuses, with the reason (instead of "unknown key")
_MERGEKIT_ONLY = {
    "modules": "modules: (mergekit's per-module recipes for models made of several modules, such as "
    "vision-language models) is not supported: ri-merge has no architecture tables to tell a model's "
    "modules apart; write models: or slices:, which merge the whole model",
}


class _Refused(yaml.YAMLError):
    """A recipe the loader will not build: `message` says why, `mark` where (if known)."""

    def __init__(self, message: str, mark: Any = None) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


def _line(mark: Any) -> str:
    return f" at line {mark.line + 1}" if mark is not None else ""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses duplicate keys, deep nesting and alias bombs.

    Composition never expands an alias (it shares the node), so bounding the expanded size of the
    composed graph before anything is constructed keeps a hostile recipe's cost at its file size.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._checked: set[int] = set()  # mappings whose keys were checked for duplicates

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        """Count nesting while composing: PyYAML's composer recurses and would overflow the stack."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        _expanded_size(node, 0, {}, set())
        return super().construct_document(node)

    def flatten_mapping(self, node: MappingNode) -> None:
        """Refuse a key given twice (YAML keeps the last); keys from `<<` merges may be overridden.

        Checked here, before the first flattening prepends the merged pairs to `node.value`."""
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: construct_mapping says so
                    break
                if first is not key_node.start_mark:
                    raise _Refused(
                        f"duplicate key '{shown(key)}'{_line(key_node.start_mark)} "
                        f"(first given at line {first.line + 1})"
                    )
        super().flatten_mapping(node)


def _expanded_size(
    node: Node, depth: int, sizes: dict[int, tuple[int, int]], active: set[int]
) -> tuple[int, int]:
    """(values, height) of `node` with every alias expanded, memoised on shared nodes; refuses
    cycles, nesting past MAX_DEPTH and more than MAX_NODES values."""
    key = id(node)
    if depth > MAX_DEPTH:
        raise _Refused(f"nested more than {MAX_DEPTH} levels deep (YAML aliases included)", node.start_mark)
    if key in sizes:
        size, height = sizes[key]
    elif key in active:
        raise _Refused("an alias refers to the value that contains it", node.start_mark)
    else:
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        active.add(key)
        size, height = 1, 0
        for child in children:
            child_size, child_height = _expanded_size(child, depth + 1, sizes, active)
            size, height = size + child_size, max(height, child_height + 1)
            _check_bounds(size, depth + height, node)
        active.discard(key)
        sizes[key] = (size, height)
    _check_bounds(size, depth + height, node)
    return size, height


def _check_bounds(size: int, depth: int, node: Node) -> None:
    if size > MAX_NODES:
        raise _Refused(
            f"expands to more than {MAX_NODES} values (YAML aliases included); "
            "refusing what looks like an alias bomb",
            node.start_mark,
        )
    if depth > MAX_DEPTH:
        raise _Refused(f"nested more than {MAX_DEPTH} levels deep (YAML aliases included)", node.start_mark)


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file; every problem is a one-line `UserError`."""
    path = Path(path)
    return parse_recipe_text(_read_text(path), source=str(path))


def _read_text(path: Path) -> str:
    """The file's text: a regular file (a FIFO or device would hang us), bounded, UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: is a directory, not a recipe file")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: is not a regular file (a pipe or device?); give a recipe file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB; is this a recipe?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at line {line}); save the recipe as UTF-8"
        ) from None


def parse_recipe_text(text: str, source: str = "recipe") -> Recipe:
    """YAML text to a validated `Recipe`, with every protection of `load_recipe` but the file's."""
    if not isinstance(text, str):
        raise UserError(f"{source}: a recipe is YAML text, got {type(text).__name__}")
    if len(text) > MAX_RECIPE_BYTES:
        raise UserError(f"{source}: recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB; is this a recipe?")
    return parse_recipe(_load_yaml(text, source), source)


def _documents(loader: _RecipeLoader) -> list[Any]:
    """Every document of the stream (mergekit-multi's stages, separated by `---`), each bounded."""
    documents: list[Any] = []
    while loader.check_data():
        if len(documents) == MAX_DOCUMENTS:
            raise _Refused(f"more than {MAX_DOCUMENTS} YAML documents (stages)")
        documents.append(loader.get_data())
    return documents


def _load_yaml(text: str, source: str, documents: bool = False) -> Any:
    try:
        loader = _RecipeLoader(text)  # checks every character at once
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise UserError(
            f"{source}: character #x{exc.character:04x} at line {line} is not allowed in YAML"
        ) from None
    try:
        return _documents(loader) if documents else loader.get_single_data()
    except _Refused as exc:
        raise UserError(f"{source}: {exc.message}{_line(exc.mark)}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}: malformed YAML{where}: {shown(problem, 200)}") from None
    except (ValueError, OverflowError) as exc:  # a value YAML's resolver took but cannot build
        raise UserError(f"{source}: cannot read a value: {shown(str(exc), 100)}") from None
    except (IndexError, KeyError, TypeError, AttributeError):  # PyYAML's constructors on e.g. `!!float ''`
        raise UserError(
            f"{source}: a tagged value (such as !!float or !!int) cannot be built from its text"
        ) from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def load_recipe_documents(path: Path) -> list[Recipe]:
    """Every recipe of a file: one, or the stages of a multi-stage recipe (`parse_recipe_documents`)."""
    path = Path(path)
    return parse_recipe_documents(_read_text(path), str(path))


def parse_recipe_documents(text: str, source: str = "recipe") -> list[Recipe]:
    """The YAML documents of a recipe, each validated: a multi-stage recipe (mergekit-multi's
    format) is several recipes separated by `---`, each but the final one with a `name`."""
    if not isinstance(text, str):
        raise UserError(f"{source}: a recipe is YAML text, got {type(text).__name__}")
    if len(text) > MAX_RECIPE_BYTES:
        raise UserError(f"{source}: recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB; is this a recipe?")
    documents = [d for d in _load_yaml(text, source, documents=True) if d is not None]
    if len(documents) <= 1:
        return [parse_recipe(documents[0] if documents else None, source)]
    return [parse_recipe(data, f"{source} (document {i + 1})") for i, data in enumerate(documents)]


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """An already parsed recipe (a dict as from `yaml.safe_load`) to a validated `Recipe`."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with merge_method, models, ...")
    _check_tree(data, source)
    _check_keys(data, Recipe, source, "")
    models = data.get("models")
    for i, entry in enumerate(models if isinstance(models, list) else []):
        if isinstance(entry, dict):
            _check_keys(entry, ModelEntry, source, f"models[{i}].")
    if isinstance(data.get("resolve_interference"), dict):
        _check_keys(data["resolve_interference"], ResolveInterference, source, "resolve_interference.")
    if isinstance(data.get("distributed"), dict):
        _check_keys(data["distributed"], Distributed, source, "distributed.")
    _check_parameter_values(data, source)
    from . import slices  # late import: slices builds on the plan, which builds on this module

    slices.check_slice_data(data.get("slices"), source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(shown(p) for p in err["loc"]) or "recipe"
        message = " ".join(err["msg"].removeprefix("Value error, ").split())
        raise UserError(f"{source}: field '{field}': {message}") from None
    from .methods import get_method  # late import: methods import nothing from here at load

    spec = get_method(recipe.merge_method, source)
    if recipe.slices is not None:
        slices.check_slices(recipe, spec, source)
    else:
        spec.check_parameters(recipe, source)
    if spec.needs_base and recipe.slices is None and recipe.base_model is None:
        raise UserError(f"{source}: merge_method '{spec.name}' needs base_model")  # slices: per slice
    return recipe


def _check_keys(data: dict, model: type[Record], source: str, prefix: str) -> None:
    known = set(model.model_fields)
    for key in data:
        if key in known:
            continue
        if key in _MERGEKIT_ONLY and not prefix:
            raise UserError(f"{source}: {_MERGEKIT_ONLY[key]}")
        raise UserError(f"{source}: unknown key '{prefix}{shown(key)}'{hint(key, known)}")


def _path(parts: tuple[Any, ...]) -> str:
    """'parameters.weight[0].value' from ('parameters', 'weight', 0, 'value')."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{shown(part, 40)}"
    return text or "recipe"


def _check_tree(data: Any, source: str) -> None:
    """Bound an already parsed recipe as the YAML loader bounds text (shared values, cycles,
    depth, size) and refuse NaN and Inf wherever they sit."""
    seen: dict[int, int] = {}

    def walk(value: Any, where: tuple[Any, ...], active: frozenset[int]) -> int:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{source}: {_path(where)}: {value} is not a finite number")
        if not isinstance(value, (dict, list, tuple)):
            return 1
        if len(where) > MAX_DEPTH:
            raise UserError(f"{source}: {_path(where[:4])}...: nested more than {MAX_DEPTH} levels deep")
        if id(value) in active:
            raise UserError(f"{source}: {_path(where)}: a value contains itself")
        if id(value) in seen:
            return seen[id(value)]
        items = value.items() if isinstance(value, dict) else enumerate(value)
        size = 1
        for key, item in items:
            size += 1 + walk(item, (*where, key), active | {id(value)})
            if size > MAX_NODES:
                raise UserError(
                    f"{source}: recipe holds more than {MAX_NODES} values (shared ones counted "
                    "each time); refusing what looks like an alias bomb"
                )
        seen[id(value)] = size
        return size

    walk(data, (), frozenset())


def _check_parameter_values(data: dict, source: str) -> None:
    """Each parameter value is a scalar, a non-empty list of numbers (a gradient) or a non-empty
    list of {filter, value} entries: refused here with its field, before pydantic coerces it."""
    sections = [("parameters", data.get("parameters"))]
    models = data.get("models")
    if isinstance(models, list):
        sections += [
            (f"models[{i}].parameters", m.get("parameters"))
            for i, m in enumerate(models)
            if isinstance(m, dict)
        ]
    for where, params in sections:
        check_parameter_section(params, where, source)


def check_parameter_section(params: Any, where: str, source: str) -> None:
    """One `parameters:` mapping (global, per model, per slice or source), named `where`."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise UserError(
            f"{source}: {where}: expected a mapping of parameter names to values, got {_kind(params)}"
        )
    for name, value in params.items():
        field = f"{where}.{shown(name, 40)}"
        if not isinstance(name, str):
            raise UserError(f"{source}: {field}: a parameter name is text, got {_kind(name)}")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, entry in enumerate(value):
                _check_filtered(entry, f"{field}[{i}]", source)
        else:
            _check_leaf(value, field, source)


def _check_filtered(entry: dict, field: str, source: str) -> None:
    if "value" not in entry:
        raise UserError(f"{source}: {field}: a filtered entry needs a 'value'")
    for key in entry:
        if key not in ("filter", "value"):
            raise UserError(
                f"{source}: {field}: unknown key '{shown(key)}'; a filtered entry takes filter and value"
            )
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise UserError(
            f"{source}: {field}.filter: expected text (a substring of tensor names), "
            f"got {_kind(entry['filter'])}"
        )
    _check_leaf(entry["value"], f"{field}.value", source)


def _check_leaf(value: Any, field: str, source: str) -> None:
    """A scalar, or a gradient: a non-empty list of scalars (numbers are interpolated over depth,
    true/false and names stepped; the method checks that they suit the parameter)."""
    if isinstance(value, list):
        if not value:
            raise UserError(f"{source}: {field}: an empty list; give a value or a gradient of numbers")
        for i, point in enumerate(value):
            if not isinstance(point, (bool, int, float, str)):
                raise UserError(
                    f"{source}: {field}[{i}]: a gradient holds numbers (or true/false, names), "
                    f"got {_kind(point)}"
                )
    elif not isinstance(value, (bool, int, float, str)):
        raise UserError(f"{source}: {field}: expected a number, true/false or a name, got {_kind(value)}")


def _kind(value: Any) -> str:
    """How a wrong value is described: its text for scalars, its type for the rest."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"'{shown(value)}'"
    if isinstance(value, (bool, int, float)):
        return shown(value)
    return {dict: "a mapping", list: "a list"}.get(type(value), f"a {type(value).__name__}")
