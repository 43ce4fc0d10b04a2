#!/usr/bin/env python
"""Wall time and peak memory of `ri-merge` against mergekit on synthetic Llama-style models.

    python scripts/bench_speed.py [--params 250M] [--experts 3] [--methods ties,task_arithmetic]
                                  [--reps 3] [--workdir bench-data] [--mergekit PATH] [--markdown] [--check]
    python scripts/bench_speed.py --memory [--params 250M,1B] [--caps default,512MiB,256MiB]

Generates (once, cached in the workdir) a bf16 base and N experts of about the requested size,
writes one recipe per method that both tools accept, warms the page cache, then runs each tool
`--reps` times, alternating which goes first, and reports the median wall time and the peak
RSS of the child process. The "floor" is what no merge can beat: starting Python and importing
torch, plus reading every input byte once from the page cache.

    python scripts/bench_speed.py --startup [--reps 10] [--markdown]

times the short commands instead (`--help`, `version`, `methods`, `validate`, `--dry-run` and a
merge of a tiny model, against `mergekit-yaml --help` and its tiny merge): medians of wall and
CPU time, and how many modules each loads, torch or not.

`--memory` prints the memory table instead: for each model size, method and `--max-memory` cap,
the peak `--dry-run` plans against the peak RSS measured, the RSS of a process that has only
imported ri-merge's engine (the baseline the cap does not count), and whether the output is
byte-identical to the uncapped merge's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from mergekit_ri.synthetic import (
    LlamaShape,
    base_weights,
    expert_weights,
    finetune_weights,
    make_family,
    save_checkpoint,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_venv import find_mergekit  # noqa: E402  (shared with parity_mergekit.py)

DTYPE = "bfloat16"
VOCAB = 32000
LAYERS = 16
HIDDEN_LADDER = (128, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)
CHUNK = 16 * 1024 * 1024
SHARDS = 2
SEED = 0
DONE_MARK = ".complete"


# ---------------------------------------------------------------- sizes and shapes


def parse_count(text: str) -> int:
    """'250M' -> 250_000_000; also K, B and plain integers."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def human_count(n: int) -> str:
    """271_000_000 -> '271M'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def shape_params(shape: LlamaShape) -> int:
    """Number of parameters of a LlamaShape."""
    return sum(math.prod(dims) for dims in shape.tensor_shapes().values())


def llama_shape(hidden: int) -> LlamaShape:
    """A small-Llama shape: intermediate ~2.75x hidden, 64-wide heads, no GQA, untied lm_head."""
    intermediate = round(hidden * 2.75 / 64) * 64
    heads = max(1, hidden // 64)
    return LlamaShape(
        vocab=VOCAB, hidden=hidden, intermediate=intermediate, layers=LAYERS, heads=heads, kv_heads=heads
    )


def shape_for(params: int) -> LlamaShape:
    """The ladder shape whose parameter count is closest to `params` (in ratio).

    250M -> hidden 1024, intermediate 2816 (271M); 1B -> hidden 2048, intermediate 5632 (953M).
    """
    return min((llama_shape(h) for h in HIDDEN_LADDER), key=lambda s: abs(math.log(shape_params(s) / params)))


def shape_key(shape: LlamaShape) -> str:
    """A folder name identifying a shape."""
    return f"llama-h{shape.hidden}-i{shape.intermediate}-l{shape.layers}-v{shape.vocab}-kv{shape.kv_heads}"


# ---------------------------------------------------------------- synthetic models


def model_names(experts: int) -> list[str]:
    """'base' followed by the expert folder names."""
    return ["base"] + [f"expert{i + 1}" for i in range(experts)]


def is_complete(folder: Path) -> bool:
    """Whether a cached checkpoint was fully written."""
    return (folder / DONE_MARK).exists()


def write_model(folder: Path, weights: dict[str, torch.Tensor], shape: LlamaShape) -> None:
    """Save one checkpoint and mark it complete."""
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(folder, weights, shape.config(DTYPE), DTYPE, shards=SHARDS)
    (folder / DONE_MARK).touch()


FAMILIES = {  # how experts differ from the base (see mergekit_ri.synthetic)
    "finetune": finetune_weights,  # low-rank update + small dense noise, bf16: like real fine-tunes
    "noise": expert_weights,  # dense heavy-tailed noise: flatters TIES's threshold search
}


def ensure_models(root: Path, shape: LlamaShape, experts: int, family: str = "finetune") -> dict[str, Path]:
    """Generate whatever base/expert checkpoints are missing under `root`; return all folders.

    The base is kept in float32 while the experts are made one at a time (peak ~10 GB at 1B).
    """
    folders = {name: root / name for name in model_names(experts)}
    missing = [name for name, folder in folders.items() if not is_complete(folder)]
    if not missing:
        return folders
    print(f"generating {', '.join(missing)} under {root} ...", file=sys.stderr, flush=True)
    base = base_weights(shape, SEED)
    for i, name in enumerate(model_names(experts)):
        if name not in missing:
            continue
        weights = base if name == "base" else FAMILIES[family](base, SEED + i)
        write_model(folders[name], weights, shape)
        del weights
    return folders


def input_files(folders: dict[str, Path]) -> list[Path]:
    """Every safetensors file of the inputs."""
    return sorted(f for folder in folders.values() for f in folder.glob("*.safetensors"))


def count_params(folder: Path) -> int:
    """Parameter count of one checkpoint, from its safetensors headers."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


