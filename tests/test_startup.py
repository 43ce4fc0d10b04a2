"""Start-up: the commands that read only YAML and headers (`--help`, `version`, `methods`,
`validate`, `--dry-run`) import no torch, and print exactly what they print with torch loaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_any, write_recipe

from mergekit_ri.io.sources import ST_DTYPES, ST_ITEMSIZE
from mergekit_ri.lazy import LazyModule
from mergekit_ri.synthetic import save_lora_adapter

# Runs each command line of argv[2] (JSON) through the CLI in this one fresh interpreter, after
# importing torch first when argv[1] says so; prints each one's exit code, output and whether
# torch was imported by then.
PROBE = r"""
import contextlib, io, json, sys
if sys.argv[1] == "torch":
    import torch  # noqa: F401
from mergekit_ri.cli import main
results = []
for args in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "torch": "torch" in sys.modules, "pydantic": "pydantic" in sys.modules})
print(json.dumps(results))
"""


def probe(commands: list[list[str]], preload_torch: bool) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "torch" if preload_torch else "-", json.dumps(commands)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def header_only_commands(tmp_path: Path, family) -> list[tuple[list[str], int]]:
    """(command line, exit code): every header-only path, sliced, multi-stage and LoRA recipes,
    and refusals (an unknown method; a damaged header, found from the header)."""
    models = [{"model": str(family[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in "abc"]
    ties = write_recipe(
        tmp_path / "ties.yaml", merge_method="ties", base_model=str(family["base"]), models=models
    )
    sliced = write_recipe(
        tmp_path / "sliced.yaml",
        merge_method="passthrough",
        slices=[{"sources": [{"model": str(family[n]), "layer_range": [0, 2]}]} for n in "ab"],
    )
    stages = tmp_path / "stages.yaml"
    first = {"name": "soup", "merge_method": "linear", "models": [{"model": str(family[n])} for n in "ab"]}
    final = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": "soup"}],
    }
    stages.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in (first, final)))
    base = read_any(family["base"])
    save_lora_adapter(tmp_path / "lora", base, [n[: -len(".weight")] for n in base if "q_proj" in n])
    lora = write_recipe(
        tmp_path / "lora.yaml",
        merge_method="task_arithmetic",
        base_model=str(family["base"]),
        models=[{"model": f"{family['base']}+{tmp_path / 'lora'}"}, {"model": str(family["a"])}],
    )
    unknown = write_recipe(tmp_path / "unknown.yaml", merge_method="tie", models=models)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    broken = write_recipe(
        tmp_path / "broken.yaml", merge_method="linear", models=[{"model": str(damaged)}, *models[:1]]
    )
    return [
        (["--help"], 0),
        (["version"], 0),
        (["methods"], 0),
        (["methods", "--json"], 0),
        (["validate", str(ties)], 0),
        (["validate", str(ties), "--json"], 0),
        ([str(ties), "--dry-run"], 0),
        (["merge", str(ties), "--dry-run", "--json"], 0),
        ([str(sliced), "--dry-run"], 0),
        ([str(stages), "--dry-run"], 0),
        (["validate", str(lora)], 0),
        (["validate", str(unknown)], 2),
        ([str(broken), "--dry-run"], 2),
    ]


def test_header_only_commands_import_no_torch_and_print_what_they_print_with_it(tmp_path, family):
    cases = header_only_commands(tmp_path, family)
    commands = [args for args, _ in cases]
    lazy, eager = probe(commands, preload_torch=False), probe(commands, preload_torch=True)
    for (args, code), without, with_torch in zip(cases, lazy, eager):
        assert not without["torch"], f"ri-merge {' '.join(args)} imported torch"
        assert not without["pydantic"], f"ri-merge {' '.join(args)} imported pydantic"
        assert with_torch["torch"]  # the probe sees torch when it is there
        assert without["code"] == with_torch["code"] == code, (args, without["stderr"])
        assert without["stdout"] == with_torch["stdout"], args
        assert without["stderr"] == with_torch["stderr"], args
        assert without["stdout"] or without["stderr"], args  # each said something
    assert "ties" in json.loads(lazy[3]["stdout"]) and json.loads(lazy[5]["stdout"])["valid"]
    assert "unknown merge_method 'tie'" in lazy[-2]["stderr"] and "corrupt" in lazy[-1]["stderr"]


# Runs one ri-merge command line (argv[2], JSON) in this fresh interpreter and prints which of
# the modules named in argv[1] (JSON) it imported.
LOADED = r"""
import contextlib, io, json, sys
from mergekit_ri.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        main(json.loads(sys.argv[2]))
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)))
"""

HEAVY = ["torch", "numpy", "transformers", "huggingface_hub", "safetensors", "rich", "pydantic", "yaml"]


def loaded_modules(args: list[str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", LOADED, json.dumps(HEAVY), json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(proc.stdout))


def test_the_short_commands_import_only_what_they_use(tmp_path, family):
    """Start-up is mostly imports: none of these commands needs rich when its output is not a
    terminal (it is imported when something is styled), `methods` no recipe's YAML; none pydantic
    (typer's coercion of plain values and the recipe's schema do without it), torch, numpy or
    the Hub."""
    recipe = write_recipe(
        tmp_path / "ties.yaml",
        merge_method="ties",
        base_model=str(family["base"]),
        models=[{"model": str(family[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in "ab"],
    )
    never = {"torch", "numpy", "transformers", "huggingface_hub", "safetensors", "pydantic"}
    expected = [  # (command line, what it needs of HEAVY)
        (["--help"], set()),
        (["version"], set()),
        (["methods"], set()),  # bold method names on a terminal only (see below)
        (["validate", str(recipe)], {"yaml"}),  # the recipe
        ([str(recipe), "--dry-run"], {"yaml"}),  # and the plan (its table drawn without rich)
    ]
    for args, needed in expected:
        loaded = loaded_modules(args)
        assert loaded == needed, (args, loaded)
        assert not loaded & never


def test_methods_are_styled_on_a_terminal_and_plain_otherwise():
    """The same text either way; bold names and dim citations where styles can show."""
    run = [sys.executable, "-m", "mergekit_ri.cli", "methods"]
    plain = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    styled = subprocess.run(
        run,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "1000"},
    ).stdout
    assert "\x1b[1m" not in plain and "\x1b[1mties\x1b[0m" in styled
    assert re.sub(r"\x1b\[[0-9;]*m", "", styled) == plain


def test_safetensors_dtypes_are_read_without_torch_and_map_to_torch_on_use():
    """`ST_DTYPES` acts as the dict of torch dtypes it was; header checks use `ST_ITEMSIZE`."""
    expected = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    assert dict(ST_DTYPES) == expected and sorted(ST_DTYPES) == sorted(expected)
    assert {code: dtype.itemsize for code, dtype in expected.items()} == ST_ITEMSIZE
    assert "BF16" in ST_DTYPES and "F8_E4M3" not in ST_DTYPES and 3 not in ST_DTYPES
    with pytest.raises(KeyError):
        ST_DTYPES["F8_E4M3"]


def test_the_lazy_module_imports_on_first_use_then_is_the_real_one():
    code = (
        "import sys; from mergekit_ri.methods import stock; from mergekit_ri.io import sources; "
        "before = 'torch' in sys.modules; dtype = sources.ST_DTYPES['BF16']; import torch; "
        "from mergekit_ri import lazy; "
        "print(before, dtype is torch.bfloat16, stock.torch is torch, sources.torch is torch, lazy.torch is torch)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "True", "True", "True", "True"]
    stray = LazyModule("json")  # held under another name: forwarded
    assert stray.dumps([1]) == "[1]" and "lazy module 'json'" in repr(stray)
    with pytest.raises(AttributeError):
        stray.no_such_function  # noqa: B018
    with pytest.raises(AttributeError):  # dunder probes (copy, pickle, inspect) do not import
        stray.__wrapped__  # noqa: B018


def test_an_ri_dry_run_reads_headers_only_and_finds_the_entries_a_merge_uses(tmp_path, monkeypatch):
    """`--dry-run` of a `resolve_interference:` recipe imports neither torch nor transformers, says
    what it says with them loaded, and names the cache entries that RI itself then uses."""
    pytest.importorskip("transformers")
    from helpers import EXPERTS, make_classifiers, ri_recipe, vit
    from safetensors.torch import save_file

    from mergekit_ri.api import MergeOptions
    from mergekit_ri.api import plan as make_plan
    from mergekit_ri.ri import prepare

    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache"))  # the probes inherit it
    vits = make_classifiers(tmp_path / "vit", vit, [3, 5, 2])
    aux = tmp_path / "aux.safetensors"
    save_file({"inputs": torch.rand(8, 1, 8, 8)}, aux)
    images = tmp_path / "pictures"
    images.mkdir()
    (images / "a.png").write_bytes(b"not decoded by a dry run")
    recipes = {}
    for name, source in (("file", aux), ("images", images), ("gaussian", "gaussian")):
        (tmp_path / name).mkdir()  # ri_recipe names the file after the method
        recipes[name] = ri_recipe(tmp_path / name, vits, source, steps=1)
    commands = [[str(r), "--dry-run"] for r in recipes.values()]
    commands += [[str(recipes["file"]), "--dry-run", "--json"], ["validate", str(recipes["file"])]]
    lazy, eager = probe(commands, preload_torch=False), probe(commands, preload_torch=True)
    for args, without, with_torch in zip(commands, lazy, eager):
        assert without["code"] == with_torch["code"] == 0, (args, without["stderr"])
        assert not without["torch"], f"ri-merge {' '.join(args)} imported torch"
        assert not without["pydantic"], f"ri-merge {' '.join(args)} imported pydantic"
        assert (without["stdout"], without["stderr"]) == (with_torch["stdout"], with_torch["stderr"]), args
    assert "RI: 0 of 3 experts already adapted" in lazy[0]["stdout"]
    assert not loaded_modules(commands[0]) & {"torch", "transformers", "numpy"}
    status = json.loads(lazy[3]["stdout"])["ri"]
    assert sorted(status["adapted"]) == EXPERTS and status["cache_hits"] == status["trained"] == []
    # the entries are the ones the merge's RI computes from the loaded data (same fingerprints)
    for name in ("file", "gaussian"):
        recipe = make_plan(recipes[name], options=MergeOptions()).recipe
        context = prepare.ri_context(recipe, recipes[name].parent)
        keys, _ = prepare.entry_keys(recipe, context, prepare.ri_settings(recipe))
        _, folders = prepare.entry_folders(recipe, keys)
        dry = make_plan(recipes[name], options=MergeOptions()).ri
        assert dry is not None and dry.adapted == {k: str(v) for k, v in folders.items()}, name
    assert not (tmp_path / "cache").exists()


def test_plain_option_values_are_what_typers_own_coercion_makes_of_them(tmp_path):
    """Every parameter of every command: where `cli_typer` answers a value itself (without
    pydantic), typer's own coercion accepts it and gives the same value of the same type."""
    import typer.main

    from mergekit_ri.cli import app
    from mergekit_ri.cli_typer import _UNCHANGED, plain_value

    readable = tmp_path / "recipe.yaml"
    readable.write_text("x")
    samples = ["4", "-1", "0", "64", "65", "1.5", "x", "cuda:0", str(readable), str(tmp_path / "nope")]
    group = typer.main.get_command(app)
    answered = 0
    for command in group.commands.values():
        ctx = command.make_context(command.name, ["--help"], resilient_parsing=True)
        for param in command.params:
            runtime = param.get_runtime_param()
            if not hasattr(runtime, "_typer_runtime"):
                pytest.skip("this typer coerces with click's types (no pydantic adapters)")
            for value in [param.default, *samples]:
                plain = plain_value(runtime._annotation, runtime._info, value)
                if plain is _UNCHANGED:
                    continue
                theirs = runtime._typer_runtime().coerce(value, param=param, ctx=ctx)
                assert plain == theirs and type(plain) is type(theirs), (command.name, param.name, value)
                answered += 1
    assert answered > 100, answered  # most of what a command line holds is answered without pydantic
