"""The plan's vocabulary step: which tokenizer the output gets, and each model's vocabulary
tensors re-laid in it, decided from config.json and tokenizer files before any weight is read.

`plan_vocabulary` runs when the recipe asks for a tokenizer (`tokenizer_source: union`, a
`tokenizer:` section) or names a tokenizer_source while the models' vocabulary tensors differ in
rows. It returns the models with their embedding / LM-head refs replaced by `RemappedRef`s of the
output shape, so the rest of the plan (shape checks, tasks, shards) and the engine see one
vocabulary. The default row of a token a model lacks is mergekit 0.1.5's (`PermutedVocabulary`):
a token only one model has takes that model's row; one the base has takes the base's row; one
several models (not the base) have takes their mean; one no model has is zero; padding rows
(`pad_to_multiple_of`) are the mean of the model's other rows. A `tokens:` entry overrides this
(for the models that lack the token, or for all with `force`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..io.sources import ModelSource, read_json_object
from .build import MISSING, TOKENIZER_MARKERS, BuiltTokenizer, build_tokenizer
from .config import ModelTokenEmbedding, TokenEmbeddingConfig, ZeroEmbedding, named_template
from .remap import Default, VocabTensor, remapped

# a vocabulary-indexed tensor: the input embedding or the LM head, outside the numbered layers
VOCAB_NAME = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|shared|output)\.weight$"
)
LAYER = re.compile(r"\.\d+\.")


@dataclass
class VocabPlan:
    """What the output's vocabulary is and where each row comes from (`--dry-run` prints it)."""

    built: BuiltTokenizer | None  # None: the tokenizer files are copied (only a chat template changes)
    source: str  # "union", "base" or a model's label
    tokens: int = 0
    out_rows: int = 0
    origins: dict[str, int] = field(default_factory=dict)  # where the output tokens' rows come from
    remapped: dict[str, list[str]] = field(default_factory=dict)  # tensor → models re-laid
    chat_template: str | None = None  # the template text written, if any
    chat_template_choice: str | None = None  # as the recipe gives it (auto, a name, "jinja")
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokenizer_source": self.source}
        if self.built is not None:
            out.update(
                vocab_size=self.out_rows, tokens=self.tokens, token_rows=self.origins, remapped=self.remapped
            )
        if self.chat_template_choice is not None:
            out["chat_template"] = self.chat_template_choice if self.chat_template else "none found"
        return out


def _vocab_tensors(model: ModelSource) -> list[str]:
    return [
        name
        for name, ref in model.tensors.items()
        if VOCAB_NAME.search(name) and not LAYER.search(name) and len(ref.shape) >= 1 and ref.shape[0] > 0
    ]


def _differs(models: list[ModelSource]) -> bool:
    """Whether any vocabulary tensor has other rows in some model than in the first."""
    first = models[0]
    for name in _vocab_tensors(first):
        for model in models[1:]:
            ref = model.tensors.get(name)
            if ref is not None and ref.shape != first.tensors[name].shape:
                return True
    return False


def find_model(choice: str, models: list[ModelSource], where: str) -> ModelSource:
    for model in models:
        if choice in (model.reference, model.label):
            return model
    raise UserError(
        f"recipe: {where} '{choice}' is neither 'base' nor one of the recipe's models "
        f"({', '.join(m.label for m in models)})"
    )


def _unique(base: ModelSource | None, experts: list[ModelSource]) -> list[ModelSource]:
    """Every model once (by reference), the base first: mergekit's referenced models."""
    seen, out = set(), []
    for model in ([base] if base else []) + experts:
        if model.reference not in seen:
            seen.add(model.reference)
            out.append(model)
    return out


