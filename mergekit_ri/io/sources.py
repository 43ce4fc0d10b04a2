"""Model references → tensor headers and lazy, one-tensor-at-a-time reads.

A reference is a local HF folder (sharded via `model.safetensors.index.json`, or one
`model.safetensors`; failing those, pickled `pytorch_model*.bin` shards, see `pickled.py`), a bare
`.safetensors` or `.bin` file, or a Hub id `org/name[@revision]`; `model+adapter` adds a LoRA
adapter (see `lora.py`). Headers are parsed by hand (8-byte length + JSON), so validation reads no
weight and every damaged file is named. Tensors are read with positioned reads into fresh buffers rather than through
memory maps: mapped pages of an open file count in RSS as the merge moves on, buffers do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..hugepages import HUGE_PAGE, advise_huge_pages
from ..lazy import torch

# safetensors dtype code → bytes per entry and torch dtype name: headers are checked with the
# sizes alone, so that `validate` and `--dry-run` never import torch
ST_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """safetensors dtype code → torch dtype, a dict to its users; torch is imported by the first
    lookup of a dtype (membership and iteration need none)."""

    def __getitem__(self, code: str) -> torch.dtype:
        return getattr(torch, _TORCH_NAMES[code])

    def __contains__(self, code: object) -> bool:
        return code in _TORCH_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(_TORCH_NAMES)

    def __len__(self) -> int:
        return len(_TORCH_NAMES)


ST_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER = 100 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, dtype code, shape, absolute byte range, and its name
    (so that a problem found while reading can name the tensor)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    name: str = ""

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelSource:
    """One input model: its tensors (by name), folder (for config/tokenizer) and fingerprint."""

    reference: str
    label: str
    folder: Path | None
    tensors: dict[str, TensorRef]
    fingerprint: str
    revision: str | None = None
    note: str | None = None  # how the model is read, when it is not plain safetensors (--dry-run)
    extra_files: tuple[Path, ...] = ()  # read besides its weights and folder (a LoRA adapter's)

    def config(self) -> dict | None:
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        return read_json_object(path, "config.json")

    def files(self) -> list[Path]:
        """Every file ri-merge reads of this model: its weights, and its folder's config and
        tokenizer files (what an output folder must never replace)."""
        paths = {ref.path for ref in self.tensors.values()} | set(self.extra_files)
        if self.folder is not None:
            paths.add(self.folder)
        return sorted(paths)


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file that must hold an object: every way it can be wrong is a UserError."""
    require_regular_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: {what} is not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: {what} is nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object, not a {type(data).__name__}")
    return data


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects with a repeated key are refused, as the safetensors library refuses them:
    which of the two values counts is otherwise up to the reader."""
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key '{key}' appears twice")
        data[key] = value
    return data


def require_regular_file(path: Path) -> None:
    """Refuse what `open()` would block on or misread: FIFOs, devices, sockets, folders."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UserError(f"{path}: is {kind}; expected a regular file")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and relative (start, end) of one header entry, typed as the format says."""
    bad = UserError(f"{path}: corrupt safetensors header entry for tensor '{name}'")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise UserError(
            f"{path}: corrupt safetensors header: tensor '{name}' has data_offsets {offsets!r}; "
            "expected [start, end], non-negative"
        )
    if dtype not in ST_DTYPES:
        raise UserError(f"{path}: tensor '{name}' has dtype {dtype}, which ri-merge cannot read")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path: Path) -> tuple[dict[str, TensorRef], bytes]:
    """Parse a safetensors header and check it as strictly as the `safetensors` library: typed
    fields, byte ranges that fit the dtype and shape, in order, without gaps or overlaps, covering
    the data exactly (a negative or overlapping range would read the header, or another tensor,
    as weights)."""
    require_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise UserError(
                    f"{path}: corrupt safetensors header (declared header length {length} "
                    f"does not fit in a {size}-byte file)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise UserError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt safetensors header ({exc})") from None
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    base = 8 + length
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _parse_entry(path, name, info)
        ref = TensorRef(path, dtype, shape, base + start, base + end, name)
        if end < start or ref.nbytes != ref.numel * ST_ITEMSIZE[dtype]:
            raise UserError(
                f"{path}: corrupt safetensors header: tensor '{name}' of shape {list(shape)} "
                f"{dtype} does not fit its byte range"
            )
        refs[name] = ref
    _check_layout(path, refs, base, size)
    return refs, raw


def _check_layout(path: Path, refs: dict[str, TensorRef], base: int, size: int) -> None:
    """Byte ranges back to back from the start of the data (`base`) to the end of the file."""
    position = base
    for ref in sorted(refs.values(), key=lambda r: (r.start, r.end)):
        if ref.start != position:
            what = "overlaps the tensor before it" if ref.start < position else "leaves a gap before it"
            raise UserError(
                f"{path}: corrupt safetensors header: tensor '{ref.name}' at data offset "
                f"{ref.start - base} {what} (expected {position - base})"
            )
        if ref.end > size:
            raise UserError(
                f"{path}: truncated file: tensor '{ref.name}' ends at byte {ref.end} "
                f"but the file has {size} bytes"
            )
        position = ref.end
    if position != size:
        raise UserError(
            f"{path}: corrupt safetensors file: {size - position} bytes after the last tensor "
            "that no header entry covers"
        )


