"""`--resume`: a merge killed before it publishes leaves its staging folder and journal; the next
run with --resume verifies the finished work units by hash, computes only the others and writes
the same bytes as an uninterrupted merge. A changed recipe or input is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli, tree_digest, write_recipe
from helpers import folder_bytes, interrupted_cli_merge, journal_units

from mergekit_ri import engine
from mergekit_ri.resume import JOURNAL
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=512, hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2)
UNIT = "8KiB"  # many units from a small model
FINGERPRINT = "--fingerprint-inputs"  # the card's content fingerprints, which a resume must keep


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a", "b", "c"], shape=SHAPE, dtype="bfloat16", shards=2)


def recipe(tmp_path: Path, models: dict[str, Path], method: str = "dare_ties", density: float = 0.4) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        merge_method=method,
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.5, "density": density}} for n in "abc"],
        out_shard_size="200KB",
        seed=7,
    )


class Crash(BaseException):
    """Stands for the process dying between writing the weights and publishing them."""


def crashed_merge(tmp_path: Path, path: Path, out: Path, monkeypatch, *extra: str) -> Path:
    """A merge whose process 'dies' once every weight is written: its staging folder, renamed as
    a dead process's, with every unit journaled."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = out.parent / f".{out.name}.ri-merge-partial-{dead.pid}"

    def die(staging: Path, *args: object) -> None:
        os.rename(staging, left)
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(engine, "write_heads", die)
        with pytest.raises(Crash):
            run_cli("merge", path, "-o", out, "--unit-size", UNIT, "-q", *extra)
    assert left.is_dir() and not out.exists()
    return left


def fingerprinted_crash(tmp_path: Path, models, monkeypatch) -> tuple[Path, Path, Path, Path]:
    """(recipe, the finished reference output, the output to resume, the crashed merge's staging
    folder), both merges with --fingerprint-inputs."""
    path = recipe(tmp_path, models)
    reference = tmp_path / "reference"
    assert run_cli("merge", path, "-o", reference, "--unit-size", UNIT, "-q", FINGERPRINT).code == 0
    out = tmp_path / "out"
    return path, reference, out, crashed_merge(tmp_path, path, out, monkeypatch, FINGERPRINT)


def test_resume_keeps_verified_units_and_recomputes_the_rest(tmp_path: Path, models, monkeypatch) -> None:
    path, reference, out, left = fingerprinted_crash(tmp_path, models, monkeypatch)
    # the process died after 6 units: the rest of the journal never reached the file
    journal = (left / JOURNAL).read_text().splitlines()
    total = len(journal) - 1
    assert total > 10
    (left / JOURNAL).write_text("\n".join(journal[:7]) + "\n" + journal[7][:20])  # and a torn line
    # unit 2's bytes were damaged after they were journaled: its hash no longer matches
    record = json.loads(journal[3])
    with open(left / record["shard"], "r+b") as f:
        f.seek(record["start"])
        f.write(bytes(b ^ 0xFF for b in f.read(4)))
    result = run_cli("merge", path, "-o", out, "--unit-size", UNIT, "--resume", "--json", FINGERPRINT)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    units = summary["units"]
    assert units["kept"] == [0, 1, 3, 4, 5]
    assert units["computed"] == [2] + list(range(6, total))
    assert "resuming" in result.stderr and "5 of" in result.stderr
    assert folder_bytes(out) == folder_bytes(reference)
    # the manifest's sha256 (kept units read back in their turn, the rest hashed as written) is hashlib's
    on_disk = {name: hashlib.sha256(data).hexdigest() for name, data in folder_bytes(out).items()}
    assert {e["name"]: e["sha256"] for e in summary["manifest"]} == on_disk
    # the kept units' inputs were not read again: their digests came from the journal
    assert (out / "README.md").read_text().count("| content `") == 4


def test_resume_without_the_inputs_digests_claims_no_content_fingerprint(
    tmp_path: Path, models, monkeypatch
) -> None:
    """A journal whose units carry no input digests: the card falls back to header fingerprints
    (it never lists a content hash of bytes it did not see); the weights are the same."""
    path, reference, out, left = fingerprinted_crash(tmp_path, models, monkeypatch)
    lines = (left / JOURNAL).read_text().splitlines()
    stripped = [lines[0]] + [
        json.dumps({k: v for k, v in json.loads(x).items() if k != "inputs"}) for x in lines[1:4]
    ]
    (left / JOURNAL).write_text("\n".join(stripped) + "\n")
    assert run_cli("merge", path, "-o", out, "--unit-size", UNIT, "--resume", "-q", FINGERPRINT).code == 0
    card = (out / "README.md").read_text()
    assert "| content `" not in card and card.count("| header only `") == 4
    weights = {k: v for k, v in folder_bytes(out).items() if k != "README.md"}
    assert weights == {k: v for k, v in folder_bytes(reference).items() if k != "README.md"}
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