def plan_vocabulary(
    recipe: Any, base: ModelSource | None, experts: list[ModelSource]
) -> tuple[VocabPlan | None, ModelSource | None, list[ModelSource]]:
    """The vocabulary step (see the module docstring); the models come back with remapped refs."""
    section = recipe.tokenizer
    named = "tokenizer_source" in recipe.model_fields_set and recipe.tokenizer_source is not None
    choice = section.source if section is not None else recipe.tokenizer_source
    models = _unique(base, experts)
    reference = base or experts[0]
    build = section is not None or choice == "union" or (named and _differs(models))
    plan: VocabPlan | None = None
    if build:
        source: str | ModelSource = choice
        if choice not in ("union", "base"):
            source = find_model(choice, models, "tokenizer source")
        tokens = dict(section.tokens or {}) if section is not None else {}
        built = build_tokenizer(models, reference, source, list(tokens))
        pad = section.pad_to_multiple_of if section is not None else None
        plan = VocabPlan(built, source.label if isinstance(source, ModelSource) else source)
        base, experts = _remap_models(plan, built, models, reference, base, experts, tokens, pad, recipe)
    if recipe.chat_template is not None:
        plan = plan or VocabPlan(None, choice or "none")
        given = recipe.chat_template
        plan.chat_template_choice = given if named_template(given) or given == "auto" else "jinja"
        plan.chat_template = resolve_chat_template(given, models)
        if plan.built is None and choice is None:
            plan.warnings.append(
                "chat_template is not saved: no tokenizer is written (--no-copy-tokenizer), as in mergekit"
            )
        elif plan.built is None:
            holder = (
                reference if choice in ("base", "union") else find_model(choice, models, "tokenizer_source")
            )
            if holder.folder is None or not any((holder.folder / n).is_file() for n in TOKENIZER_MARKERS):
                raise UserError(
                    f"model '{holder.label}' ({holder.reference}): no tokenizer files to set the "
                    f"chat_template in (expected one of {', '.join(TOKENIZER_MARKERS)})"
                )
    return plan, base, experts


def relay_sources(
    recipe: Any, sources: dict[str, ModelSource]
) -> tuple[VocabPlan | None, dict[str, ModelSource]]:
    """`plan_vocabulary` for a sliced recipe's models (reference → model, the base first)."""
    models = list(sources.values())
    has_base = recipe.base_model is not None and recipe.base_model in sources
    base = sources[recipe.base_model] if has_base else None
    vocab, base, others = plan_vocabulary(recipe, base, [m for m in models if m is not base])
    relaid = {m.reference: m for m in ([base] if base else []) + others}
    return vocab, {key: relaid[m.reference] for key, m in sources.items()}


def _token_defaults(
    built: BuiltTokenizer,
    labels: list[str],
    base_label: str | None,
    tokens: dict[str, TokenEmbeddingConfig],
    models: list[ModelSource],
) -> tuple[dict[int, Default], set[int], dict[str, int]]:
    """mergekit's assign_embedding_sources and default embeddings, per output token id: the
    defaults, the forced ids, and how many tokens come from where (for --dry-run)."""
    perms = built.permutations
    defaults: dict[int, Default] = {}
    forced: set[int] = set()
    origins: Counter[str] = Counter()
    for token, token_id in sorted(built.vocab.items(), key=lambda item: item[1]):
        present = [label for label in labels if perms[label][token_id] != MISSING]
        cfg = tokens.get(token)
        if len(present) == len(labels) and not (cfg is not None and cfg.force):
            origins["every model"] += 1
        elif cfg is not None:
            if cfg.source is None:
                raise UserError(
                    f"recipe: tokenizer.tokens.{token}: give a source (some models lack this token, or force is set)"
                )
            if cfg.force:
                forced.add(token_id)
            defaults[token_id] = _configured(cfg, token, token_id, built, models)
            origins["tokenizer.tokens"] += 1
        elif len(present) == 1:
            defaults[token_id] = Default("row", ((present[0], perms[present[0]][token_id]),))
            origins[f"{present[0]} only"] += 1
        elif not present:
            defaults[token_id] = Default("zero")
            origins["no model (zero)"] += 1
        elif base_label is not None and base_label in present:
            defaults[token_id] = Default("row", ((base_label, perms[base_label][token_id]),))
            origins["base (some models lack it)"] += 1
        else:
            defaults[token_id] = Default("average", tuple((lb, perms[lb][token_id]) for lb in present))
            origins[f"mean of {len(present)} models"] += 1
    return defaults, forced, dict(origins)


def _configured(
    cfg: TokenEmbeddingConfig, token: str, token_id: int, built: BuiltTokenizer, models: list[ModelSource]
) -> Default:
    """A `tokens:` entry's row (mergekit's compute_default_embedding), checked now."""
    where = f"recipe: tokenizer.tokens.{token}.source"
    if isinstance(cfg.source, ZeroEmbedding):
        return Default("zero")
    name = cfg.source.model if isinstance(cfg.source, ModelTokenEmbedding) else cfg.source
    model = find_model(str(name), models, f"tokenizer.tokens.{token}.source model")
    if isinstance(cfg.source, ModelTokenEmbedding):
        row = cfg.source.token_id
        if row is None:
            row = built.original_vocabs[model.label].get(cfg.source.token)
            if row is None:
                raise UserError(
                    f"{where}: token '{cfg.source.token}' is not in model '{model.label}'s vocabulary"
                )
        rows = min(ref.shape[0] for n, ref in model.tensors.items() if VOCAB_NAME.search(n))
        if row >= rows:
            raise UserError(
                f"{where}: token_id {row} is out of range for model '{model.label}' ({rows} rows)"
            )
        return Default("row", ((model.label, row),))
    row = built.permutations[model.label][token_id]
    if row == MISSING:
        raise UserError(f"{where}: model '{model.label}' does not have the token '{token}'")
    return Default("row", ((model.label, row),))