# ---------------------------------------------------------------- recipes and commands


def recipe_for(method: str, folders: dict[str, Path]) -> dict:
    """A recipe both ri-merge and mergekit accept."""
    params: dict[str, float] = {} if method in UNWEIGHTED else {"weight": 1.0}
    if method in ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs_ties"):
        params["density"] = 0.2
    experts = [folder for name, folder in folders.items() if name != "base"]
    if method in TWO_MODEL:  # the base and one other model
        experts = experts[:1]
    recipe = {
        "merge_method": method,
        "base_model": str(folders["base"].resolve()),
        "models": [
            {"model": str(folder.resolve()), **({"parameters": dict(params)} if params else {})}
            for folder in experts
        ],
        "dtype": DTYPE,
    }
    if method in TWO_MODEL:
        recipe["parameters"] = {"t": 0.5}
    return recipe


TWO_MODEL = {"slerp"}  # mergekit's slerp interpolates the base and exactly one other model
UNWEIGHTED = {"slerp", "model_stock"}  # methods without a per-model weight


def write_recipe(path: Path, recipe: dict) -> Path:
    """Write a recipe as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def ri_merge_exe() -> list[str]:
    """The ri-merge command: the one beside this Python, else on PATH, else via the module."""
    beside = Path(sys.executable).parent / "ri-merge"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ri-merge")
    if found:
        return [found]
    return [sys.executable, "-c", "from mergekit_ri.cli import entry; entry()"]


def ri_command(
    recipe: Path, out: Path, device: str = "cpu", max_memory: str | None = None, extra: str = ""
) -> list[str]:
    """Command line of one ri-merge run (`extra`: more of its options, as one shell-quoted string)."""
    cap = ["--max-memory", max_memory] if max_memory else []
    more = shlex.split(extra)
    return [
        *ri_merge_exe(),
        str(recipe),
        "-o",
        str(out),
        "--force",
        "--quiet",
        "--device",
        device,
        *cap,
        *more,
    ]


def mergekit_command(mergekit: str, recipe: Path, out: Path, cuda: bool = False) -> list[str]:
    """Command line of one mergekit run (`--cuda` on a GPU box, as its users would)."""
    return [
        mergekit,
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--random-seed",
        "0",
        *(["--cuda"] if cuda else []),
    ]


# ---------------------------------------------------------------- measuring


Command = Callable[[Path, Path], list[str]]  # (recipe, output folder) -> argv


# Runs one command and writes its wall time and rusage as JSON to argv[1]. It runs in a fresh,
# small interpreter because Linux carries the RSS high-water mark of the process that forks
# (vfork) into the child's ru_maxrss: spawned from this script, every child would report at
# least this script's own peak (several GiB after generating the models).
TIMER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
proc.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as sink:
    json.dump({"seconds": seconds, "max_rss_kib": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "returncode": proc.returncode}, sink)
"""


