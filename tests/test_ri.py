"""RI on tiny classifier experts: the objective, what trains, the cache, the CLI, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint, run_cli, write_recipe
from helpers import EXPERTS, make_classifiers, ri_recipe, vit
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from mergekit_ri.heads import looks_like_head  # noqa: E402
from mergekit_ri.ri.adapt import RISettings, adapt_expert, head_module_name, kl_teacher_student  # noqa: E402


@pytest.fixture
def vits(tmp_path, monkeypatch):
    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache"))
    return make_classifiers(tmp_path / "vit", vit, [3, 5, 2], drift=0.3)  # enough drift to interfere


@pytest.fixture
def aux(tmp_path) -> Path:
    path = tmp_path / "aux.safetensors"
    save_file({"inputs": torch.rand(96, 1, 8, 8)}, path)
    return path


def load(folder: Path):
    return transformers.AutoModelForImageClassification.from_pretrained(folder).eval()


def run_adaptation(vits, alpha: float, steps: int, lr: float = 1e-3):
    experts = [load(vits[e]) for e in EXPERTS]
    base = transformers.AutoModelForImageClassification.from_pretrained(
        vits["base"], config=experts[0].config, ignore_mismatched_sizes=True
    ).eval()
    head = head_module_name(experts[0], looks_like_head)
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.rand(32, 1, 8, 8, generator=generator)} for _ in range(steps)]
    log: list[tuple[float, float]] = []
    adapted = adapt_expert(
        experts[0],
        base,
        [e.get_submodule(head) for e in experts[1:]],
        head,
        batches,
        RISettings(steps, lr, 0.0, alpha, 32),
        torch.device("cpu"),
        lambda s, l1, l2: log.append((l1, l2)),
    )
    return experts, base, adapted, log


def test_kl_is_teacher_weighted_and_zero_on_itself():
    teacher, student = torch.randn(5, 4), torch.randn(5, 4)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kl_teacher_student(teacher, student), expected)
    assert kl_teacher_student(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_is_zero_at_step_zero_with_alpha_zero(vits):
    _, _, _, log = run_adaptation(vits, alpha=0.0, steps=3)
    assert log[0][0] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_l2_goes_toward_zero_while_l1_stays_small(vits):
    experts, base, adapted, log = run_adaptation(vits, alpha=1.0, steps=60)
    l1 = [a for a, _ in log]
    l2 = [b for _, b in log]
    assert sum(l2[-5:]) / 5 < 0.3 * l2[0], l2
    assert max(l1) < 0.5 * l2[0], (l1, l2[0])
    total = [a + b for a, b in log]
    assert sum(total[-5:]) < sum(total[:5])
    # only the backbone moved; the head and the inputs did not
    original = load(Path(vits["e0"]))
    for (name, p), (_, q) in zip(adapted.state_dict().items(), original.state_dict().items()):
        if name.startswith("classifier."):
            assert torch.equal(p, q), name
    moved = [
        n
        for (n, p), (_, q) in zip(adapted.state_dict().items(), original.state_dict().items())
        if not torch.equal(p, q)
    ]
    assert moved and all(not n.startswith("classifier.") for n in moved)
    for (name, p), (_, q) in zip(experts[0].state_dict().items(), original.state_dict().items()):
        assert torch.equal(p, q), f"the teacher {name} changed"


@pytest.mark.slow
def test_cli_adapts_caches_and_merges_the_adapted_experts(tmp_path, vits, aux):
    base_bytes = (vits["base"] / "model.safetensors").read_bytes()
    first = run_cli("merge", ri_recipe(tmp_path, vits, aux), "-o", tmp_path / "out", "--json")
    assert first.code == 0, first.stderr
    status = json.loads(first.stdout)["ri"]
    assert sorted(status["trained"]) == EXPERTS and status["cache_hits"] == []
    # the merge is the method applied to the adapted experts, heads kept per expert
    adapted = {e: Path(status["adapted"][e]) for e in EXPERTS}
    plain = write_recipe(
        tmp_path / "plain.yaml",
        merge_method="ties",
        base_model=str(vits["base"]),
        heads="auto",
        models=[{"model": str(adapted[e])} for e in EXPERTS],
        out_dtype="float32",
    )
    assert run_cli("merge", plain, "-o", tmp_path / "plain", "-q").code == 0
    merged, expected = read_checkpoint(tmp_path / "out"), read_checkpoint(tmp_path / "plain")
    assert set(merged) == set(expected) and all(torch.equal(merged[n], expected[n]) for n in merged)
    index = json.loads((tmp_path / "out" / "heads" / "index.json").read_text())
    for e in EXPERTS:
        original, written = (
            load_file(vits[e] / "model.safetensors"),
            load_file(tmp_path / "out" / "heads" / index["heads"][e]["file"]),
        )
        assert all(torch.equal(original[n], written[n]) for n in written)
        backbone_changed = load_file(adapted[e] / "model.safetensors")
        assert not torch.equal(
            backbone_changed["vit.encoder.layer.0.output.dense.weight"],
            original["vit.encoder.layer.0.output.dense.weight"],
        )
    assert (vits["base"] / "model.safetensors").read_bytes() == base_bytes
    # a second merge, with another method, finds every adapted expert in the cache
    again = run_cli(
        "merge", ri_recipe(tmp_path, vits, aux, method="task_arithmetic"), "-o", tmp_path / "ta", "--json"
    )
    assert again.code == 0, again.stderr
    status = json.loads(again.stdout)["ri"]
    assert sorted(status["cache_hits"]) == EXPERTS and status["trained"] == []


def test_dry_run_trains_nothing(tmp_path, vits, aux):
    result = run_cli("merge", ri_recipe(tmp_path, vits, aux), "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["ri"]["trained"] == []
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # trains RI experts
def test_gaussian_auxiliary_data(tmp_path, vits):
    result = run_cli("merge", ri_recipe(tmp_path, vits, "gaussian", steps=3), "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr


@pytest.mark.parametrize(
    "inputs, needle",
    [
        ({"inputs": torch.rand(8, 3, 8, 8)}, "[8, 3, 8, 8]"),
        ({"inputs": torch.rand(0, 1, 8, 8)}, "empty"),
        ({"pixels": torch.rand(8, 1, 8, 8)}, "no tensor 'inputs'"),
    ],
)
def test_bad_auxiliary_data_is_a_clear_error(tmp_path, vits, inputs, needle):
    path = tmp_path / "bad.safetensors"
    save_file(inputs, path)
    result = run_cli("merge", ri_recipe(tmp_path, vits, path), "-o", tmp_path / "out")
    assert result.code == 2 and needle in result.stderr and str(path) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_missing_auxiliary_file(tmp_path, vits):
    result = run_cli(
        "merge", ri_recipe(tmp_path, vits, tmp_path / "nope.safetensors"), "-o", tmp_path / "out"
    )
    assert result.code == 2 and "nope.safetensors" in result.stderr


def test_models_without_task_heads_are_refused_with_the_reason(tmp_path, recipe_for, aux):
    recipe = recipe_for("ties", resolve_interference={"auxiliary_data": str(aux), "steps": 1})
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert result.code == 2 and "heads" in result.stderr, result.stderr


@pytest.mark.slow
def test_verbose_reports_interference_before_and_after_ri(tmp_path, vits, aux):
    recipe = ri_recipe(tmp_path, vits, aux, method="task_arithmetic", steps=40)
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "-v", "--json")
    assert result.code == 0, result.stderr
    xi = json.loads(result.stdout)["ri"]["interference"]
    assert xi["without_ri"] > 0 and xi["with_ri"] > 0
    assert xi["with_ri"] < xi["without_ri"]  # RI pulls each expert toward the base through the other heads
    assert "interference" in result.stderr