def _remap_models(
    plan: VocabPlan,
    built: BuiltTokenizer,
    models: list[ModelSource],
    reference: ModelSource,
    base: ModelSource | None,
    experts: list[ModelSource],
    tokens: dict[str, TokenEmbeddingConfig],
    pad: int | None,
    recipe: Any,
) -> tuple[ModelSource | None, list[ModelSource]]:
    count = len(built.vocab)
    out_rows = count if not pad or count % pad == 0 else (count // pad + 1) * pad
    plan.tokens, plan.out_rows = count, out_rows
    labels = [m.label for m in models]
    base_label = base.label if base is not None and recipe.base_model is not None else None
    defaults, forced, plan.origins = _token_defaults(built, labels, base_label, tokens, models)
    if out_rows > count:
        plan.origins["padding (mean row)"] = out_rows - count
    names = _vocab_tensors(reference)
    for model in models:
        lacking = [n for n in names if n not in model.tensors]
        if lacking:
            raise UserError(
                f"model '{model.label}' ({model.reference}) lacks tensor '{lacking[0]}' that the base has"
            )
    refs: dict[str, dict[str, Any]] = {m.reference: {} for m in models}
    for name in names:
        sources = {m.label: m.tensors[name] for m in models}
        tail = sources[reference.label].shape[1:]
        rows: dict[str, np.ndarray] = {}
        for model in models:
            ref = sources[model.label]
            if ref.shape[1:] != tail:
                raise UserError(
                    f"model '{model.label}': tensor '{name}' has shape {list(ref.shape)} but the base has "
                    f"{list(sources[reference.label].shape)} (only the vocabulary axis may differ)"
                )
            perm = np.full(out_rows, MISSING, dtype=np.int64)
            perm[:count] = built.permutations[model.label]
            if forced:
                perm[sorted(forced)] = MISSING
            if perm.max(initial=-1) >= ref.shape[0]:
                raise UserError(
                    f"model '{model.label}': tensor '{name}' has {ref.shape[0]} rows but its tokenizer "
                    f"has ids up to {int(perm.max())}; its config.json vocab_size does not match its weights"
                )
            rows[model.label] = perm
        vocab = VocabTensor(name, sources, rows, defaults, count, out_rows)
        for model in models:
            perm = rows[model.label]
            if out_rows != sources[model.label].shape[0] or not (perm == np.arange(out_rows)).all():
                plan.remapped.setdefault(name, []).append(model.label)
                refs[model.reference][name] = remapped(vocab, model.label)

    def relaid(model: ModelSource) -> ModelSource:
        return replace(model, tensors={**model.tensors, **refs[model.reference]})

    return (relaid(base) if base is not None else None), [relaid(m) for m in experts]


def resolve_chat_template(choice: str, models: list[ModelSource]) -> str | None:
    """The template text: a named one, the Jinja given, or (`auto`) the most common among the
    models' tokenizer files (mergekit's rule; the first model's wins a tie)."""
    text = named_template(choice)
    if text is not None:
        return text
    if choice != "auto":
        return choice
    found = [t for t in (model_chat_template(m) for m in models) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def model_chat_template(model: ModelSource) -> str | None:
    """A model's chat template as transformers would load it: chat_template.jinja, else the
    tokenizer_config.json field (a string, or the entry named 'default' of a list)."""
    if model.folder is None:
        return None
    jinja = model.folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    config_path = model.folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = read_json_object(config_path, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def write_tokenizer(folder: Path, plan: VocabPlan) -> list[str]:
    """The output tokenizer (when one was built) saved by transformers; the chat template set
    in tokenizer_config.json and chat_template.jinja. Returns the files written."""
    import json

    written: list[str] = []
    if plan.built is not None:
        tokenizer = plan.built.tokenizer
        if plan.chat_template:
            tokenizer.chat_template = plan.chat_template
        before = set(p.name for p in folder.iterdir())
        tokenizer.save_pretrained(str(folder))
        written = sorted(set(p.name for p in folder.iterdir()) - before)
    if plan.chat_template:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config["chat_template"] = plan.chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
        (folder / "chat_template.json").unlink(missing_ok=True)  # an older template must not win
        written += ["tokenizer_config.json", "chat_template.jinja"]
    return sorted(set(written))