@dataclass
class Run:
    """One child process: wall seconds, peak RSS in KiB, CPU seconds, exit status."""

    seconds: float
    max_rss_kib: int
    cpu_seconds: float
    returncode: int
    stderr_tail: str = ""


def run_child(cmd: list[str], log: Path) -> Run:
    """Run `cmd` under the TIMER helper (output to `log`); its own wall time, peak RSS and CPU time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    measure = log.with_suffix(".json")
    measure.unlink(missing_ok=True)
    with open(log, "wb") as sink:
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", TIMER, str(measure), *cmd],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=True,
        )
    run = Run(**json.loads(measure.read_text()))
    if run.returncode != 0:
        run.stderr_tail = log.read_text(errors="replace")[-2000:]
    return run


def remove(path: Path) -> None:
    """Delete an output folder and flush dirty pages, so the next run starts clean."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def read_all(files: list[Path]) -> int:
    """Read every byte of `files` once in 16 MiB chunks; return the byte count."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                total += n
    return total


def time_read(files: list[Path], reps: int) -> float:
    """Median seconds to read every input byte from the page cache."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        read_all(files)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_import_torch(reps: int, log: Path) -> float:
    """Median wall seconds of `python -c "import torch"`."""
    runs = [run_child([sys.executable, "-c", "import torch"], log) for _ in range(reps)]
    return statistics.median(r.seconds for r in runs)


@dataclass
class Result:
    """All runs of one tool on one method."""

    method: str
    tool: str
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def rss_gib(self) -> float:
        return max(r.max_rss_kib for r in self.runs) / 2**20


def bench_method(method: str, recipe: Path, tools: dict[str, Command], reps: int, work: Path) -> list[Result]:
    """Run every tool `reps` times on one recipe, alternating which goes first."""
    results = {tool: Result(method, tool) for tool in tools}
    names = list(tools)
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for tool in order:
            out = work / "out" / f"{method}-{tool}"
            remove(out)
            run = run_child(tools[tool](recipe, out), work / "logs" / f"{method}-{tool}-{rep}.log")
            remove(out)
            results[tool].runs.append(run)
            status = "ok" if run.returncode == 0 else f"FAILED rc={run.returncode}"
            print(
                f"  {method:<16} {tool:<9} rep {rep + 1}/{reps}: {run.seconds:7.2f}s "
                f"{run.max_rss_kib / 2**20:6.2f} GiB  cpu {run.cpu_seconds:7.2f}s  {status}",
                file=sys.stderr,
                flush=True,
            )
            if run.returncode != 0:
                print(run.stderr_tail, file=sys.stderr)
    return list(results.values())


# ---------------------------------------------------------------- the numeric check


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, over every shard of a checkpoint."""
    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            where.update({k: file for k in handle.keys()})
    return where


def load_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor as float32."""
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name).float()


def compare_outputs(a: Path, b: Path) -> dict:
    """Max abs diff between two checkpoints, and the tensors beyond a bf16 tolerance.

    mergekit does the arithmetic in bf16 (rounding after each step) while ri-merge rounds once,
    so the two differ by a few ulps of the largest magnitudes involved: a tensor passes when its
    max abs diff is within 2 bf16 epsilons (2 * 2**-7) of its largest magnitude.
    """
    files_a, files_b = tensor_files(a), tensor_files(b)
    report = {
        "only_in_ri": sorted(set(files_a) - set(files_b)),
        "only_in_mergekit": sorted(set(files_b) - set(files_a)),
        "shape_mismatch": [],
        "max_abs_diff": 0.0,
        "worst_tensor": None,
        "worst_diff_in_eps": 0.0,
        "beyond_tol": [],
        "elements": 0,
        "elements_differing": 0,
    }
    for name in sorted(set(files_a) & set(files_b)):
        x, y = load_tensor(files_a[name], name), load_tensor(files_b[name], name)
        if x.shape != y.shape:
            report["shape_mismatch"].append(name)
            continue
        diff = (x - y).abs()
        worst = diff.max().item()
        in_eps = worst / (2**-7 * max(x.abs().max().item(), y.abs().max().item(), 1e-12))
        report["elements"] += x.numel()
        report["elements_differing"] += int((diff > 0).sum())
        if in_eps > 2:
            report["beyond_tol"].append(name)
        if worst > report["max_abs_diff"]:
            report["max_abs_diff"], report["worst_tensor"] = worst, name
        report["worst_diff_in_eps"] = max(report["worst_diff_in_eps"], round(in_eps, 3))
    report["passed"] = not any(
        report[k] for k in ("only_in_ri", "only_in_mergekit", "shape_mismatch", "beyond_tol")
    )
    return report


