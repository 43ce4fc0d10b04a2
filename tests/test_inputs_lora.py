"""LoRA adapters as inputs (`model: base+adapter`, or mergekit's {model:, lora:} mapping): the
adapter is applied per tensor while streaming, and the merge equals the merge of the expert
pre-merged by the formula W + scale·B·A; bad adapters are refused from their headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    TINY,
    assert_nothing_written,
    assert_user_error,
    read_any,
    read_checkpoint,
    run_cli,
    tree_digest,
    write_recipe,
)

from mergekit_ri.io.sources import TensorReader, load_source
from mergekit_ri.synthetic import LlamaShape, make_family, save_checkpoint, save_lora_adapter

TARGETS = [f"model.layers.{i}.{m}" for i in range(TINY.layers) for m in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a"], shape=TINY, dtype="float32")


def recipe(tmp_path: Path, base: Path, experts: list, method: str = "ties", name: str = "r") -> Path:
    fields = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": e, "parameters": {"weight": 0.7, "density": 0.5}} for e in experts],
    }
    return write_recipe(tmp_path / f"{name}.yaml", **fields)


CASES = {
    "plain": {},
    "rslora, patterns": {
        "use_rslora": True,
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {"q_proj": 3.0},
    },
    "fan_in_fan_out": {"fan_in_fan_out": True},
}


def scale_for(module: str, config: dict, r: int = 4, alpha: float = 8.0) -> float:
    alpha = next((v for k, v in config.get("alpha_pattern", {}).items() if module.endswith(k)), alpha)
    return alpha / (r**0.5 if config.get("use_rslora") else r)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["plus", "mapping"])
def test_lora_expert_merges_as_the_premerged_expert(tmp_path: Path, models, case: str, form: str) -> None:
    config = dict(CASES[case])
    base = read_any(models["base"])
    adapter = tmp_path / "adapter"
    merged = save_lora_adapter(
        adapter,
        base,
        TARGETS,
        embeddings=("model.embed_tokens",),
        replaced=("lm_head.weight",),
        **config,
    )
    if "alpha_pattern" in config:  # the helper takes one alpha: rescale q_proj's update by hand
        for module in TARGETS:
            if module.endswith("q_proj"):
                name = f"{module}.weight"
                ratio = scale_for(module, config) / scale_for("", {"use_rslora": True})
                merged[name] = base[name] + (merged[name] - base[name]) * ratio
    premerged = save_checkpoint(
        tmp_path / "premerged", merged, json.loads((models["base"] / "config.json").read_text()), "float32"
    )
    lora = (
        f"{models['base']}+{adapter}"
        if form == "plus"
        else {"model": str(models["base"]), "lora": str(adapter)}
    )
    before = tree_digest(models["base"], adapter)
    got = run_cli(
        "merge",
        recipe(tmp_path, models["base"], [str(models["a"]), lora], name="lora"),
        "-o",
        tmp_path / "lora",
    )
    want = run_cli(
        "merge", recipe(tmp_path, models["base"], [str(models["a"]), str(premerged)]), "-o", tmp_path / "pre"
    )
    assert got.code == 0 and want.code == 0, (got.stderr, want.stderr)
    assert tree_digest(models["base"], adapter) == before
    expected, result = read_checkpoint(tmp_path / "pre"), read_checkpoint(tmp_path / "lora")
    assert set(expected) == set(result)
    changed = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(result[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, read_any(models["base"])[name])
    assert changed > len(TARGETS)
    assert not any(p.name.startswith("adapter") for p in (tmp_path / "lora").iterdir())
    card = yaml.safe_load((tmp_path / "lora" / "README.md").read_text().split("---")[1])
    assert card["base_model"] == [str(models["base"]), str(models["a"]), str(adapter)]  # as mergekit's card


@pytest.mark.parametrize("transpose", [False, True])
def test_rows_of_an_adapted_tensor_are_rows_of_the_whole(tmp_path: Path, models, transpose: bool) -> None:
    base = read_any(models["base"])
    adapter = tmp_path / "adapter"
    save_lora_adapter(adapter, base, ["model.layers.0.mlp.up_proj"], fan_in_fan_out=transpose, seed=3)
    source = load_source(f"{models['base']}+{adapter}", "x")
    ref = source.tensors["model.layers.0.mlp.up_proj.weight"]
    with TensorReader() as reader:
        whole = reader.read(ref)
        assert whole.dtype == torch.float32 and whole.shape == base["model.layers.0.mlp.up_proj.weight"].shape
        parts = [reader.read(ref, (r, min(r + 7, whole.shape[0]))) for r in range(0, whole.shape[0], 7)]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-7)
        buffer = torch.empty(whole.shape)
        assert torch.equal(reader.read(ref, out=buffer), whole) and torch.equal(buffer, whole)


def test_dry_run_names_the_adapter(tmp_path: Path, models) -> None:
    adapter = tmp_path / "adapter"
    save_lora_adapter(adapter, read_any(models["base"]), TARGETS)
    path = recipe(tmp_path, models["base"], [str(models["a"]), f"{models['base']}+{adapter}"])
    report = json.loads(run_cli("merge", path, "-o", tmp_path / "o", "--dry-run", "--json").stdout)
    (note,) = report["inputs"].values()
    assert "LoRA adapter" in note and f"{len(TARGETS)} tensors adapted" in note and "scale 2" in note
    assert not (tmp_path / "o").exists()


def _bad_adapter(tmp_path: Path, models, kind: str) -> tuple[Path, tuple[str, ...]]:
    adapter = tmp_path / "adapter"
    base = read_any(models["base"])
    if kind == "other base":  # made for a model of other sizes
        other = make_family(
            tmp_path / "other",
            [],
            shape=LlamaShape(vocab=64, hidden=16, intermediate=24, layers=3, heads=2, kv_heads=1),
        )
        save_lora_adapter(adapter, read_any(other["base"]), ["model.layers.1.mlp.down_proj"])
        return adapter, ("model.layers.1.mlp.down_proj", "[16, 24]", "[16, 40]")
    if kind == "missing target":
        extra = {"model.layers.7.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"]}
        save_lora_adapter(adapter, {**base, **extra}, ["model.layers.7.self_attn.q_proj"])
        return adapter, ("model.layers.7.self_attn.q_proj.weight", "missing from the base")
    save_lora_adapter(adapter, base, TARGETS)
    if kind == "no adapter_config.json":
        (adapter / "adapter_config.json").unlink()
        return adapter, (str(adapter), "adapter_config.json")
    if kind == "dora":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        return adapter, ("adapter_config.json", "DoRA")
    if kind == "wrong rank":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
        return adapter, ("has lora_A [4, ", "r=8")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["other base", "missing target", "no adapter_config.json", "dora", "wrong rank"]
)
def test_bad_adapter_is_one_line_and_nothing_written(tmp_path: Path, models, kind: str) -> None:
    adapter, needles = _bad_adapter(tmp_path, models, kind)
    out = tmp_path / "out"
    path = recipe(tmp_path, models["base"], [str(models["a"]), f"{models['base']}+{adapter}"])
    assert_user_error(run_cli("merge", path, "-o", out), *needles)
    assert_nothing_written(out)


def test_missing_adapter_folder_and_bad_mapping(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    missing = recipe(tmp_path, models["base"], [str(models["a"]), f"{models['base']}+{tmp_path / 'nope'}"])
    assert_user_error(run_cli("merge", missing, "-o", out), "LoRA adapter path not found", "nope")
    mapping = recipe(
        tmp_path, models["base"], [str(models["a"]), {"model": str(models["base"]), "lorra": "x"}]
    )
    assert_user_error(run_cli("merge", mapping, "-o", out), "lorra")
    assert_nothing_written(out)


@pytest.mark.parametrize("stored", ["safetensors", "bin"])
def test_lora_on_a_bf16_base_enters_the_merge_in_fp32(tmp_path: Path, stored: str) -> None:
    """A bf16 base's adapted tensors are W + scale·B·A in fp32 (not rounded to bf16 first), as the
    pre-merged fp32 expert; an adapter saved as adapter_model.bin reads the same."""
    models = make_family(tmp_path / "models", ["a"], shape=TINY, dtype="bfloat16")
    base = read_any(models["base"])
    adapter = tmp_path / "adapter"
    merged = save_lora_adapter(adapter, base, TARGETS, seed=5)
    if stored == "bin":
        from safetensors.torch import load_file

        torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
        (adapter / "adapter_model.safetensors").unlink()
    config = json.loads((models["base"] / "config.json").read_text())
    premerged = save_checkpoint(tmp_path / "premerged", merged, config, "float32")
    lora = f"{models['base']}+{adapter}"
    got = run_cli(
        "merge", recipe(tmp_path, models["base"], [str(models["a"]), lora], name="l"), "-o", tmp_path / "l"
    )
    want = run_cli(
        "merge", recipe(tmp_path, models["base"], [str(models["a"]), str(premerged)]), "-o", tmp_path / "p"
    )
    assert got.code == 0 and want.code == 0, (got.stderr, want.stderr)
    assert "stores F32" not in got.stderr, got.stderr
    expected, result = read_checkpoint(tmp_path / "p"), read_checkpoint(tmp_path / "l")
    for name, tensor in expected.items():
        assert result[name].dtype == torch.bfloat16 and torch.equal(result[name], tensor), name


def test_lora_bias_adds_the_scaled_bias(tmp_path: Path) -> None:
    """lora_bias (PEFT's `lora_B.bias`, which extract-lora writes for a module with a bias):
    b + scale·lora_B.bias, rows read alone equal to the whole."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = {
        "lin.weight": torch.randn(6, 5, generator=generator),
        "lin.bias": torch.randn(6, generator=generator),
    }
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    factors = {
        "base_model.model.lin.lora_A.weight": torch.randn(2, 5, generator=generator),
        "base_model.model.lin.lora_B.weight": torch.randn(6, 2, generator=generator),
        "base_model.model.lin.lora_B.bias": torch.randn(6, generator=generator),
    }
    (tmp_path / "adapter").mkdir()
    save_file(factors, tmp_path / "adapter" / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "lora_bias": True}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    source = load_source(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}", "x")
    scale = 3 / 2
    with TensorReader() as reader:
        bias = reader.read(source.tensors["lin.bias"])
        weight = reader.read(source.tensors["lin.weight"])
        assert torch.equal(reader.read(source.tensors["lin.bias"], (2, 5)), bias[2:5])
    torch.testing.assert_close(bias, base["lin.bias"] + scale * factors["base_model.model.lin.lora_B.bias"])
    delta = factors["base_model.model.lin.lora_B.weight"] @ factors["base_model.model.lin.lora_A.weight"]
    torch.testing.assert_close(weight, base["lin.weight"] + scale * delta)
