"""Classifier experts with heads of different sizes: backbone merged, every head kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint, run_cli, write_recipe
from helpers import EXPERTS, assert_close, make_classifiers, ref_task_arithmetic, vit
from safetensors.torch import load_file, save_file

from mergekit_ri.errors import UserError
from mergekit_ri.heads import load_with_head
from mergekit_ri.methods import all_methods
from mergekit_ri.recipe import parse_recipe

transformers = pytest.importorskip("transformers")


def bert(num_labels: int, seed: int):
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def merge(tmp_path: Path, folders, method: str, name: str = "out", **extra) -> Path:
    fields = {
        "merge_method": method,
        "models": [{"model": str(folders[e])} for e in EXPERTS],
        "heads": "auto",
        "out_dtype": "float32",
        **extra,
    }
    if all_methods()[method].needs_base:
        fields["base_model"] = str(folders["base"])
    recipe = write_recipe(tmp_path / f"{name}.yaml", **fields)
    result = run_cli("merge", recipe, "-o", tmp_path / name, "-q")
    assert result.code == 0, result.stderr
    return tmp_path / name


def strip_heads(folders, tmp_path: Path) -> dict[str, Path]:
    stripped = {}
    for key, folder in folders.items():
        tensors = {
            k: v
            for k, v in load_file(folder / "model.safetensors").items()
            if not k.startswith("classifier.")
        }
        stripped[key] = tmp_path / f"stripped-{key}.safetensors"
        save_file(tensors, stripped[key])
    return stripped


@pytest.fixture
def vits(tmp_path):
    return make_classifiers(tmp_path / "vit", vit, [3, 5, 2])


def merges_every_expert(method: str) -> bool:
    """Whether `method` takes this file's recipes (every expert, a base when it needs one); the
    two-model methods (slerp, nuslerp, nearswap, ...) and passthrough are tested in
    test_methods_mergekit.py."""
    fields = {"merge_method": method, "models": [{"model": e} for e in EXPERTS]}
    if all_methods()[method].needs_base:
        fields["base_model"] = "base"
    try:
        parse_recipe(fields)
    except UserError:
        return False
    return True


SLOW_ON_HEADS = {"multislerp", "iso_cts", "iso_c", "karcher", "wudi2"}  # seconds each: full suite only


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.slow) if m in SLOW_ON_HEADS else m
        for m in sorted(all_methods())
        if merges_every_expert(m)
    ],
)
def test_every_method_merges_the_backbone_and_keeps_each_head(tmp_path, vits, method):
    out = merge(tmp_path, vits, method)
    merged = read_checkpoint(out)
    # the backbone equals the same method run on head-less copies of the inputs
    bare = strip_heads(vits, tmp_path)
    fields = {
        "merge_method": method,
        "models": [{"model": str(bare[e])} for e in EXPERTS],
        "out_dtype": "float32",
    }
    if all_methods()[method].needs_base:
        fields["base_model"] = str(bare["base"])
    assert (
        run_cli("merge", write_recipe(tmp_path / "bare.yaml", **fields), "-o", tmp_path / "bare", "-q").code
        == 0
    )
    backbone = read_checkpoint(tmp_path / "bare")
    assert set(merged) == set(backbone) | {"classifier.weight", "classifier.bias"}
    for name, tensor in backbone.items():
        assert torch.equal(merged[name], tensor), name
    # heads: byte-identical to each expert's, the default (first) one inside the checkpoint
    index = json.loads((out / "heads" / "index.json").read_text())
    assert index["default"] == "e0" and list(index["heads"]) == EXPERTS
    for e, labels in zip(EXPERTS, [3, 5, 2]):
        mine = load_file(vits[e] / "model.safetensors")
        written = load_file(out / "heads" / index["heads"][e]["file"])
        assert set(written) == {"classifier.weight", "classifier.bias"}
        for name, tensor in written.items():
            assert (
                tensor.dtype == mine[name].dtype and tensor.numpy().tobytes() == mine[name].numpy().tobytes()
            )
        assert index["heads"][e]["num_labels"] == labels and index["heads"][e]["tensors"][
            "classifier.weight"
        ] == [labels, 16]
    assert torch.equal(
        merged["classifier.weight"], load_file(vits["e0"] / "model.safetensors")["classifier.weight"]
    )


def test_backbone_matches_task_arithmetic_formula(tmp_path, vits):
    merged = read_checkpoint(merge(tmp_path, vits, "task_arithmetic", parameters={"lambda": 0.5}))
    base = load_file(vits["base"] / "model.safetensors")
    experts = [load_file(vits[e] / "model.safetensors") for e in EXPERTS]
    for name in base:
        if not name.startswith("classifier."):
            expected = ref_task_arithmetic(
                base[name].float(), [x[name].float() for x in experts], [1.0] * 3, 0.5
            )
            assert_close(merged[name], expected, name)


def model_built_in_test(tmp_path: Path, expert: Path, merged: Path, auto_class, tag: str):
    """The expert's own config and head on the merged backbone, via a folder made here."""
    folder = tmp_path / f"built-{tag}"
    folder.mkdir()
    shutil.copy(expert / "config.json", folder / "config.json")
    tensors = {k: v for k, v in read_checkpoint(merged).items() if not k.startswith("classifier.")}
    tensors.update(
        {k: v for k, v in load_file(expert / "model.safetensors").items() if k.startswith("classifier.")}
    )
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return auto_class.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_merged_folder_loads_and_each_head_reproduces_logits(tmp_path, kind):
    build, auto_class = {
        "vit": (vit, transformers.AutoModelForImageClassification),
        "bert": (bert, transformers.AutoModelForSequenceClassification),
    }[kind]
    folders = make_classifiers(tmp_path / kind, build, [3, 5, 2])
    out = merge(tmp_path, folders, "ties", heads_default="e1")
    inputs = torch.randn(4, 1, 8, 8) if kind == "vit" else torch.randint(0, 50, (4, 7))
    run = (
        (lambda m: m(pixel_values=inputs).logits) if kind == "vit" else (lambda m: m(input_ids=inputs).logits)
    )
    default = auto_class.from_pretrained(out).eval()
    assert default.config.num_labels == 5  # config.json comes from heads_default
    with torch.no_grad():
        torch.testing.assert_close(
            run(default), run(model_built_in_test(tmp_path, folders["e1"], out, auto_class, "d"))
        )
        for e, labels in zip(EXPERTS, [3, 5, 2]):
            swapped = load_with_head(out, e, auto_class).eval()
            logits = run(swapped)
            assert logits.shape == (4, labels)
            assert swapped.config.id2label[0] == f"task{EXPERTS.index(e)}-class0"
            torch.testing.assert_close(
                logits, run(model_built_in_test(tmp_path, folders[e], out, auto_class, e))
            )


