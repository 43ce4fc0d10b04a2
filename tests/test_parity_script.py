"""scripts/parity_mergekit.py without mergekit: its recipes, its parameter rule and its verdicts.

The script itself needs mergekit in its own venv (not available in CI); what is tested here is
everything it decides on its own: that every recipe renders to valid YAML naming only generated
models, that mergekit's gradient/filter rule is applied as mergekit does, and that the
comparison calls two hand-made checkpoints "agrees", "differs on purpose" or "DIFFERS" as it
should.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_ri.synthetic import LlamaShape, base_weights, expert_weights, save_checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("parity_mergekit", SCRIPTS / "parity_mergekit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    return module


FOLDERS = {name: Path(f"/models/{name}") for name in ("base", "expert1", "expert2", "expert3", "lora1")}


def test_every_recipe_renders_to_yaml_naming_generated_models(parity):
    recipes = {**parity.example_recipes(), **parity.method_recipes()}
    assert {"example:linear", "example:ties", "example:gradient-slerp", "example:multimerge"} <= set(recipes)
    for name, text in recipes.items():
        docs = parity.recipe_documents(parity.render(text, FOLDERS))
        assert docs, name
        for doc in docs:
            assert doc["merge_method"], name
            models = [m["model"] for m in doc.get("models", [])]
            models += [s["model"] for sl in doc.get("slices", []) for s in sl["sources"]]
            stages = {d.get("name") for d in docs}
            for model in models + ([doc["base_model"]] if "base_model" in doc else []):
                if isinstance(model, dict):  # mergekit's {model: ..., lora: ...}
                    model = f"{model['model']}+{model['lora']}"
                parts = model.split("+") if model not in stages else [model]
                for part in parts:  # a LoRA'd model: the base and the adapter
                    assert part in stages or part in {str(p.resolve()) for p in FOLDERS.values()}, (
                        name,
                        model,
                    )
    assert any("+" in parity.render(text, FOLDERS) for text in recipes.values())  # a model+lora row


def test_one_recipe_per_method_of_both_tools(parity):
    methods = {yaml.safe_load(t)["merge_method"] for t in parity.method_recipes().values()}
    mergekit_015 = {
        "arcee_fusion",
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "karcher",
        "linear",
        "model_stock",
        "multislerp",
        "nearswap",
        "nuslerp",
        "passthrough",
        "ram",
        "ramplus_tl",
        "sce",
        "slerp",
        "task_arithmetic",
        "ties",
    }
    assert mergekit_015 <= methods


def test_multi_stage_method_lists_every_stage(parity):
    text = parity.example_recipes()["example:multimerge"]
    assert parity.recipe_method(text) == "linear → slerp → dare_ties"


def test_parameters_follow_mergekits_gradient_and_filter_rule(parity):
    resolve = parity.resolve_param
    assert resolve(0.5, "model.layers.3.mlp.up_proj.weight", 40) == 0.5
    assert resolve([1, 0.7, 0.1], "model.layers.0.mlp.up_proj.weight", 40) == 1
    assert resolve([1, 0.7, 0.1], "model.layers.39.mlp.up_proj.weight", 40) == pytest.approx(0.1)
    assert resolve([0, 1], "model.layers.13.mlp.up_proj.weight", 40) == pytest.approx(13 / 39)
    assert resolve([0, 1], "model.embed_tokens.weight", 40) == 0  # outside the blocks: t = 0
    filtered = [{"filter": "mlp", "value": 0.5}, {"value": 0}]
    assert resolve(filtered, "model.layers.1.mlp.up_proj.weight", 40) == 0.5
    assert resolve(filtered, "model.layers.1.self_attn.q_proj.weight", 40) == 0
    assert resolve([{"filter": "*", "value": 0.7}], "lm_head.weight", 40) == 0.7
    recipe = {
        "models": [{"model": "a", "parameters": {"density": 0.3}}, {"model": "b"}],
        "parameters": {"density": 0.9},
    }
    assert parity.model_param(recipe, 0, "density", "x", 40) == 0.3
    assert parity.model_param(recipe, 1, "density", "x", 40) == 0.9
    assert parity.model_param(recipe, 1, "gamma", "x", 40, 0.01) == 0.01


def test_ulp_is_one_step_of_the_dtype(parity):
    values = torch.tensor([1.0, 1.5, 0.25, 3e-3])
    steps = parity.ulp(values, torch.bfloat16)
    assert torch.equal(steps, torch.tensor([2**-7, 2**-7, 2**-9, 2**-16]))
    for v, s in zip(values.tolist(), steps.tolist()):  # the next bf16 number is exactly one step away
        assert torch.tensor(v + s, dtype=torch.bfloat16).item() == pytest.approx(v + s) or s < 1e-4


SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, two experts and their fp32 weights."""
    root = tmp_path_factory.mktemp("family")
    base = base_weights(SHAPE, 0)
    weights = {"base": base, "expert1": expert_weights(base, 1), "expert2": expert_weights(base, 2)}
    folders = {name: save_checkpoint(root / name, w, SHAPE.config("bfloat16")) for name, w in weights.items()}
    return folders, weights


