"""The list of files a merge wrote, with sizes and sha256: what a CI job checks before uploading.

The shard files' hashes come from the writer, which hashes their bytes as it writes them
(`io.filehash`); the other files (config, index, card, tokenizer, heads: small) and shards no
writer in this process saw (a distributed merge's) are read back and hashed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 1 << 24  # bytes hashed at a time: big shards are never read whole into memory


@dataclass(frozen=True)
class FileRecord:
    """One written file: its path relative to the output folder ('/'-separated), size, sha256."""

    name: str
    size: int
    sha256: str | None  # None when checksums were not asked for

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(
    folder: Path, checksums: bool = True, known: Mapping[str, str] | None = None
) -> tuple[FileRecord, ...]:
    """Every regular file under `folder`, sorted by name. With `checksums`, the sha256s in `known`
    (by '/'-separated name, hashed as written) are taken as they are; the rest are read and hashed
    on a few threads (hashlib releases the GIL on big buffers, so files hash in parallel)."""
    paths = sorted(
        (p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix()
    )
    known = known or {}

    def digest(path: Path) -> str:
        return known.get(path.relative_to(folder).as_posix()) or file_sha256(path)

    if checksums and paths:
        with ThreadPoolExecutor(min(4, len(paths)), "ri-hash") as pool:
            digests: list[str | None] = list(pool.map(digest, paths))
    else:
        digests = [None] * len(paths)
    return tuple(
        FileRecord(p.relative_to(folder).as_posix(), p.stat().st_size, digest)
        for p, digest in zip(paths, digests)
    )


def top_level_names(files: tuple[FileRecord, ...]) -> list[str]:
    """The output folder's entries (files and sub-folders such as heads/), as `--json` lists them."""
    return sorted({record.name.split("/", 1)[0] for record in files})