def test_without_heads_mismatched_heads_get_a_hint(tmp_path, vits):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="ties",
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e])} for e in EXPERTS],
    )
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert result.code == 2
    assert "classifier." in result.stderr and "heads: auto" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_lists_heads(tmp_path, vits):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        merge_method="ties",
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e])} for e in EXPERTS],
        heads="classifier.",
        heads_default=str(vits["e2"]),
    )
    plan = json.loads(run_cli("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--json").stdout)
    assert plan["heads_default"] == "e2"
    assert plan["heads"]["e1"] == {"classifier.weight": [5, 16], "classifier.bias": [5]}


def test_heads_auto_on_a_model_without_heads_explains(tmp_path, recipe_for):
    result = run_cli("merge", recipe_for("ties", heads="auto"), "-o", tmp_path / "out")
    assert result.code == 2 and "LlamaForCausalLM" in result.stderr and "heads" in result.stderr


def test_head_files_list_their_metadata_in_one_order(tmp_path):
    """safetensors orders metadata keys by a per-process hash: heads/ must be the same bytes in
    every process, so their header is written in sorted order (and still loads as before)."""
    from safetensors import safe_open

    from mergekit_ri.artifacts import save_in_order

    tensors = {"classifier.weight": torch.arange(6.0).reshape(2, 3), "classifier.bias": torch.ones(2)}
    expert = '/m/é "x\\y'
    blobs = []
    for i, metadata in enumerate([{"format": "pt", "expert": expert}, {"expert": expert, "format": "pt"}]):
        path = tmp_path / f"{i}.safetensors"
        save_in_order(tensors, path, metadata)
        blobs.append(path.read_bytes())
        with safe_open(path, "pt") as f:
            assert f.metadata() == metadata
        assert {k: v.tolist() for k, v in load_file(path).items()} == {
            k: v.tolist() for k, v in tensors.items()
        }
    assert blobs[0] == blobs[1]
    assert int.from_bytes(blobs[0][:8], "little") % 8 == 0
    assert blobs[0][8:].startswith('{"__metadata__":{"expert":"/m/é \\"x\\\\y","format":"pt"}'.encode())