def _index_shards(folder: Path, index: Path, what: str = "safetensors") -> list[Path]:
    """The shard files an index names: relative paths inside `folder` only (a hostile index, or
    Hub repo, must not pull `../x` or `/etc/passwd` into a merge), each a regular file."""
    data = read_json_object(index, f"{what} index")
    weight_map = data.get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) and v for v in weight_map.values())
    ):
        raise UserError(f"{index}: not a valid {what} index (needs a 'weight_map' of tensor → file name)")
    files = sorted(set(weight_map.values()))
    for name in files:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or "\\" in name:
            raise UserError(
                f"{index}: shard '{name}' is outside {folder}; shard paths must be file names in the folder"
            )
        if not (folder / relative).exists():
            raise UserError(f"{index}: lists shard '{name}', which is missing from {folder}")
        require_regular_file(folder / relative)
    return [folder / f for f in files]


def _shard_files(folder: Path) -> list[Path]:
    """A folder's weight files: safetensors when it has them (an index, one file, or any), else
    transformers' pickled `pytorch_model.bin` (an index, or the file)."""
    for index, single, what in (
        ("model.safetensors.index.json", "model.safetensors", "safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model.bin"),
    ):
        path = folder / index
        if path.is_file() or path.is_symlink() or (path.exists() and not path.is_dir()):
            return _index_shards(folder, path, what)
        if (folder / single).exists():
            return [folder / single]
        found = sorted(folder.glob("*.safetensors")) if what == "safetensors" else []
        if found:
            return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(
            f"{folder}: holds pickled weights but no pytorch_model.bin or pytorch_model.bin.index.json "
            "(the names transformers writes); rename them, or convert them to safetensors"
        )
    raise UserError(f"{folder}: no model.safetensors, pytorch_model.bin, index or *.safetensors file found")


def is_pickled(path: Path) -> bool:
    """Weight files that are read through torch's restricted unpickler rather than as safetensors."""
    return path.suffix in (".bin", ".pt", ".pth")


def local_path(reference: str, relative_to: Path | None) -> Path:
    """The reference as a local path: as given (mergekit resolves against the working folder), else
    beside the recipe when it exists there; it may not exist at all (a Hub id)."""
    path = Path(reference).expanduser()
    if (
        not path.exists()
        and not path.is_absolute()
        and relative_to is not None
        and (relative_to / path).exists()
    ):
        return relative_to / path
    return path


def load_source(reference: str, label: str, relative_to: Path | None = None) -> ModelSource:
    """Resolve a model reference and parse all its headers (no weight is read)."""
    path = local_path(reference, relative_to)
    if "+" in reference and not path.exists():
        from .lora import load_lora_source  # `model+adapter`, as mergekit writes a LoRA'd model

        return load_lora_source(reference, label, relative_to)
    revision = None
    if path.exists():
        folder = path if path.is_dir() else None
        files = _shard_files(path) if path.is_dir() else [path]
    elif _HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        path, revision = _download(reference)
        folder, files = path, _shard_files(path)
    else:
        raise UserError(f"model '{label}': path not found: {reference}")
    tensors: dict[str, TensorRef] = {}
    digest = hashlib.sha256()
    for file in files:
        if is_pickled(file):
            from .pickled import read_pickled_header

            refs, raw = read_pickled_header(file)
        else:
            refs, raw = read_header(file)
        digest.update(raw)
        digest.update(str(file.stat().st_size).encode())
        for name, ref in refs.items():
            if name in tensors:
                raise UserError(
                    f"model '{label}': tensor '{name}' appears in both {tensors[name].path.name} and {file.name}"
                )
            tensors[name] = ref
    if not tensors:
        raise UserError(f"model '{label}': {reference} holds no tensors")
    note = None
    if any(is_pickled(f) for f in files):
        note = (
            f"pickled .bin weights ({len(files)} file(s)), read through torch's weights_only unpickler; "
            "slower to plan than safetensors (each shard's pickle is unpickled for its names and shapes)"
        )
    return ModelSource(reference, label, folder, tensors, digest.hexdigest()[:16], revision, note)


HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]
PICKLED_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]


def _download(reference: str) -> tuple[Path, str | None]:
    """Resolve a Hub id to a local snapshot: json, tokenizer files and safetensors (pytorch_model*.bin
    when the repo has no safetensors)."""
    repo_id, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
        if not any(Path(folder).glob("*.safetensors")):  # pickled weights only when there is no other
            folder = snapshot_download(
                repo_id, revision=revision or None, allow_patterns=[*HUB_PATTERNS, *PICKLED_PATTERNS]
            )
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get this model"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(exc).__name__
        raise UserError(f"cannot resolve Hub model '{reference}': {why}") from None
    folder = Path(folder)
    return folder, folder.name  # snapshot folders are named by commit hash


