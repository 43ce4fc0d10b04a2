"""`ri-merge extract-lora`: a model's difference from its base as a PEFT LoRA adapter, by
truncated SVD per module (mergekit-extract-lora's rule, plus an energy threshold); the adapter
read back as `base+adapter` gives the model again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_nothing_written, assert_user_error, read_any, run_cli, tree_digest
from safetensors.torch import load_file

from mergekit_ri.extract_lora import ExtractOptions, decompose
from mergekit_ri.io.sources import TensorReader, load_source
from mergekit_ri.synthetic import LlamaShape, make_family, save_checkpoint, save_lora_adapter

TARGETS = [f"model.layers.{i}.{m}" for i in range(TINY.layers) for m in ("self_attn.q_proj", "mlp.up_proj")]


@pytest.fixture
def tuned(tmp_path: Path) -> dict[str, Path]:
    """A base, a dense expert, and `ft`: the base plus a rank-3 update on some projections and
    on the input embedding."""
    models = make_family(tmp_path / "models", ["dense"], shape=TINY, dtype="float32")
    base = read_any(models["base"])
    merged = save_lora_adapter(
        tmp_path / "made", base, TARGETS, r=3, alpha=3.0, embeddings=("model.embed_tokens",)
    )
    config = json.loads((models["base"] / "config.json").read_text())
    models["ft"] = save_checkpoint(tmp_path / "models" / "ft", merged, config, "float32")
    return models


def read_back(reference: str) -> dict[str, torch.Tensor]:
    source = load_source(reference, "x")
    with TensorReader() as reader:
        return {name: reader.read(ref).float() for name, ref in source.tensors.items()}


@pytest.mark.parametrize("embed_lora", [False, True])
def test_extracted_adapter_gives_the_model_back(tmp_path: Path, tuned, embed_lora: bool) -> None:
    out = tmp_path / "adapter"
    before = tree_digest(tuned["ft"], tuned["base"])
    args = ["--model", tuned["ft"], "--base-model", tuned["base"], "-o", out, "--max-rank", "8", "--json"]
    result = run_cli("extract-lora", *args, *(["--embed-lora"] if embed_lora else []))
    assert result.code == 0, result.stderr
    assert tree_digest(tuned["ft"], tuned["base"]) == before
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    for embedding in ("embed_tokens", "lm_head"):  # saved whole, unless decomposed (mergekit's rule)
        assert (embedding in config["modules_to_save"]) != embed_lora
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert ("base_model.model.model.embed_tokens.lora_embedding_A" in keys) == embed_lora
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    expected, got = read_any(tuned["ft"]), read_back(f"{tuned['base']}+{out}")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert json.loads(result.stdout)["worst_relative_error"] < 1e-5


def test_energy_threshold_sets_each_rank_and_the_reported_error_is_the_real_one(
    tmp_path: Path, tuned
) -> None:
    out = tmp_path / "adapter"
    args = ["--model", tuned["dense"], "--base-model", tuned["base"], "-o", out, "--energy", "0.8", "--json"]
    result = run_cli("extract-lora", *args)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    base, dense = read_any(tuned["base"]), read_any(tuned["dense"])
    worst = 0.0
    for module in TARGETS:
        tau = (dense[f"{module}.weight"] - base[f"{module}.weight"]).double()
        lora_a = factors[f"base_model.model.{module}.lora_A.weight"].double()
        lora_b = factors[f"base_model.model.{module}.lora_B.weight"].double()
        rank = lora_a.shape[0]
        assert config["rank_pattern"].get(module, config["r"]) == rank
        s = torch.linalg.svdvals(tau)
        share = s.square().cumsum(0) / s.square().sum()
        assert share[rank - 1] >= 0.8 - 1e-9 and (rank == 1 or share[rank - 2] < 0.8), module
        assert rank < min(tau.shape)  # a dense update keeps fewer directions than it has
        worst = max(worst, float((tau - lora_b @ lora_a).norm() / tau.norm()))
    assert report["worst_relative_error"] >= worst - 1e-6 and worst <= (1 - 0.8) ** 0.5 + 1e-6


@pytest.mark.parametrize("distribute", [True, False])
def test_decompose_is_the_best_rank_k_approximation(distribute: bool) -> None:
    tau = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    lora_a, lora_b, error = decompose(tau, ExtractOptions(max_rank=4, distribute_scale=distribute))
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close((lora_b @ lora_a).double(), best, rtol=0, atol=1e-5)
    assert abs(error - float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())) < 1e-6
    if not distribute:  # mergekit: B = U, A = S·Vᴴ
        torch.testing.assert_close(
            (lora_b.T @ lora_b).double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0
        )
    lora_a, _, _ = decompose(tau, ExtractOptions(max_rank=8, sv_epsilon=float(s[2]) + 1e-4))
    assert lora_a.shape[0] == 2  # singular values at or below sv_epsilon dropped


def test_bad_inputs_and_options_are_one_line_and_nothing_written(tmp_path: Path, tuned) -> None:
    out = tmp_path / "adapter"
    other = make_family(
        tmp_path / "other",
        [],
        shape=LlamaShape(vocab=64, hidden=16, intermediate=24, layers=3, heads=2, kv_heads=1),
    )
    common = ["--base-model", tuned["base"], "-o", out]
    assert_user_error(
        run_cli("extract-lora", "--model", other["base"], *common), "model.layers.0.mlp.", "shape [16, 24]"
    )
    assert_user_error(run_cli("extract-lora", "--model", tuned["ft"], *common, "--energy", "1.5"), "--energy")
    assert_user_error(
        run_cli("extract-lora", "--model", tuned["ft"], *common, "-e", "(unclosed"), "--exclude-regex"
    )
    assert_nothing_written(out)
    inside = run_cli(
        "extract-lora", "--model", tuned["ft"], "--base-model", tuned["base"], "-o", tuned["ft"], "--force"
    )
    assert_user_error(inside, "input")
