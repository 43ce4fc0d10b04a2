"""Vocabulary-indexed tensors read as if they were laid out in the output vocabulary.

A `RemappedRef` stands in for a model's embedding (or LM head) in the plan: it has the output
shape, and the reader asks it for rows (`TensorReader.read` hands such a ref its own read). Rows
of tokens the model has come from its file, a few runs of rows at a time; rows of tokens it lacks
come from `VocabTensor.defaults` (mergekit's default embeddings, computed once per tensor from a
handful of rows of the other models); padding rows are the mean of the model's other rows. So
every path of the engine (row blocks, streamed TIES, pre-passes, NaN checks) sees the output
layout, and memory stays at the block being read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..io.sources import ST_DTYPES, TensorRef

SPAN_ROWS = 4096  # rows per read when a span is read through (a mean row, a scattered permutation)
READ_COST = 32 * 1024  # one positioned read costs about as much as reading this many more bytes


@dataclass(frozen=True)
class Default:
    """How one output token's default row is made (mergekit's PermutedVocabulary): the mean of
    some models' rows (`average`), one model's row (`row`) or zeros."""

    kind: str  # "average" | "row" | "zero"
    rows: tuple[tuple[str, int], ...] = ()  # (model label, row in that model's file)


@dataclass(eq=False)
class VocabTensor:
    """One vocabulary-indexed tensor over all models: each model's row per output token, the
    shared defaults, and (lazily) the default rows and each model's padding row."""

    name: str
    sources: dict[str, TensorRef]  # model label → its tensor as stored
    rows: dict[str, np.ndarray]  # model label → file row per output row, -1 = default / padding
    defaults: dict[int, Default]  # output token id → its default (for models lacking it, or forced)
    tokens: int  # output vocabulary length; rows past it are padding
    out_rows: int
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _default_rows: dict[int, torch.Tensor] | None = None
    _pad_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def dtype(self) -> torch.dtype:
        """mergekit's: the promotion of every model's dtype (defaults are computed in it)."""
        dtype = None
        for ref in self.sources.values():
            current = ST_DTYPES[ref.dtype]
            dtype = current if dtype is None else torch.promote_types(dtype, current)
        return dtype

    def default_rows(self, reader: Any) -> dict[int, torch.Tensor]:
        with self._lock:
            if self._default_rows is None:
                self._default_rows = self._compute_defaults(reader)
            return self._default_rows

    def _compute_defaults(self, reader: Any) -> dict[int, torch.Tensor]:
        dtype, tail = self.dtype(), next(iter(self.sources.values())).shape[1:]
        out = {}
        for token_id, default in self.defaults.items():
            embed = torch.zeros(tail, dtype=dtype)
            if default.kind == "average":  # in mergekit's order of operations: sum, then divide
                for label, row in default.rows:
                    embed = embed + reader.read(self.sources[label], (row, row + 1))[0].to(dtype)
                embed /= len(default.rows)
            elif default.kind == "row":
                label, row = default.rows[0]
                embed = reader.read(self.sources[label], (row, row + 1))[0].to(dtype).clone()
            out[token_id] = embed
        return out

    def pad_row(self, reader: Any, label: str) -> torch.Tensor:
        """The mean of the model's rows over the vocabulary (mergekit fills padding with it)."""
        with self._lock:
            cached = self._pad_rows.get(label)
        if cached is not None:
            return cached
        total = None
        for first in range(0, self.tokens, SPAN_ROWS):
            block = self.read(reader, label, (first, min(first + SPAN_ROWS, self.tokens)))
            part = block.double().sum(0)
            total = part if total is None else total + part
        mean = (total / self.tokens).to(self.dtype())
        with self._lock:
            self._pad_rows[label] = mean
        return mean

    def read(self, reader: Any, label: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows [r0, r1) of the model's tensor in the output layout, in its stored dtype."""
        source = self.sources[label]
        first, last = rows if rows is not None else (0, self.out_rows)
        tail = source.shape[1:]
        result = torch.empty((last - first, *tail), dtype=ST_DTYPES[source.dtype])
        wanted = self.rows[label][first:last]
        present = np.flatnonzero(wanted >= 0)
        if present.size:
            self._gather(reader, source, wanted[present], present, result)
        missing = np.flatnonzero(wanted < 0)
        if missing.size:
            defaults = self.default_rows(reader) if self.defaults else {}
            for at in missing.tolist():
                token = first + at
                if token >= self.tokens:
                    result[at] = self.pad_row(reader, label)
                elif token in defaults:
                    result[at] = defaults[token]
                else:  # mergekit logs "No embedding for token" and leaves the row at zero
                    result[at] = 0
        return result

    @staticmethod
    def _gather(
        reader: Any, source: TensorRef, src: np.ndarray, dst: np.ndarray, result: torch.Tensor
    ) -> None:
        """result[dst[i]] = file row src[i]: each run of rows consecutive in both is read straight
        into its place, one positioned read per run; when the runs are so many that reading the
        whole span they cover costs less, the span is read SPAN_ROWS rows at a time instead."""
        breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [src.size])).tolist()
        low, high = int(src.min()), int(src.max()) + 1
        row_bytes = source.nbytes // source.shape[0]
        if len(starts) * READ_COST > (high - low) * row_bytes:  # cheaper to read the span through
            for first in range(low, high, SPAN_ROWS):
                last = min(first + SPAN_ROWS, high)
                inside = np.flatnonzero((src >= first) & (src < last))
                if inside.size:
                    block = reader.read(source, (first, last))
                    rows = block.index_select(0, torch.from_numpy(src[inside] - first))
                    result.index_copy_(0, torch.from_numpy(dst[inside]), rows)  # (index_put is far slower)
            return
        for begin, end in zip(starts, ends):
            first, at = int(src[begin]), int(dst[begin])
            reader.read(source, (first, first + end - begin), out=result[at : at + end - begin])


@dataclass(frozen=True)
class RemappedRef(TensorRef):
    """A model's vocabulary tensor as the plan sees it: the output shape, read by `vocab`."""

    vocab: VocabTensor | None = None
    model: str = ""

    def read_rows(
        self, reader: Any, rows: tuple[int, int] | None, out: torch.Tensor | None, pin: bool
    ) -> torch.Tensor:
        assert self.vocab is not None
        result = self.vocab.read(reader, self.model, rows)
        if out is not None:
            out.view(result.shape).copy_(result)
            return out.view(result.shape)
        return result.pin_memory() if pin else result


def remapped(vocab: VocabTensor, label: str) -> RemappedRef:
    source = vocab.sources[label]
    row_bytes = source.nbytes // source.shape[0]
    return RemappedRef(
        source.path,
        source.dtype,
        (vocab.out_rows, *source.shape[1:]),
        source.start,
        source.start + vocab.out_rows * row_bytes,
        source.name,
        vocab=vocab,
        model=label,
    )
