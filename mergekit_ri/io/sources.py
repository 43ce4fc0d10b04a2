"""Model references → tensor headers and lazy, one-tensor-at-a-time reads.

A reference is a local HF folder (sharded via `model.safetensors.index.json`, or one
`model.safetensors`), a bare `.safetensors` file, or a Hub id `org/name[@revision]`. Headers
are parsed by hand (8-byte length + JSON), so validation reads no weight and every damaged
file is named. Tensors are read with positioned reads into fresh buffers rather than through
memory maps: mapped pages of an open file count in RSS as the merge moves on, buffers do not.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
TORCH_TO_CODE = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, dtype code, shape, absolute byte range."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

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

    def config(self) -> dict | None:
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read config.json: {exc}") from None


def read_header(path: Path) -> tuple[dict[str, TensorRef], bytes]:
    """Parse a safetensors header and check it against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise UserError(f"{path}: corrupt safetensors header (declared header length {length} "
                                f"does not fit in a {size}-byte file)")
            raw = f.read(length)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt safetensors header ({exc})") from None
    base = 8 + length
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if dtype not in ST_DTYPES:
            raise UserError(f"{path}: tensor '{name}' has dtype {dtype}, which ri-merge cannot read")
        ref = TensorRef(path, dtype, shape, base + int(start), base + int(end))
        if ref.nbytes != ref.numel * ST_DTYPES[dtype].itemsize or ref.nbytes < 0:
            raise UserError(f"{path}: corrupt safetensors header: tensor '{name}' of shape {list(shape)} "
                            f"{dtype} does not fit its byte range")
        if ref.end > size:
            raise UserError(f"{path}: truncated file: tensor '{name}' ends at byte {ref.end} "
                            f"but the file has {size} bytes")
        refs[name] = ref
    return refs, raw


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{index}: lists shard '{missing[0]}', which is missing from {folder}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder}: holds only pickled weights (.bin/.pt); convert them to safetensors first")
    raise UserError(f"{folder}: no model.safetensors, index or *.safetensors file found")


def load_source(reference: str, label: str, relative_to: Path | None = None) -> ModelSource:
    """Resolve a model reference and parse all its headers (no weight is read)."""
    path = Path(reference).expanduser()
    if not path.exists() and not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path  # mergekit resolves against the working folder; we also try the recipe's
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
        refs, raw = read_header(file)
        digest.update(raw)
        digest.update(str(file.stat().st_size).encode())
        for name, ref in refs.items():
            if name in tensors:
                raise UserError(f"model '{label}': tensor '{name}' appears in both {tensors[name].path.name} and {file.name}")
            tensors[name] = ref
    if not tensors:
        raise UserError(f"model '{label}': {reference} holds no tensors")
    return ModelSource(reference, label, folder, tensors, digest.hexdigest()[:16], revision)


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]


def _download(reference: str) -> tuple[Path, str | None]:
    """Resolve a Hub id to a local snapshot (json + safetensors + tokenizer files only)."""
    repo_id, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get this model"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(exc).__name__
        raise UserError(f"cannot resolve Hub model '{reference}': {why}") from None
    folder = Path(folder)
    return folder, folder.name  # snapshot folders are named by commit hash


class TensorReader:
    """Positioned reads of whole tensors into fresh CPU buffers; one open fd per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read(self, ref: TensorRef, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
             pin: bool = False) -> torch.Tensor:
        """The whole tensor, or rows [r0, r1) of its first axis (a contiguous byte range).

        With `out` (a contiguous CPU tensor of the right size, e.g. one row of a stacked buffer)
        the bytes land there directly; `pin` reads into page-locked memory for fast, asynchronous
        copies to a GPU."""
        if rows is not None:
            row_bytes = ref.nbytes // ref.shape[0]
            ref = TensorRef(ref.path, ref.dtype, (rows[1] - rows[0], *ref.shape[1:]),
                            ref.start + rows[0] * row_bytes, ref.start + rows[1] * row_bytes)
        with self._lock:  # reader threads share the descriptors
            fd = self._fds.get(ref.path)
            if fd is None:
                try:
                    fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY)
                except OSError as exc:
                    raise UserError(f"{ref.path}: cannot open: {exc.strerror}") from None
        dtype = ST_DTYPES[ref.dtype]
        if out is None and pin and ref.nbytes > 0:
            out = torch.empty(ref.shape, dtype=dtype, pin_memory=True)
        if out is not None:
            if out.dtype != dtype or out.numel() != ref.numel or not out.is_contiguous() or out.device.type != "cpu":
                raise ValueError(f"read into a buffer of the wrong kind for {ref.path}")
            buffer = (ctypes.c_char * ref.nbytes).from_address(out.data_ptr()) if ref.nbytes else bytearray()
        else:
            buffer = bytearray(ref.nbytes)
        view, done = memoryview(buffer).cast("B"), 0
        while done < ref.nbytes:
            got = os.preadv(fd, [view[done:]], ref.start + done)
            if got <= 0:
                raise UserError(f"{ref.path}: truncated while reading (file changed during the merge?)")
            done += got
        if out is not None:
            return out.view(ref.shape)
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(ref.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