def check_task_arithmetic(folders: dict[str, Path], mergekit: str, work: Path) -> dict:
    """Merge task_arithmetic with both tools and compare the outputs."""
    recipe = write_recipe(
        work / "recipes" / "check-task_arithmetic.yaml", recipe_for("task_arithmetic", folders)
    )
    outs = {"ri": work / "check" / "ri", "mergekit": work / "check" / "mergekit"}
    for out in outs.values():
        remove(out)
    runs = [
        run_child(ri_command(recipe, outs["ri"]), work / "logs" / "check-ri.log"),
        run_child(mergekit_command(mergekit, recipe, outs["mergekit"]), work / "logs" / "check-mergekit.log"),
    ]
    if any(r.returncode for r in runs):
        return {"passed": False, "error": " / ".join(r.stderr_tail for r in runs if r.returncode)}
    return compare_outputs(outs["ri"], outs["mergekit"])


# ---------------------------------------------------------------- the report


def table_rows(results: list[Result], floor: float, input_bytes: int) -> list[list[str]]:
    """method | tool | median wall s | GB/s of input | peak RSS GiB | ratio vs mergekit | ratio vs floor."""
    mergekit_time = {r.method: r.seconds for r in results if r.tool == "mergekit" and r.ok}
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.method, r.tool, "failed", "—", "—", "—", "—"])
            continue
        vs_mk = f"{r.seconds / mergekit_time[r.method]:.2f}x" if r.method in mergekit_time else "—"
        rows.append(
            [
                r.method,
                r.tool,
                f"{r.seconds:.2f}",
                f"{input_bytes / 1e9 / r.seconds:.2f}",
                f"{r.rss_gib:.2f}",
                vs_mk,
                f"{r.seconds / floor:.2f}x",
            ]
        )
    return rows


HEADERS = [
    "method",
    "tool",
    "median wall s",
    "GB/s of input",
    "peak RSS GiB",
    "ratio vs mergekit (time)",
    "ratio vs floor",
]


def format_table(rows: list[list[str]], markdown: bool) -> str:
    """Render rows as a Markdown or a plain aligned table."""
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(HEADERS), line(["-" * w for w in widths])] + [line(row) for row in rows])


def header_line(
    shape: LlamaShape, params: int, experts: int, input_bytes: int, reps: int, load: float
) -> str:
    """One line naming the model size and the setup."""
    return (
        f"Llama-style {human_count(params)} params (hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.layers} layers, vocab {shape.vocab}), {DTYPE}, base + {experts} experts, "
        f"{input_bytes / 1e9:.2f} GB of inputs; median of {reps} run(s), {os.cpu_count()} CPU(s), "
        f"load average {load:.2f} at start"
    )


def floor_line(import_s: float, read_s: float, input_bytes: int) -> str:
    """The floor and its two parts."""
    return (
        f"floor = {import_s + read_s:.2f}s (python -c 'import torch' {import_s:.2f}s + reading "
        f"{input_bytes / 1e9:.2f} GB from page cache {read_s:.2f}s, {input_bytes / 1e9 / read_s:.1f} GB/s)"
    )


# ---------------------------------------------------------------- start-up

STARTUP_SHAPE = LlamaShape(vocab=64, hidden=16, intermediate=40, layers=2, heads=2, kv_heads=1)

# Runs ri-merge's CLI in this interpreter (argv[2:]) and writes the modules it loaded to argv[1].
MODULES_PROBE = """
import json, sys
from mergekit_ri.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
with open(sys.argv[1], "w") as sink:
    json.dump({"modules": len(sys.modules), "torch": "torch" in sys.modules}, sink)
"""


@dataclass
class Startup:
    """All runs of one short command, and what a run of it imports (ri-merge's commands only)."""

    name: str
    runs: list[Run]
    modules: int | None = None
    torch: bool | None = None

    @property
    def ok(self) -> bool:
        return all(r.returncode == 0 for r in self.runs)