def write(folder: Path, weights: dict[str, torch.Tensor], dtype: str = "bfloat16") -> Path:
    return save_checkpoint(folder, weights, SHAPE.config(dtype), dtype)


def task_arithmetic(weights, scale=1.0):
    return {
        k: weights["base"][k]
        + scale
        * ((weights["expert1"][k] - weights["base"][k]) + (weights["expert2"][k] - weights["base"][k]))
        for k in weights["base"]
    }


def bf16(weights):
    return {k: v.to(torch.bfloat16).float() for k, v in weights.items()}


def row(parity, cmp, method="task_arithmetic", random=False):
    return parity.Row("r", method, parity.Run(True), parity.Run(True), cmp, random)


def test_identical_outputs_agree(parity, family, tmp_path):
    folders, weights = family
    merged = task_arithmetic(weights)
    a, b = write(tmp_path / "a", merged), write(tmp_path / "b", merged)
    cmp = parity.compare_deterministic(a, b, parity.Inputs(folders), ["expert1", "expert2"])
    assert cmp.max_rel == 0 and cmp.frac_differing == 0
    assert row(parity, cmp).verdict[0] == "agrees"


def test_one_step_of_rounding_agrees(parity, family, tmp_path):
    """mergekit rounds along the way: one bf16 step apart everywhere is still agreement."""
    folders, weights = family
    merged = bf16(task_arithmetic(weights))
    nudged = {k: (v + parity.ulp(v, torch.bfloat16)) for k, v in merged.items()}
    a, b = write(tmp_path / "a", merged), write(tmp_path / "b", nudged)
    cmp = parity.compare_deterministic(a, b, parity.Inputs(folders), ["expert1", "expert2"])
    assert cmp.frac_differing > 0.9
    assert row(parity, cmp).verdict[0] == "agrees"


def test_half_the_task_vector_differs(parity, family, tmp_path):
    """The silent divergence of issue 12 (base listed as an expert, normalize): caught."""
    folders, weights = family
    a = write(tmp_path / "a", task_arithmetic(weights))
    b = write(tmp_path / "b", task_arithmetic(weights, 0.5))
    cmp = parity.compare_deterministic(
        a, b, parity.Inputs(folders), ["expert1", "expert2"], "task_arithmetic"
    )
    assert cmp.max_rel > 0.2
    verdict, note = row(parity, cmp).verdict
    assert verdict == "DIFFERS" and "unexplained" in note


def test_ties_cut_differences_are_on_purpose_and_others_are_not(parity, family, tmp_path):
    """Entries at the k-th magnitude may differ (documented); an entry far from it may not."""
    folders, weights = family
    inputs = parity.Inputs(folders)
    recipe = {
        "merge_method": "ties",
        "models": [
            {"model": "e1", "parameters": {"density": 0.5}},
            {"model": "e2", "parameters": {"density": 0.5}},
        ],
    }
    name = "model.layers.0.mlp.up_proj.weight"
    base = inputs.get("base", name)
    taus = [inputs.get(e, name) - base for e in ("expert1", "expert2")]
    merged = bf16(task_arithmetic(weights))
    # at the cut of expert1: the entry whose |τ| is the k-th largest
    k = int(0.5 * taus[0].numel())
    at_cut = int(taus[0].abs().flatten().argsort(descending=True)[k - 1])
    far = int(taus[0].abs().flatten().argmax())
    for entry, expected in ((at_cut, "differs on purpose"), (far, "DIFFERS")):
        other = {k2: v.clone() for k2, v in merged.items()}
        other[name].view(-1)[entry] += 0.05
        a, b = write(tmp_path / f"a{entry}", merged), write(tmp_path / f"b{entry}", other)
        cmp = parity.compare_deterministic(a, b, inputs, ["expert1", "expert2"], "ties", recipe)
        assert row(parity, cmp, "ties").verdict[0] == expected, entry


def test_missing_tensor_and_layer_count_are_structural_differences(parity, family, tmp_path):
    folders, weights = family
    merged = task_arithmetic(weights)
    fewer = {k: v for k, v in merged.items() if k != "lm_head.weight"}
    a, b = write(tmp_path / "a", merged), write(tmp_path / "b", fewer)
    cmp = parity.compare_deterministic(a, b, parity.Inputs(folders), ["expert1", "expert2"])
    verdict, note = row(parity, cmp).verdict
    assert verdict == "DIFFERS" and "only in ri-merge" in note


