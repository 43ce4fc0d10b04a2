"""Different vocabularies and chat templates: tokenizer_source, the tokenizer: section, chat_template.

The models are real: tiny Llamas (transformers) with byte-level BPE tokenizers trained offline
(`helpers.make_vocab_models`: base and `a` share a 200-token tokenizer; `b` has another, trained
on other text, plus 3 added tokens: 203 rows). Expected rows are computed here, token by token,
from each input's own tokenizer and mergekit 0.1.5's documented rule (tokenizer/embed.py): a token
a model lacks takes the row of the only model that has it, else the base's, else the mean of
the models that have it, else zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
import torch
from conftest import (
    assert_nothing_written,
    assert_user_error,
    read_checkpoint,
    run_cli,
    tree_digest,
    write_recipe,
)
from helpers import ADDED_TOKENS, make_vocab_models
from safetensors.torch import load_file

from mergekit_ri import reading
from mergekit_ri.vocab import remap

CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
NAMES = ("base", "a", "b")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_vocab_models(tmp_path_factory.mktemp("vocab") / "untied", template=TEMPLATE)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> dict[str, Path]:
    return make_vocab_models(tmp_path_factory.mktemp("vocab") / "tied", tie=True)


def _recipe(tmp_path: Path, models: dict[str, Path], method: str = "linear", **extra) -> Path:
    fields = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in NAMES],
        "dtype": "float32",
        **extra,
    }
    if method != "linear":
        fields["models"] = [{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in ("a", "b")]
    return write_recipe(tmp_path / "recipe.yaml", **fields)


def _merge(recipe: Path, out: Path, *flags: str) -> None:
    result = run_cli("merge", recipe, "-o", out, *flags)
    assert result.code == 0, result.stderr


def _inputs(models: dict[str, Path]) -> dict[str, tuple[dict[str, int], dict[str, torch.Tensor]]]:
    """Each model's own vocabulary (token → id) and tensors."""
    return {
        n: (
            transformers.AutoTokenizer.from_pretrained(models[n]).get_vocab(),
            load_file(models[n] / "model.safetensors"),
        )
        for n in NAMES
    }


def _expected_row(token: str, name: str, inputs, tensor: str, base: str = "base") -> torch.Tensor:
    """One model's row of `tensor` for `token` under mergekit's default rule."""
    vocab, tensors = inputs[name][0], inputs[name][1]
    if token in vocab:
        return tensors[tensor][vocab[token]]
    having = [n for n in inputs if token in inputs[n][0]]
    if len(having) == 1:
        return inputs[having[0]][1][tensor][inputs[having[0]][0][token]]
    if not having:
        return torch.zeros(inputs[name][1][tensor].shape[1])
    if base in having:
        return inputs[base][1][tensor][inputs[base][0][token]]
    return sum(inputs[n][1][tensor][inputs[n][0][token]] for n in having) / len(having)