def startup_commands(recipe: Path, out: Path, mergekit: str | None) -> list[tuple[str, list[str], bool]]:
    """(label, argv, whether it is ri-merge's CLI) of each short command, with Python's own floors."""
    ri = ri_merge_exe()
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"], False),
        ("python -c 'import torch'", [sys.executable, "-c", "import torch"], False),
        ("ri-merge --help", [*ri, "--help"], True),
        ("ri-merge version", [*ri, "version"], True),
        ("ri-merge methods", [*ri, "methods"], True),
        ("ri-merge validate", [*ri, "validate", str(recipe)], True),
        ("ri-merge --dry-run", [*ri, str(recipe), "--dry-run"], True),
        ("ri-merge (tiny merge)", [*ri, str(recipe), "-o", str(out / "ri"), "--force", "-q"], True),
    ]
    if mergekit:
        rows += [
            ("mergekit-yaml --help", [mergekit, "--help"], False),
            ("mergekit-yaml (tiny merge)", mergekit_command(mergekit, recipe, out / "mergekit"), False),
        ]
    return rows


def cli_args(argv: list[str]) -> list[str]:
    """The arguments after the ri-merge executable (or its `python -c` stand-in)."""
    return argv[len(ri_merge_exe()) :]


def bench_startup(work: Path, reps: int, mergekit: str | None) -> list[Startup]:
    """Each short command `reps` times in turn (round-robin, so load drifts hit all alike), with
    ri-merge's bytecode compiled first, as an install has it (PYTHONDONTWRITEBYTECODE or a
    read-only checkout would otherwise have every run compile the package again)."""
    import compileall

    import mergekit_ri

    compileall.compile_dir(Path(mergekit_ri.__file__).parent, quiet=1)
    folders = make_family(
        work / "models", ["expert1", "expert2", "expert3"], shape=STARTUP_SHAPE, dtype=DTYPE
    )
    recipe = write_recipe(work / "ties.yaml", recipe_for("ties", folders))
    commands = startup_commands(recipe, work / "out", mergekit)
    results = [Startup(name, []) for name, _, _ in commands]
    for rep in range(reps + 1):  # one warm-up round, not counted
        for (name, argv, _), result in zip(commands, results):
            run = run_child(argv, work / "logs" / f"{name.replace(' ', '_').replace(chr(39), '')}.log")
            if rep > 0 or run.returncode != 0:
                result.runs.append(run)
            if name.endswith("(tiny merge)"):
                remove(work / "out")
    for (name, argv, is_ri), result in zip(commands, results):
        if is_ri:
            probe = work / "logs" / "modules.json"
            subprocess.run(  # run from the workdir: `python -c` puts the current folder on sys.path
                [sys.executable, "-c", MODULES_PROBE, str(probe), *cli_args(argv)],
                capture_output=True,
                check=True,
                cwd=work,
            )
            found = json.loads(probe.read_text())
            result.modules, result.torch = found["modules"], found["torch"]
            remove(work / "out")
    return results


STARTUP_HEADERS = [
    "command",
    "median wall s",
    "fastest wall s",
    "median CPU s",
    "modules loaded",
    "imports torch",
]


def startup_rows(results: list[Startup]) -> list[list[str]]:
    """command | median and fastest wall s | median CPU s (user + system) | modules loaded | torch
    imported. On a busy machine the fastest run is the one least slowed by others."""
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.name, "failed", "—", "—", "—", "—"])
            continue
        rows.append(
            [
                r.name,
                f"{statistics.median(x.seconds for x in r.runs):.3f}",
                f"{min(x.seconds for x in r.runs):.3f}",
                f"{statistics.median(x.cpu_seconds for x in r.runs):.3f}",
                "—" if r.modules is None else str(r.modules),
                "—" if r.torch is None else ("yes" if r.torch else "no"),
            ]
        )
    return rows


def format_startup(rows: list[list[str]], markdown: bool) -> str:
    """The start-up table as Markdown or aligned text."""
    if markdown:
        lines = ["| " + " | ".join(STARTUP_HEADERS) + " |", "|---|" + "---:|" * (len(STARTUP_HEADERS) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(STARTUP_HEADERS)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(STARTUP_HEADERS), line(["-" * w for w in widths])] + [line(row) for row in rows])


