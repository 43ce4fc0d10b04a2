"""sha256 of each output file, computed from the bytes as the shard writer writes them.

The manifest (`--checksums`, `--json`) would otherwise read every finished shard back to hash it.
A file's digest must take its bytes in file order, and the writer puts tensors at their planned
offsets mostly, but not always, in that order. So each file's hash takes a write as soon as it
continues what it has taken so far; a write further on waits, copied, while the copies of all
files together stay within `PENDING_LIMIT`; beyond that it is left in the file. Ranges already in
the file before this writer opened it (a resumed merge's finished units) are read back when the
hash reaches them. At `digests()`, whatever the hash could not take in order is read back from
the file: nothing, when the tensors came in order.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

PENDING_LIMIT = 64 * 2**20  # out-of-order bytes held for all files together, waiting for their turn
CHUNK = 1 << 24  # bytes read back at a time


class _FileHash:
    """One file's running digest: `taken` bytes hashed so far, out-of-order writes waiting."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.digest = hashlib.sha256()
        self.taken = 0
        self.pending: dict[int, bytes] = {}  # position → bytes written there, not yet hashed
        self.on_disk: dict[int, int] = {}  # start → end of ranges to read back when reached

    def read_into_digest(self, start: int, end: int) -> int:
        """Hash bytes [start, end) of the file; the count read."""
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                data = f.read(min(CHUNK, left))
                if not data:
                    raise OSError(f"{self.path}: {left} bytes short of its planned size")
                self.digest.update(data)
                left -= len(data)
        return end - start


class WriteHashes:
    """The running sha256 of each of `files` ((path, final size) pairs), fed by `update` with
    each write's position and bytes; thread-safe. `read_back` counts the bytes it had to read."""

    def __init__(self, files: list[tuple[Path, int]], limit: int | None = None) -> None:
        self._files = [_FileHash(path, size) for path, size in files]
        self._limit = PENDING_LIMIT if limit is None else limit
        self._held = 0  # bytes waiting in `pending`, all files together
        self._lock = threading.Lock()
        self.read_back = 0

    def on_disk(self, index: int, start: int, end: int) -> None:
        """Bytes [start, end) of file `index` are in the file already and will not be written."""
        if end > start:
            with self._lock:
                self._files[index].on_disk[start] = end
                self._advance(self._files[index])

    def update(self, index: int, position: int, data: memoryview | bytes) -> None:
        """File `index` got `data` at `position`."""
        if not len(data):
            return
        with self._lock:
            file = self._files[index]
            if position == file.taken:
                file.digest.update(data)
                file.taken += len(data)
                self._advance(file)
            elif position > file.taken and self._held + len(data) <= self._limit:
                file.pending[position] = bytes(data)
                self._held += len(data)
            # else: left in the file, read back in digests() (or a rewrite of hashed bytes: the
            # writer never writes a byte twice)

    def _advance(self, file: _FileHash) -> None:
        """Take the waiting writes and on-disk ranges that now continue the hash."""
        while True:
            if file.taken in file.pending:
                data = file.pending.pop(file.taken)
                self._held -= len(data)
                file.digest.update(data)
                file.taken += len(data)
            elif file.taken in file.on_disk:
                end = file.on_disk.pop(file.taken)
                self.read_back += file.read_into_digest(file.taken, end)
                file.taken = end
            else:
                return

    def digests(self) -> dict[Path, str]:
        """Every file's sha256, once all writes are done: what the hash could not take in order
        is read back from the file (waiting copies are used where they fit)."""
        out: dict[Path, str] = {}
        with self._lock:
            for file in self._files:
                while file.taken < file.size:
                    self._advance(file)
                    if file.taken >= file.size:
                        break
                    ahead = [p for p in (*file.pending, *file.on_disk) if p > file.taken]
                    end = min([file.size, *ahead])
                    self.read_back += file.read_into_digest(file.taken, end)
                    file.taken = end
                out[file.path] = file.digest.hexdigest()
                self._held -= sum(len(d) for d in file.pending.values())
                file.pending.clear()
        return out
