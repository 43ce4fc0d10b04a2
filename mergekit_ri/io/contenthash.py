"""Content fingerprints of input models: a hash over the tensor bytes the merge read.

A model's header fingerprint (`ModelSource.fingerprint`) covers names, shapes and dtypes; two
checkpoints with the same layout and different weights share it. The content fingerprint covers
the weights themselves:

    sha256 over the model's tensors in name order (Python's `sorted`), each as its UTF-8 name,
    one zero byte, and the 32-byte sha256 of its bytes as stored in its file

(`content_fingerprint` recomputes it from the files). During a merge the reader hands every read
to `ReadHashes`, which hashes each tensor's bytes in file order as they arrive, on the reader
threads, so no byte is read twice for it. A model gets a content fingerprint only when every
one of its tensors was hashed whole that way; otherwise (a resumed merge that kept finished
units, tensors the merge does not read, a LoRA adapter applied while reading, rows read in
another vocabulary's order) it has none, and the card says so.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from .sources import ModelSource, TensorRef, load_source

PENDING_LIMIT = 32 * 2**20  # bytes of reads that came ahead of their turn, held for all tensors together
CHUNK = 1 << 24  # bytes read at a time when recomputing from the files


class _TensorHash:
    def __init__(self, size: int) -> None:
        self.size = size
        self.digest = hashlib.sha256()
        self.taken = 0  # bytes hashed, from the tensor's first
        self.pending: dict[int, bytes] = {}  # offset → bytes read ahead of `taken`
        self.lock = threading.Lock()


class ReadHashes:
    """The sha256 of each tensor's stored bytes, from the reads the reader makes: a read is taken
    where it continues what was hashed so far (re-reads of hashed bytes are skipped); a read
    further on waits, copied, within `PENDING_LIMIT` for all tensors, and is dropped past it
    (a later read of the same bytes can still fill the gap). Thread-safe; hashes on the caller's
    thread, and hashlib lets go of the GIL on big buffers."""

    def __init__(self, limit: int | None = None) -> None:
        self._tensors: dict[tuple[Path, int, int], _TensorHash] = {}
        self._limit = PENDING_LIMIT if limit is None else limit
        self._held = 0
        self._lock = threading.Lock()
        self._known: dict[tuple[Path, int, int], bytes] = {}  # digests hashed by another process

    def add(self, ref: TensorRef, digest: bytes) -> None:
        """A tensor's sha256 as another reader hashed it (a worker process, an interrupted run)."""
        with self._lock:
            self._known[(ref.path, ref.start, ref.end)] = digest

    def __call__(self, ref: TensorRef, offset: int, data: memoryview) -> None:
        """`data` is bytes [offset, offset + len) of tensor `ref` (the whole tensor's ref)."""
        if not data.nbytes or type(ref) is not TensorRef:
            return
        with self._lock:
            key = (ref.path, ref.start, ref.end)
            state = self._tensors.get(key)
            if state is None:
                state = self._tensors[key] = _TensorHash(ref.nbytes)
        with state.lock:
            if offset + data.nbytes <= state.taken:
                return  # read before: hashed already
            if offset > state.taken:
                with self._lock:
                    room = self._held + data.nbytes <= self._limit and offset not in state.pending
                    if room:
                        self._held += data.nbytes
                if room:
                    state.pending[offset] = bytes(data)
                return
            state.digest.update(data[state.taken - offset :])
            state.taken = offset + data.nbytes
            self._drain(state)

    def _drain(self, state: _TensorHash) -> None:
        """Take the waiting reads that now continue the hash; drop those it has passed."""
        while state.pending:
            usable = [o for o in state.pending if o <= state.taken]
            if not usable:
                return
            for offset in usable:
                data = state.pending.pop(offset)
                with self._lock:
                    self._held -= len(data)
                if offset + len(data) > state.taken:
                    state.digest.update(memoryview(data)[state.taken - offset :])
                    state.taken = offset + len(data)

    def digest(self, ref: TensorRef) -> bytes | None:
        """The tensor's sha256, if all of its bytes were read; else None."""
        if type(ref) is not TensorRef:
            return None
        if ref.nbytes == 0:
            return hashlib.sha256().digest()
        if (ref.path, ref.start, ref.end) in self._known:
            return self._known[(ref.path, ref.start, ref.end)]
        state = self._tensors.get((ref.path, ref.start, ref.end))
        if state is None or state.taken < state.size:
            return None
        return state.digest.copy().digest()

    def model(self, source: ModelSource) -> str | None:
        """The model's content fingerprint, if every one of its tensors was read whole and plain
        (as stored); else None."""
        digests = {}
        for name, ref in source.tensors.items():
            digest = self.digest(ref)
            if digest is None:
                return None
            digests[name] = digest
        return combine(digests.items())


def combine(digests: Iterable[tuple[str, bytes]]) -> str:
    """One model's fingerprint from its tensors' (name, 32-byte sha256)."""
    total = hashlib.sha256()
    for name, digest in sorted(digests):
        total.update(name.encode() + b"\0" + digest)
    return total.hexdigest()


def tensor_sha256(ref: TensorRef) -> bytes:
    """sha256 of a tensor's bytes as stored, read from its file a chunk at a time."""
    digest = hashlib.sha256()
    with open(ref.path, "rb") as f:
        f.seek(ref.start)
        left = ref.nbytes
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                raise UserError(f"{ref.path}: truncated while reading tensor '{ref.name}'")
            digest.update(data)
            left -= len(data)
    return digest.digest()


def content_fingerprint(reference: str | Path) -> str:
    """The content fingerprint of a model (a folder, a weights file, or a Hub id in the local
    cache), as a merged model's card lists it for each input the merge read whole."""
    source = load_source(str(reference), "model")
    if any(type(ref) is not TensorRef for ref in source.tensors.values()):
        raise UserError(f"{reference}: a LoRA adapter applied while reading has no content fingerprint")
    return combine((name, tensor_sha256(ref)) for name, ref in source.tensors.items())