def test_union_loads_in_transformers_and_every_row_follows_mergekits_rule(tmp_path, models):
    out = tmp_path / "out"
    _merge(_recipe(tmp_path, models, tokenizer_source="union"), out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    inputs = _inputs(models)
    union = set(inputs["a"][0]) | set(inputs["b"][0])
    assert set(vocab) == union and sorted(vocab.values()) == list(range(len(union)))
    assert model.config.vocab_size == len(vocab) == model.get_input_embeddings().weight.shape[0]
    assert [vocab[t] for t in ADDED_TOKENS] == list(range(len(vocab) - 3, len(vocab)))  # added tokens last
    merged = read_checkpoint(out)
    for tensor in (EMBED, HEAD):
        expected = torch.stack(
            [
                sum(_expected_row(t, n, inputs, tensor) for n in NAMES) / 3
                for t, _ in sorted(vocab.items(), key=lambda x: x[1])
            ]
        )
        torch.testing.assert_close(merged[tensor], expected, rtol=1e-6, atol=1e-7)
        b_vocab, b_rows = inputs["b"][0], inputs["b"][1][tensor]
        for token in ADDED_TOKENS:  # only b has it: every model takes b's row, so the merge is b's row
            torch.testing.assert_close(
                merged[tensor][vocab[token]], b_rows[b_vocab[token]], rtol=1e-6, atol=0
            )
    ids = tokenizer("<tool> abc", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)


def test_tied_embeddings_stay_tied(tmp_path, tied):
    out = tmp_path / "out"
    _merge(_recipe(tmp_path, tied, "task_arithmetic", tokenizer_source="union"), out)
    merged = read_checkpoint(out)
    assert HEAD not in merged
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (
        model.config.vocab_size
        == merged[EMBED].shape[0]
        == len(transformers.AutoTokenizer.from_pretrained(out))
    )


@pytest.mark.parametrize("source, rows", [("base", 200), ("b", 203)])
def test_base_or_a_model_vocabulary(tmp_path, models, source, rows):
    """tokenizer_source base (or a model): that tokenizer, the others' rows found by token."""
    out = tmp_path / "out"
    _merge(_recipe(tmp_path, models, tokenizer_source=str(models[source]) if source == "b" else source), out)
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    inputs = _inputs(models)
    assert vocab == inputs[source][0] and len(vocab) == rows
    merged = read_checkpoint(out)
    for tensor in (EMBED, HEAD):
        expected = torch.stack(
            [
                sum(_expected_row(t, n, inputs, tensor) for n in NAMES) / 3
                for t, _ in sorted(vocab.items(), key=lambda x: x[1])
            ]
        )
        torch.testing.assert_close(merged[tensor], expected, rtol=1e-6, atol=1e-7)


def test_tokenizer_section_tokens_force_and_padding(tmp_path, models):
    section = {
        "source": "union",
        "pad_to_multiple_of": 64,
        "tokens": {
            "<new>": {"source": {"kind": "zero"}},
            "<tool>": {
                "source": {"kind": "model_token", "model": str(models["base"]), "token": "<s>"},
                "force": True,
            },
            "<think>": {"source": str(models["b"])},
        },
    }
    out = tmp_path / "out"
    _merge(_recipe(tmp_path, models, tokenizer=section), out)
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    merged = read_checkpoint(out)[EMBED]
    inputs = _inputs(models)
    tokens = len(vocab)
    assert (
        tokens == 366
        and merged.shape[0] == 384 == json.loads((out / "config.json").read_text())["vocab_size"]
    )
    assert torch.equal(merged[vocab["<new>"]], torch.zeros(16))
    base_bos = inputs["base"][1][EMBED][inputs["base"][0]["<s>"]]
    torch.testing.assert_close(merged[vocab["<tool>"]], base_bos, rtol=1e-6, atol=0)  # forced for b too
    b_think = inputs["b"][1][EMBED][inputs["b"][0]["<think>"]]
    torch.testing.assert_close(merged[vocab["<think>"]], b_think, rtol=1e-6, atol=0)
    # padding rows: each model's mean row over the vocabulary, then merged
    torch.testing.assert_close(
        merged[tokens:], merged[:tokens].mean(0).expand(384 - tokens, -1), rtol=1e-5, atol=1e-6
    )


def test_row_blocks_and_streamed_reads_give_the_same_rows(tmp_path, models, monkeypatch):
    """The engine reads a re-laid tensor whole, by row blocks or by streamed chunks, each run of
    rows on its own or through spans: same bytes."""
    recipe = _recipe(tmp_path, models, "ties", tokenizer_source="union", parameters={"density": 0.7})
    _merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 16 * 7)  # rows 7 at a time
    monkeypatch.setattr(reading, "STREAM_BYTES", 1)  # TIES reads the vocabulary tensors by row chunks
    monkeypatch.setattr(remap, "SPAN_ROWS", 5)
    monkeypatch.setattr(remap, "READ_COST", 1 << 30)  # scattered rows: spans read through
    _merge(recipe, tmp_path / "blocks")
    whole, blocks = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_dry_run_says_the_vocabulary_and_what_is_relaid(tmp_path, models):
    recipe = _recipe(tmp_path, models, tokenizer_source="union", chat_template="chatml")
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    vocab = json.loads(result.stdout)["vocabulary"]
    assert vocab["vocab_size"] == vocab["tokens"] == sum(vocab["token_rows"].values())
    assert vocab["token_rows"]["b only"] > 0 and vocab["chat_template"] == "chatml"
    assert vocab["remapped"][EMBED] == ["base", "a", "b"] and HEAD in vocab["remapped"]
    table = run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run")
    assert (
        f"{vocab['vocab_size']} rows" in table.stdout and "re-laid: model.embed_tokens.weight" in table.stdout
    )
    assert not (tmp_path / "out").exists()


