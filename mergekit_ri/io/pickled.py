"""Pickled checkpoints (`pytorch_model*.bin`): names, shapes, dtypes and byte ranges, no weights.

A shard is unpickled once, by PyTorch's restricted unpickler (`torch.load(weights_only=True)`,
which builds only tensors and plain containers: a pickle that asks for anything else — `os.system`,
`open`, any class — is refused before it runs) onto the meta device, so no weight byte is read.
torch.save's zip format stores each storage uncompressed; its byte range in the file is checked
against the zip's own directory, and from then on a `.bin` tensor is a `TensorRef` like a
safetensors one: read with positioned reads, by rows, in bounded memory, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import UserError
from .sources import ST_DTYPES, TensorRef, require_regular_file

TORCH_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def _refused_global(exc: Exception) -> str:
    """The line of torch's weights_only message that says what the pickle asked for."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    return lines[-1].rstrip(".") if lines else type(exc).__name__


def _stored_records(path: Path) -> tuple[dict[int, int], str]:
    """Data offset → size of every uncompressed zip record, and the byte order torch recorded."""
    records: dict[int, int] = {}
    byteorder = "little"
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                if info.filename.endswith("/byteorder") and info.file_size < 16:
                    byteorder = archive.read(info).decode("ascii", "replace")
                if info.compress_type != zipfile.ZIP_STORED:
                    continue
                raw.seek(info.header_offset)
                head = raw.read(_LOCAL_HEADER.size)
                if len(head) < _LOCAL_HEADER.size:
                    continue
                signature, name_length, extra_length = _LOCAL_HEADER.unpack(head)
                if signature == b"PK\x03\x04":
                    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                    records[start] = info.file_size
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: not a readable torch checkpoint ({exc})") from None
    return records, byteorder


def _state_dict(path: Path) -> dict:
    """The shard's state dict on the meta device (only the pickle is read), via torch's
    restricted unpickler; everything that is not a name → tensor mapping is refused."""
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: refused: not torch.save's zip format (a bare pickle, or the legacy format before "
            "PyTorch 1.6); ri-merge never unpickles those: convert it to safetensors"
        )
    try:
        loaded = torch.load(path, weights_only=True, mmap=True, map_location="meta")
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path}: refused: the pickle asks for more than tensors and plain containers "
            f"({_refused_global(exc)}); nothing of it was run"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, ValueError, KeyError ... on damaged zips
        raise UserError(f"{path}: not a readable torch checkpoint ({_refused_global(exc)})") from None
    if isinstance(loaded, dict) and set(loaded) == {"state_dict"} and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]  # as mergekit reads a wrapped checkpoint
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict (name → tensor)")
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: holds a key {name!r} that is not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor")
    return loaded


def read_pickled_header(path: Path) -> tuple[dict[str, TensorRef], bytes]:
    """Every tensor of one `.bin` shard as a file byte range, and bytes for the model's fingerprint."""
    require_regular_file(path)
    state = _state_dict(path)
    records, byteorder = _stored_records(path)
    if byteorder != "little":
        raise UserError(f"{path}: stores {byteorder}-endian tensors; ri-merge reads little-endian ones")
    refs: dict[str, TensorRef] = {}
    for name, tensor in state.items():
        code = TORCH_CODES.get(tensor.dtype)
        if code is None:
            raise UserError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, which ri-merge cannot read")
        shape = tuple(tensor.shape)
        itemsize = tensor.element_size()
        nbytes = tensor.numel() * itemsize
        if nbytes == 0:
            refs[name] = TensorRef(path, code, shape, 0, 0, name)
            continue
        if not tensor.is_contiguous():
            raise UserError(
                f"{path}: tensor '{name}' is stored as a strided view (strides {list(tensor.stride())}); "
                "ri-merge reads contiguous tensors: save the state dict with .contiguous() tensors"
            )
        storage = tensor.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        size = records.get(offset) if isinstance(offset, int) else None
        first = tensor.storage_offset() * itemsize
        if size is None or size != storage.nbytes() or first + nbytes > size:
            raise UserError(
                f"{path}: corrupt torch checkpoint: tensor '{name}' does not lie in a stored record "
                "of the zip (compressed, or its storage size disagrees with the pickle)"
            )
        refs[name] = TensorRef(path, code, shape, offset + first, offset + first + nbytes, name)
    entries = sorted((n, r.dtype, r.shape, r.start, r.end) for n, r in refs.items())
    fingerprint = json.dumps(entries).encode()
    return refs, hashlib.sha256(fingerprint).digest()