def test_resume_refuses_another_recipe_and_keeps_the_staging(tmp_path: Path, models, monkeypatch) -> None:
    out = tmp_path / "out"
    left = crashed_merge(tmp_path, recipe(tmp_path, models), out, monkeypatch)
    changed = recipe(tmp_path, models, density=0.5)
    result = run_cli("merge", changed, "-o", out, "--unit-size", UNIT, "--resume")
    assert_user_error(result, f"cannot resume {out}", "the recipe differs", "without --resume")
    kept = [p for p in tmp_path.glob(".out.ri-merge-partial-*") if (p / JOURNAL).is_file()]
    assert len(kept) == 1 and not out.exists()
    assert run_cli("merge", changed, "-o", out, "-q").code == 0  # without --resume: starts over
    assert not left.exists() and not kept[0].exists()


def test_resume_refuses_changed_inputs(tmp_path: Path, models, monkeypatch) -> None:
    out = tmp_path / "out"
    path = recipe(tmp_path, models)
    crashed_merge(tmp_path, path, out, monkeypatch)
    weights = next(models["b"].glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten since
    before = tree_digest(*models.values())
    result = run_cli("merge", path, "-o", out, "--unit-size", UNIT, "--resume")
    assert_user_error(result, f"input {weights} changed")
    assert tree_digest(*models.values()) == before


def test_resume_with_nothing_to_resume_merges_it_all(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    result = run_cli("merge", recipe(tmp_path, models), "-o", out, "--resume", "--json")
    assert result.code == 0, result.stderr
    assert "no interrupted merge" in result.stderr
    assert json.loads(result.stdout)["units"]["kept"] == []
    assert not (out / JOURNAL).exists()


@pytest.mark.slow
def test_killed_merge_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """SIGKILL in the middle of a real merge; --resume computes only the units not journaled."""
    shape = LlamaShape(vocab=4000, hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4)
    models = make_family(tmp_path / "models", ["a", "b", "c"], shape=shape, dtype="bfloat16", shards=2)
    path = recipe(tmp_path, models, method="ties")
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run_cli("merge", path, "-o", reference, "--unit-size", "256KiB", "-q").code == 0
    args = [path, "-o", out, "--unit-size", "256KiB", "-q"]
    proc, _, staging = interrupted_cli_merge(args, out, signal.SIGKILL)  # killed once units are journaled
    assert proc.returncode == -signal.SIGKILL
    finished = journal_units(staging)
    result = run_cli("merge", path, "-o", out, "--unit-size", "256KiB", "--resume", "--json")
    assert result.code == 0, result.stderr
    units = json.loads(result.stdout)["units"]
    assert units["kept"] == finished and len(finished) >= 3
    assert sorted(units["kept"] + units["computed"]) == list(
        range(len(units["kept"]) + len(units["computed"]))
    )
    assert folder_bytes(out) == folder_bytes(reference)
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


@pytest.mark.slow
def test_layout_digest_is_the_same_in_every_process_for_relaid_vocabularies(tmp_path: Path) -> None:
    """A union vocabulary's tensors carry row maps and a lock: the digest a resume and a Ray
    worker compare must not see memory addresses."""
    pytest.importorskip("transformers")
    from helpers import make_vocab_models

    vocab = make_vocab_models(tmp_path / "vocab")
    path = write_recipe(
        tmp_path / "union.yaml",
        merge_method="linear",
        base_model=str(vocab["base"]),
        models=[{"model": str(vocab[n]), "parameters": {"weight": 1.0}} for n in ("base", "a", "b")],
        tokenizer_source="union",
    )
    script = (
        "import sys; import mergekit_ri as m; from mergekit_ri.resume import layout_digest;"
        "print(layout_digest(m.plan(sys.argv[1]).plan))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).parents[1])}
    digests = {
        subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1 and len(next(iter(digests))) == 64, digests
    out = tmp_path / "out"
    assert run_cli("merge", path, "-o", tmp_path / "reference", "-q").code == 0
    assert run_cli("merge", path, "-o", out, "--resume", "-q").code == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")