ReadObserver = Callable[[TensorRef, int, memoryview], None]  # the whole tensor's ref, byte offset, bytes


class TensorReader:
    """Positioned reads of whole tensors into fresh CPU buffers; one open fd per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.observe: ReadObserver | None = None  # sees every plain read: e.g. `contenthash.ReadHashes`

    def _fd(self, path: Path) -> int:
        with self._lock:  # reader threads share the descriptors
            fd = self._fds.get(path)
            if fd is None:
                try:  # O_NONBLOCK: a FIFO put in a file's place must not hang the open
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                except OSError as exc:
                    raise UserError(f"{path}: cannot open: {exc.strerror}") from None
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise UserError(f"{path}: is no longer a regular file (changed during the merge?)")
                self._fds[path] = fd
            return fd

    def read(
        self,
        ref: TensorRef,
        rows: tuple[int, int] | None = None,
        out: torch.Tensor | None = None,
        pin: bool = False,
    ) -> torch.Tensor:
        """The whole tensor, or rows [r0, r1) of its first axis (a contiguous byte range).

        With `out` (a contiguous CPU tensor of the right size, e.g. one row of a stacked buffer)
        the bytes land there directly; `pin` reads into page-locked memory for fast, asynchronous
        copies to a GPU. A ref that reads itself (`vocab.remap.RemappedRef`: rows laid out in
        another vocabulary) is handed this reader."""
        if hasattr(ref, "read_rows"):
            return ref.read_rows(self, rows, out, pin)
        if getattr(ref, "lora_b", None) is not None:
            return self._read_lora(ref, rows, out, pin)
        whole, offset = ref, 0
        if rows is not None:
            row_bytes = ref.nbytes // ref.shape[0]
            offset = rows[0] * row_bytes
            ref = TensorRef(
                ref.path,
                ref.dtype,
                (rows[1] - rows[0], *ref.shape[1:]),
                ref.start + rows[0] * row_bytes,
                ref.start + rows[1] * row_bytes,
                ref.name,
            )
        fd = self._fd(ref.path)
        dtype = ST_DTYPES[ref.dtype]
        if out is None and pin and ref.nbytes > 0:
            out = torch.empty(ref.shape, dtype=dtype, pin_memory=True)
        elif out is None and ref.nbytes >= HUGE_PAGE:  # big reads: fresh memory in 2 MiB pages
            out = torch.empty(ref.shape, dtype=dtype)
            advise_huge_pages(out.data_ptr(), ref.nbytes)
        if out is not None:
            if (
                out.dtype != dtype
                or out.numel() != ref.numel
                or not out.is_contiguous()
                or out.device.type != "cpu"
            ):
                raise ValueError(f"read into a buffer of the wrong kind for {ref.path}")
            import ctypes  # here: header checks need none

            buffer = (ctypes.c_char * ref.nbytes).from_address(out.data_ptr()) if ref.nbytes else bytearray()
        else:
            buffer = bytearray(ref.nbytes)
        view, done = memoryview(buffer).cast("B"), 0
        while done < ref.nbytes:
            try:
                got = os.preadv(fd, [view[done:]], ref.start + done)
            except OSError as exc:
                raise UserError(f"{ref.path}: cannot read tensor '{ref.name}': {exc.strerror}") from None
            if got <= 0:
                raise UserError(f"{ref.path}: truncated while reading (file changed during the merge?)")
            done += got
        if self.observe is not None and ref.nbytes:
            self.observe(whole, offset, view)
        if out is not None:
            return out.view(ref.shape)
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(ref.shape)

    def _read_lora(
        self, ref: TensorRef, rows: tuple[int, int] | None, out: torch.Tensor | None, pin: bool
    ) -> torch.Tensor:
        """W + scale·B·A (see `lora.LoraTensorRef`) for the rows asked, in fp32: only those rows of
        the base and of the factor along them are read, so memory is that of the rows."""
        weight = self.read(ref.weight, rows).float()  # type: ignore[attr-defined]
        if ref.lora_a is None:  # type: ignore[attr-defined]  # a bias: b + scale·lora_B.bias
            delta = self.read(ref.lora_b, rows).float()  # type: ignore[attr-defined]
        elif ref.transpose:  # type: ignore[attr-defined]
            lora_a = self.read(ref.lora_a).float()  # type: ignore[attr-defined]
            lora_b = self.read(ref.lora_b).float()  # type: ignore[attr-defined]
            part = lora_a if rows is None else lora_a[:, rows[0] : rows[1]]
            delta = (lora_b @ part).T
        else:
            lora_a = self.read(ref.lora_a).float()  # type: ignore[attr-defined]
            delta = self.read(ref.lora_b, rows).float() @ lora_a  # type: ignore[attr-defined]
        result = weight.add_(delta * ref.scale)  # type: ignore[attr-defined]
        if out is None and pin:
            out = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        if out is not None:
            if out.dtype != torch.float32 or out.numel() != result.numel() or out.device.type != "cpu":
                raise ValueError(f"read into a buffer of the wrong kind for {ref.name}")
            out.view(result.shape).copy_(result)
            return out.view(result.shape)
        return result

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