def test_same_vocabulary_stays_a_plain_copy(tmp_path, models):
    """base and a share a tokenizer: tokenizer_source base copies its files and re-lays nothing."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="linear",
        models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("base", "a")],
        tokenizer_source="base",
    )
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.code == 0 and "vocabulary" not in json.loads(result.stdout)
    _merge(recipe, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        models["base"] / "tokenizer.json"
    ).read_bytes()


# --- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["chatml", "auto", "jinja"])
def test_chat_template_written_where_transformers_reads_it(tmp_path, models, choice):
    given = {
        "chatml": "chatml",
        "auto": "auto",
        "jinja": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
    }[choice]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="linear",
        models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("base", "a")],
        chat_template=given,
    )
    out = tmp_path / "out"
    _merge(recipe, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    jinja = (out / "chat_template.jinja").read_text()
    want = {"chatml": None, "auto": TEMPLATE.strip(), "jinja": given}[choice]  # auto: a's (base has none)
    if choice == "chatml":
        assert jinja.startswith(CHATML)
    else:
        assert jinja == want
    assert config["chat_template"] == jinja
    text = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert "hi" in text and ("<|im_start|>user" in text if choice == "chatml" else "user" in text)
    assert (models["base"] / "tokenizer_config.json").is_file()  # inputs untouched
    assert "chat_template" not in json.loads((models["base"] / "tokenizer_config.json").read_text())


def test_chat_template_with_a_built_tokenizer(tmp_path, models):
    out = tmp_path / "out"
    _merge(_recipe(tmp_path, models, tokenizer_source="union", chat_template="llama3"), out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert "<|start_header_id|>" in tokenizer.chat_template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template


# --- bad input: one line, exit 2, nothing written --------------------------------------------


def _refused(tmp_path: Path, recipe: Path, *needles: str, inputs: tuple[Path, ...] = ()) -> None:
    before = tree_digest(*inputs)
    out = tmp_path / "out"
    for command in (("merge", recipe, "-o", out, "--dry-run"), ("merge", recipe, "-o", out)):
        assert_user_error(run_cli(*command), *needles)
    assert_nothing_written(out)
    assert tree_digest(*inputs) == before


def test_tokenizer_folder_without_tokenizer_files(tmp_path, models):
    broken = dict(models, b=tmp_path / "b")
    shutil.copytree(models["b"], broken["b"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken["b"] / name).unlink()
    _refused(
        tmp_path,
        _recipe(tmp_path, broken, tokenizer_source="union"),
        "model 'b'",
        "no tokenizer files",
        inputs=(broken["b"],),
    )


def test_unreadable_tokenizer_file(tmp_path, models):
    broken = dict(models, b=tmp_path / "b")
    shutil.copytree(models["b"], broken["b"])
    (broken["b"] / "tokenizer.json").write_text("{not json")
    _refused(
        tmp_path,
        _recipe(tmp_path, broken, tokenizer_source="union"),
        "model 'b'",
        "cannot load its tokenizer",
    )


@pytest.mark.parametrize(
    "extra, needles",
    [
        ({"tokenizer_source": "nope"}, ("tokenizer source 'nope'", "neither 'base' nor")),
        ({"tokenizer": {"source": "nope"}}, ("tokenizer source 'nope'",)),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": "nope"}}}},
            ("tokenizer.tokens.<x>.source model 'nope'",),
        ),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, ("tokenizer.tokens.<x>", "give a source")),
        (
            {
                "tokenizer": {
                    "tokens": {"<x>": {"source": {"kind": "model_token", "model": "b", "token": "<zz>"}}}
                }
            },
            ("'<zz>' is not in model 'b'",),
        ),
        (
            {
                "tokenizer": {
                    "tokens": {"<x>": {"source": {"kind": "model_token", "model": "b", "token_id": 999}}}
                }
            },
            ("token_id 999 is out of range for model 'b'",),
        ),
        ({"tokenizer_source": None}, ("vocabularies differ (203 vs 200 tokens)", "set tokenizer_source")),
        ({}, ("vocabularies differ (203 vs 200 tokens)", "set tokenizer_source")),
    ],
)
def test_bad_vocabulary_settings_are_refused_with_the_plan(tmp_path, models, extra, needles):
    _refused(tmp_path, _recipe(tmp_path, models, **extra), *needles)


def test_an_unnamed_tokenizer_source_stays_unnamed_with_options(tmp_path, models):
    """Different vocabularies need a tokenizer_source the recipe names, with --device or not."""
    recipe = _recipe(tmp_path, models)
    result = run_cli(
        "merge", recipe, "-o", tmp_path / "out", "--dry-run", "--device", "cpu", "--random-seed", "1"
    )
    assert_user_error(result, "vocabularies differ", "set tokenizer_source")


@pytest.mark.parametrize(
    "extra, needles",
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, ("not both",)),
        ({"chat_template": "nonsense"}, ("chat_template", "neither auto")),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, ("pad_to_multiple_of",)),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "b"}}}}},
            ("token_id or token",),
        ),
        ({"tokenizer": {"sorce": "union"}}, ("sorce",)),
    ],
)
def test_bad_tokenizer_sections_are_refused_when_the_recipe_is_read(tmp_path, models, extra, needles):
    recipe = _recipe(tmp_path, models, **extra)
    assert_user_error(run_cli("validate", recipe), *needles)
    _refused(tmp_path, recipe, *needles)


def test_chat_template_on_a_source_without_tokenizer_files(tmp_path, models):
    bare = tmp_path / "bare"
    shutil.copytree(models["a"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="linear",
        models=[{"model": str(bare)}, {"model": str(models["a"])}],
        chat_template="chatml",
    )
    _refused(tmp_path, recipe, "no tokenizer files to set the chat_template in")
