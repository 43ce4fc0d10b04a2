"""The output tokenizer and each model's map from output token ids to its own rows.

mergekit 0.1.5's `mergekit/tokenizer/build.py`, step for step, on the same library calls so that
the vocabulary (and its order) comes out the same: the base's tokenizer stripped of ids past its
config's `vocab_size`; `union` adds every other model's tokens the base lacks, in model order, then
their added tokens; a `tokens:` entry the tokenizer lacks is added last. Tokenizers are loaded with
`transformers.AutoTokenizer` (fast tokenizers, `tokenizers` library) and never with
`trust_remote_code`: no code from a model folder runs. Differences, on purpose: a model whose
tokenizer cannot be loaded is refused (mergekit assumes the base's), and models are taken in
recipe order and each vocabulary in id order (mergekit iterates a set, and a dict built from a
Rust hash map, so the order of a union's new tokens can change from run to run there).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..io.sources import ModelSource

# a folder holds a tokenizer when it has one of these (transformers reads them, in this order)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")
MISSING = -1  # a permutation entry: the model lacks the output token


def transformers_module() -> Any:
    """transformers, or one line saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "building a tokenizer (tokenizer_source union/base/<model> with different vocabularies, "
            "a tokenizer section, chat_template) needs transformers: pip install 'mergekit-ri[vocab]'"
        ) from None
    transformers.logging.set_verbosity_error()  # its notes are not ours to print
    return transformers


def vocab_size(model: ModelSource, fallback: int) -> int:
    """The rows the model's config says its vocabulary has (mergekit's get_vocab_size)."""
    config = model.config() or {}
    size = config.get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else fallback


def load_tokenizer(model: ModelSource) -> Any:
    """The model's fast tokenizer, from its folder's tokenizer files only."""
    where = f"model '{model.label}' ({model.reference})"
    if model.folder is None:
        raise UserError(f"{where}: a bare .safetensors file has no tokenizer; give the model's folder")
    if not any((model.folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise UserError(
            f"{where}: no tokenizer files in {model.folder} (expected one of {', '.join(TOKENIZER_MARKERS)})"
        )
    transformers = transformers_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoTokenizer.from_pretrained(
                str(model.folder), use_fast=True, trust_remote_code=False, local_files_only=True
            )
    except Exception as exc:  # transformers raises many kinds; all mean "no usable tokenizer here"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{where}: cannot load its tokenizer from {model.folder}: {reason}") from None


def stripped_tokenizer(model: ModelSource) -> Any:
    """The model's tokenizer without ids >= its config's vocab_size (mergekit's get_stripped_tokenizer)."""
    tokenizer = load_tokenizer(model)
    size = vocab_size(model, len(tokenizer.get_vocab()))
    unused = [tok for tok, idx in tokenizer.get_vocab().items() if idx >= size]
    if not unused:
        return tokenizer
    where = f"model '{model.label}' ({model.reference})"
    if not tokenizer.is_fast:
        raise UserError(
            f"{where}: its tokenizer has ids past vocab_size {size} and no fast form to strip them"
        )
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise UserError(
            f"{where}: its tokenizer ({data['model']['type']}) has ids past vocab_size {size}; "
            "only BPE tokenizers can be stripped (as in mergekit)"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    dropped = set(unused)
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(part in dropped for part in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    import tokenizers

    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def union_tokenizer(base_tok: Any, tokenizers: dict[str, Any], sizes: dict[str, int]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokenizer plus every token another model has."""
    transformers = transformers_module()
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for key, tokenizer in tokenizers.items():
        size = sizes[key]
        added = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in added.values()}
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if idx >= size or tok in added_contents:
                continue
            out_vocab.setdefault(tok, len(out_vocab))
        for idx, info in added.items():
            if idx < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as folder:  # a copy, so that the base's stays as it was
        base_tok.save_pretrained(folder)
        result = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    base_vocab = base_tok.get_vocab()
    for tok in out_vocab:
        if tok not in out_added and tok not in base_vocab:
            result.add_tokens(tok)
    for info in out_added.values():
        result.add_tokens(info)
    return result


@dataclass
class BuiltTokenizer:
    """The output tokenizer; per model (by label) the old row of each output token id (or MISSING);
    per model its vocabulary as loaded (for `model_token` sources by token)."""

    tokenizer: Any
    vocab: dict[str, int]
    permutations: dict[str, list[int]]
    original_vocabs: dict[str, dict[str, int]]


def build_tokenizer(
    models: list[ModelSource], base: ModelSource, source: str | ModelSource, add_tokens: list[str]
) -> BuiltTokenizer:
    """mergekit's build_tokenizer over `models` (the base first; each one once)."""
    base_tok = stripped_tokenizer(base)
    loaded = {base.label: base_tok}
    for model in models:
        if model is not base:
            loaded[model.label] = load_tokenizer(model)
    sizes = {m.label: vocab_size(m, len(loaded[m.label].get_vocab())) for m in models}
    if isinstance(source, ModelSource):  # a model named: its tokenizer as it is (not stripped)
        out = load_tokenizer(source)
    elif source == "base":
        out = base_tok
    else:
        out = union_tokenizer(base_tok, loaded, sizes)
    existing = set(out.get_vocab())
    for tok in add_tokens:
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)
    vocab = out.get_vocab()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise UserError("the output tokenizer's token ids are not 0..n-1; cannot lay out its rows")
    permutations = {}
    for model in models:
        own = loaded[model.label].get_vocab()
        size = sizes[model.label]
        permutation = []
        for tok, _ in ordered:
            idx = own.get(tok, MISSING)
            permutation.append(idx if 0 <= idx < size else MISSING)
        permutations[model.label] = permutation
    return BuiltTokenizer(out, vocab, permutations, {k: t.get_vocab() for k, t in loaded.items()})