def startup_main(args: argparse.Namespace) -> int:
    """`--startup`: the short commands' table."""
    work = args.workdir.resolve() / "startup"
    load = warn_if_busy()
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit)
    results = bench_startup(work, args.reps, mergekit)
    report = "\n".join(
        [
            f"start-up: median of {args.reps} run(s) each (round-robin after a warm-up round), "
            f"{os.cpu_count()} CPU(s), load average {load:.2f} at start; tiny merge: TIES over "
            f"base + 3 experts of {shape_params(STARTUP_SHAPE)} parameters",
            "",
            format_startup(startup_rows(results), args.markdown),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0 if all(r.ok for r in results) else 1


# ---------------------------------------------------------------- the memory table


MEMORY_HEADERS = [
    "model",
    "method",
    "--max-memory",
    "planned tensors MiB",
    "planned peak MiB",
    "peak RSS MiB",
    "RSS − baseline MiB",
    "RSS / planned",
    "wall s",
    "same bytes",
]


def dry_run_memory(recipe: Path, cap: str | None) -> dict:
    """`ri-merge --dry-run --json`'s memory plan, or {"error": line} when the cap is refused."""
    cmd = [*ri_merge_exe(), str(recipe), "--dry-run", "--json", *(["--max-memory", cap] if cap else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"
        }
    return json.loads(done.stdout)["memory"]


def weights_digest(folder: Path) -> str:
    """sha256 over the output's safetensors files, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def bench_memory(args: argparse.Namespace, work: Path) -> tuple[str, bool]:
    """The memory table (and whether every run went as planned): see the module's docstring."""
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    baseline_run = run_child(
        [
            sys.executable,
            "-c",
            "import torch, mergekit_ri.engine, mergekit_ri.kernels.native as n; n.library()",
        ],
        work / "logs" / "baseline.log",
    )
    baseline = baseline_run.max_rss_kib / 1024
    rows, ok = [], True
    for size in [p.strip() for p in args.params.split(",") if p.strip()]:
        shape = shape_for(parse_count(size))
        key = shape_key(shape) + ("" if args.family == "noise" else f"-{args.family}")
        folders = ensure_models(work / key, shape, args.experts, args.family)
        model = f"{human_count(count_params(folders['base']))}, {read_all(input_files(folders)) / 1e9:.2f} GB"
        for method in methods:
            recipe = write_recipe(
                work / "recipes" / f"memory-{key}-{method}.yaml", recipe_for(method, folders)
            )
            reference = None
            for cap in caps:
                given = None if cap == "default" else cap
                plan = dry_run_memory(recipe, given)
                if "error" in plan:
                    rows.append([model, method, cap, "refused", "—", "—", "—", "—", "—", plan["error"][:90]])
                    continue
                out = work / "out" / f"memory-{method}"
                remove(out)
                run = run_child(
                    ri_command(recipe, out, args.device, given), work / "logs" / f"memory-{method}-{cap}.log"
                )
                digest = weights_digest(out) if run.returncode == 0 else None
                remove(out)
                reference = reference or digest
                planned_total = (plan["planned_peak"] + plan["runtime"]) / 2**20
                rss = run.max_rss_kib / 1024
                ok &= run.returncode == 0 and rss <= planned_total * 1.1
                print(
                    f"  {model} {method} {cap}: planned {planned_total:.0f} MiB, RSS {rss:.0f} MiB, {run.seconds:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(
                    [
                        model,
                        method,
                        cap,
                        f"{plan['planned_peak'] / 2**20:.0f}",
                        f"{planned_total:.0f}",
                        f"{rss:.0f}" if run.returncode == 0 else f"failed rc={run.returncode}",
                        f"{rss - baseline:.0f}",
                        f"{rss / planned_total:.2f}",
                        f"{run.seconds:.1f}",
                        "yes" if digest is not None and digest == reference else "NO",
                    ]
                )
    lines = [
        f"base + {args.experts} experts ({args.family}), {DTYPE}, device {args.device}; baseline (a process that "
        f"imported torch and ri-merge's engine): {baseline:.0f} MiB; planned peak = planned tensors + "
        "the runtime allowance; 'same bytes': output identical to the first cap's",
        "",
    ]
    if args.markdown:
        lines += [
            "| " + " | ".join(MEMORY_HEADERS) + " |",
            "|" + "|".join(["---"] * 3 + ["---:"] * 6 + ["---"]) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(MEMORY_HEADERS)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [MEMORY_HEADERS, *rows]]
    return "\n".join(lines), ok


# ---------------------------------------------------------------- main


def warn_if_busy() -> float:
    """The 1-minute load average; warn when other work would skew the timings."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.2f} on {os.cpu_count()} CPU(s); timings will be noisy",
            file=sys.stderr,
        )
    return load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", default="250M", help="approximate parameters per model (e.g. 20M, 250M, 1B)"
    )
    parser.add_argument("--experts", type=int, default=3, help="number of experts besides the base")
    parser.add_argument("--methods", default="ties,task_arithmetic", help="comma-separated merge methods")
    parser.add_argument("--reps", type=int, default=3, help="runs per tool and method")
    parser.add_argument(
        "--workdir", type=Path, default=Path("bench-data"), help="cache of models, recipes, logs"
    )
    parser.add_argument(
        "--mergekit", default=None, help="mergekit-yaml executable (default: /work/mk-venv, then PATH)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--check", action="store_true", help="also compare task_arithmetic outputs of both tools"
    )
    parser.add_argument("--no-mergekit", action="store_true", help="benchmark ri-merge alone")
    parser.add_argument(
        "--ri-args",
        default="",
        help="more ri-merge options for the timed runs, e.g. '--json' (the manifest: sha256 of every file)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda: ri-merge --device, and mergekit --cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument(
        "--startup",
        action="store_true",
        help="time the short commands (--help, methods, validate, --dry-run, a tiny merge) instead",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="finetune",
        help="experts as real bf16 fine-tunes (finetune: low-rank update + noise) or dense noise",
    )
    parser.add_argument(
        "--memory", action="store_true", help="print the memory table (planned vs measured peak under caps)"
    )
    parser.add_argument(
        "--caps", default="default,512MiB,256MiB", help="--memory: comma-separated --max-memory values"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.startup:
        return startup_main(args)
    work = args.workdir.resolve()
    if args.memory:
        report, ok = bench_memory(args, work)
        print(report)
        if args.out:
            args.out.write_text(report + "\n")
        return 0 if ok else 1
    shape = shape_for(parse_count(args.params))
    key = shape_key(shape) + ("" if args.family == "noise" else f"-{args.family}")  # "noise": the older cache
    folders = ensure_models(work / key, shape, args.experts, args.family)
    files = input_files(folders)
    params = count_params(folders["base"])

    load = warn_if_busy()
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit)
    cuda = args.device.startswith("cuda")
    tools: dict[str, Command] = {
        "ri-merge": lambda recipe, out: ri_command(recipe, out, args.device, extra=args.ri_args)
    }
    if mergekit:
        tools["mergekit"] = lambda recipe, out: mergekit_command(mergekit, recipe, out, cuda)
    else:
        print("mergekit-yaml not found: benchmarking ri-merge alone", file=sys.stderr)

    input_bytes = read_all(files)  # warms the page cache
    import_s = time_import_torch(args.reps, work / "logs" / "import-torch.log")
    read_s = time_read(files, args.reps)
    floor = import_s + read_s

    results: list[Result] = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        recipe = write_recipe(work / "recipes" / f"{method}.yaml", recipe_for(method, folders))
        results += bench_method(method, recipe, tools, args.reps, work)

    report = "\n".join(
        [
            header_line(shape, params, args.experts, input_bytes, args.reps, load)
            + f", device {args.device}, experts: {args.family}",
            floor_line(import_s, read_s, input_bytes),
            "",
            format_table(table_rows(results, floor, input_bytes), args.markdown),
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")

    if args.check:
        if not mergekit:
            print("\ncheck skipped: mergekit-yaml not found")
        else:
            report = check_task_arithmetic(folders, mergekit, work)
            print(
                "\ntask_arithmetic check (ri-merge vs mergekit): " + ("PASS" if report["passed"] else "FAIL")
            )
            print(json.dumps(report, indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