def test_random_methods_compare_in_law(parity, family, tmp_path):
    """Two DARE-like merges with independent masks agree in law; a different density does not."""
    folders, weights = family
    base = weights["base"]

    def dare(density, seed):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, b in base.items():
            tau = weights["expert1"][k] - b
            keep = torch.rand(tau.shape, generator=g) < density
            out[k] = b + tau * keep / density
        return out

    inputs = parity.Inputs(folders)
    a = write(tmp_path / "a", dare(0.5, 101))  # not seeds 1, 2: those drew the task vectors
    same = parity.compare_random(a, write(tmp_path / "b", dare(0.5, 102)), inputs)
    assert row(parity, same, "dare_linear", True).verdict[0] == "agrees (in law)"
    other = parity.compare_random(a, write(tmp_path / "c", dare(0.9, 103)), inputs)
    verdict, note = row(parity, other, "dare_linear", True).verdict
    assert verdict == "DIFFERS" and "kept" in note


def test_refusals(parity):
    ok, refused = parity.Run(True), parity.Run(False, "error: nope")
    assert parity.Row("r", "m", refused, ok).verdict[0] == "DIFFERS"
    assert parity.Row("r", "m", ok, refused).verdict[0] == "mergekit refuses"
    assert parity.Row("r", "m", refused, refused).verdict[0] == "both refuse"
    assert (
        parity.first_error_line("Traceback...\n  File x\nValueError: bad t\n", "mergekit")
        == "ValueError: bad t"
    )
    assert parity.first_error_line("warning: x\nerror: r.yml: bad\n", "ri-merge") == "error: r.yml: bad"


def test_markdown_table_has_a_row_per_recipe(parity):
    rows = [parity.Row("a", "ties", parity.Run(True), parity.Run(False, "ValueError: x | y"))]
    table = parity.render_table(rows, markdown=True)
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| recipe |") and "x \\| y" in lines[2]


def test_out_puts_rows_into_the_page_and_keeps_its_prose(parity):
    """`--out docs/parity.md` after an `--only` run: that recipe's row is replaced where it stands
    (in whichever table), a new recipe's row joins the first table, everything else stays."""

    def table(*recipes: str, mark: str) -> str:
        rows = [
            parity.Row(r, "ties", parity.Run(True), parity.Run(False, f"ValueError: {mark}")) for r in recipes
        ]
        return parity.render_table(rows, markdown=True)

    old = table("a", "b", mark="old")
    page = f"# Parity\n\nProse.\n\n{old}\n\n## Vocabularies\n\nMore prose.\n\n{table('v', mark='old')}\n"
    updated = parity.update_page(page, table("b", "v", "c", mark="new"))
    lines = updated.splitlines()
    assert "Prose." in lines and "More prose." in lines and "## Vocabularies" in lines
    new_rows = {row.split("|")[1].strip(): row for row in table("b", "v", "c", mark="new").splitlines()[2:]}
    old_rows = {row.split("|")[1].strip(): row for row in old.splitlines()[2:]}
    first = lines.index(old.splitlines()[0])
    assert lines[first + 2 : first + 5] == [old_rows["a"], new_rows["b"], new_rows["c"]]
    assert new_rows["v"] in lines and lines.index(new_rows["v"]) > lines.index("More prose.")
    assert parity.update_page("", table("a", mark="new")) == table("a", mark="new") + "\n"


def test_vocabulary_recipes_render_and_rows_are_compared_by_token(parity, tmp_path):
    """The vocabulary rows name only the vocabulary models, and ri-merge's rows are put in
    mergekit's token order (padding rows stay) before the entry-by-entry comparison."""
    from tokenizers import Tokenizer, models

    folders = {**FOLDERS, **{name: Path(f"/models/{name}") for name in parity.VOCAB_MODELS}}
    for name, text in parity.vocab_recipes().items():
        doc = parity.recipe_documents(parity.render(text, folders))[0]
        assert "tokenizer_source" in doc or "tokenizer" in doc, name
        assert {m["model"] for m in doc["models"]} <= {str(p.resolve()) for p in folders.values()}, name
    ri, mk = tmp_path / "ri", tmp_path / "mk"
    for folder, ids in ((ri, {"x": 0, "y": 1, "z": 2}), (mk, {"x": 2, "y": 0, "z": 1})):
        folder.mkdir()
        Tokenizer(models.WordLevel(vocab=ids, unk_token="x")).save(str(folder / "tokenizer.json"))
    rows = torch.tensor([[0.0], [1.0], [2.0], [9.0]])  # ri-merge's rows of x, y, z and one padding row
    out = parity.in_mergekit_order({"lm_head.weight": rows, "norm.weight": rows}, ri, mk)
    assert out["lm_head.weight"].flatten().tolist() == [1.0, 2.0, 0.0, 9.0]  # mergekit's y, z, x, padding
    assert out["norm.weight"] is rows
