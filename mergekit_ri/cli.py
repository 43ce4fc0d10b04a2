"""The `ri-merge` command line: parsing, printing and exit codes around `mergekit_ri.api`.

`ri-merge RECIPE OUT` (mergekit-yaml's form, its flags included) and `ri-merge RECIPE -o OUT` are
short for `ri-merge merge RECIPE -o OUT`. Exit codes: 0 success,
2 bad input (one line on stderr, no traceback), 1 internal error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM). An interrupted merge with finished work units keeps them for `--resume`
and prints the command that continues it.

Written without `from __future__ import annotations`: typer reads every command's annotations
each time it runs, and string annotations are compiled and evaluated each time (~15 ms of every
command); names imported only for type checking are quoted.
"""

import gc
import json
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from . import __version__
from .cli_typer import Command, Group
from .demo import demo_recipe_path, prepare_demo_folder  # noqa: F401 (demo_recipe_path: kept importable here)
from .errors import MergeInterrupted, UserError
from .events import MergeEvents

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from .api import MergeOptions


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Merge fine-tuned experts of one base model into one multi-task model.",
)


class _Stream:
    """stdout or stderr of the commands. rich (~40 ms to import, a sixth of a short command) is
    imported when something needs it — markup, a table, progress bars, highlighting — while the
    lines that are plain text (`line`) are written as they are."""

    def __init__(self, stderr: bool, soft_wrap: bool) -> None:
        self._stderr, self._soft_wrap = stderr, soft_wrap
        self._console: Console | None = None

    @property
    def console(self) -> "Console":
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, soft_wrap=self._soft_wrap)
        return self._console

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    @property
    def surely_plain(self) -> bool:
        """Whether rich would print styled text as plain text here — a file or pipe, with no
        FORCE_COLOR / TTY_COMPATIBLE asking otherwise — known without importing rich."""
        if self._console is not None:
            return not self._console.is_terminal
        if (
            os.environ.get("FORCE_COLOR")
            or os.environ.get("TTY_COMPATIBLE")
            or os.environ.get("TTY_INTERACTIVE")
        ):
            return False
        stream = sys.stderr if self._stderr else sys.stdout
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):
            return False

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    def line(self, text: str) -> None:
        """One line of plain text, unwrapped (rich's `markup=False, highlight=False, soft_wrap=True`)."""
        stream = sys.stderr if self._stderr else sys.stdout  # as it is now (tests redirect it)
        stream.write(f"{text}\n")


err = _Stream(stderr=True, soft_wrap=False)
out = _Stream(stderr=False, soft_wrap=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _guarded(body: Callable[[], Any], verbose: bool = False) -> None:
    """Run a command body; map errors to exit codes and one-line messages."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    _SIGNALLED.clear()
    try:
        body()
    except UserError as exc:
        err.line(f"error: {exc}")
        raise typer.Exit(2) from None
    except MergeInterrupted as exc:
        err.print(
            f"interrupted: {exc.kept} of {exc.total} work units finished and kept; continue with: "
            f"{exc.command or f'ri-merge RECIPE -o {shlex.quote(str(exc.out))} --resume'}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(_interrupted_code()) from None
    except KeyboardInterrupt:
        err.print("interrupted: no output was written", markup=False, soft_wrap=True)
        raise typer.Exit(_interrupted_code()) from None
    except typer.Exit:
        raise
    except BrokenPipeError:  # `ri-merge ... --json | head`: the reader left; nothing is wrong here
        _silence_stdout()
        raise typer.Exit(141) from None
    except Exception as exc:  # a bug in ri-merge: say so, keep it to one line unless -v
        if verbose:
            traceback.print_exc()
        err.line(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for a traceback)")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """After the reader of stdout left: point stdout at /dev/null, so that flushing it at exit
    raises nothing (exit 141, as a process killed by SIGPIPE reports, and no message)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


_SIGNALLED: list[int] = []  # SIGTERM seen by the running command (SIGINT is Python's own KeyboardInterrupt)
_INVOKED: list[str] = []  # the arguments `main` ran, for the command that resumes an interrupted merge


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a batch scheduler's preemption, `kill`): stop as Ctrl-C does, exit 143."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _interrupted_code() -> int:
    """128 + the signal, as a shell reports a process that signal ended: 130 Ctrl-C, 143 SIGTERM."""
    return 128 + (_SIGNALLED[0] if _SIGNALLED else signal.SIGINT)


def _resume_command(recipe: Path, output: Path, options: "MergeOptions") -> str:
    """The command that continues an interrupted merge: the one typed, with --resume (its options
    decide the bytes and the work units); from elsewhere (the demo, a test), RECIPE -o OUT."""
    typed = list(_INVOKED)
    if typed and (typed[0] == "merge" or typed[0] not in SUBCOMMANDS and not typed[0].startswith("-")):
        return shlex.join(["ri-merge", *typed, *([] if "--resume" in typed else ["--resume"])])
    force = ["--force"] if options.force else []
    return shlex.join(["ri-merge", str(recipe), "-o", str(output), *force, "--resume"])


class _NoBars:
    """What the commands use of a rich `Progress`, doing nothing: with bars off (--quiet, a pipe)
    rich.progress is not even imported (it pulls in rich.table: 80 ms of every run)."""

    console = err

    def __enter__(self) -> "_NoBars":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


def _steps_progress(quiet: bool) -> "Progress | _NoBars":
    if quiet:
        return _NoBars()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err.console,
    )


def _progress(quiet: bool) -> "Progress | _NoBars":
    if quiet:
        return _NoBars()
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err.console,
        transient=False,
    )


def _layer_source(layer: dict[str, Any]) -> str:
    """`3 ← a[1] + b[1]  (slice 1, t 0.50)`: one output layer of a sliced recipe."""
    sources = " + ".join(f"{source['model']}[{source['layer']}]" for source in layer["sources"])
    return f"{layer['layer']} ← {sources}  (slice {layer['slice']}, t {layer['t']:.2f})"


def _memory_text(memory: dict[str, Any]) -> str:
    """The planned peak, what it is made of and how the engine is laid out under the cap."""
    from .memory import human as _human  # binary units, as caps are written

    cap = _human(memory["cap"]) if memory["cap"] is not None else "none"
    streamed = f", {memory['streamed_tensors']} tensor(s) read by rows" if memory["streamed_tensors"] else ""
    if memory.get("blocked_tensors"):
        streamed += f", {memory['blocked_tensors']} merged by row blocks after a pass for their figures"
    if memory.get("pinned"):
        streamed += f"; {_human(memory['pinned'])} of it page-locked GPU staging buffers"
    hashing = memory.get("hash_buffers")
    hashing = (
        f"\nhashers hold up to {_human(hashing)} of early reads and writes, within the cap" if hashing else ""
    )
    ahead = (
        "no read-ahead"
        if not memory["read_ahead_units"]
        else "the next unit read ahead"
        if memory["read_ahead_units"] == 1 or not memory["read_ahead_bytes"]
        else f"{memory['read_ahead_units']} units / {_human(memory['read_ahead_bytes'])} read ahead"
    )
    return (
        f"{_human(memory['planned_peak'] + memory['runtime'])}: {_human(memory['planned_peak'])} of tensors "
        f"+ ~{_human(memory['runtime'])} runtime\n"
        f"cap {cap} ({memory['cap_source']}); largest: {memory['largest']}\n"
        f"{ahead}, writer queue {memory['writer_queue']}, row chunks of "
        f"{memory['chunk_elements']:,} entries{streamed}{hashing}"
    )


def _vocabulary_lines(vocab: dict[str, Any]) -> str:
    """The output vocabulary: its size and source, where its tokens' rows come from, what is re-laid."""
    lines = []
    if "vocab_size" in vocab:
        lines.append(
            f"{vocab['vocab_size']} rows ({vocab['tokens']} tokens, tokenizer {vocab['tokenizer_source']})"
        )
        lines += [f"  {count} tokens: {origin}" for origin, count in vocab["token_rows"].items()]
        lines += [f"re-laid: {name} ({', '.join(models)})" for name, models in vocab["remapped"].items()]
    if "chat_template" in vocab:
        lines.append(f"chat template: {vocab['chat_template']}")
    return "\n".join(lines)


def _print_plan(plan, console: _Stream) -> None:
    from .text_table import terminal_width, two_column_table

    summary = plan.summary()
    rows = [
        ("base", str(summary["base"])),
        ("models", "\n".join(summary["models"])),
        (
            "tensors",
            f"{summary['tensors']} ({summary['tensors_merged']} merged, {summary['tensors_copied']} copied)",
        ),
        ("read", _human(summary["bytes_read"])),
        ("write", _human(summary["bytes_written"])),
        (
            "output shards",
            "\n".join(
                f"{s['file']}  {s['tensors']} tensors, {_human(s['bytes'])}" for s in summary["shards"]
            ),
        ),
        ("peak memory (planned)", _memory_text(summary["memory"])),
    ]
    if summary.get("layers"):  # slices: each output layer and where it comes from
        rows.append(("layers", "\n".join(_layer_source(layer) for layer in summary["layers"])))
    if summary.get("vocabulary"):
        rows.append(("vocabulary", _vocabulary_lines(summary["vocabulary"])))
    if summary["heads"]:
        heads = (
            f"{label}{' (default)' if label == summary['heads_default'] else ''}: "
            + ", ".join(f"{n} {shape}" for n, shape in tensors.items())
            for label, tensors in summary["heads"].items()
        )
        rows.append(("task heads", "\n".join(heads)))
    console.line(two_column_table(f"Merge plan: {summary['method']}", rows, terminal_width()))
    for label, note in summary.get("inputs", {}).items():
        console.line(f"input {label}: {note}")
    for warning in summary["warnings"]:
        console.line(f"warning: {warning}")


def _layer_line(name: str, figures: Mapping[str, float]) -> str:
    parts = [f"  {name}"]
    if "loss_before" in figures and "loss_after" in figures:
        before, after = figures["loss_before"], figures["loss_after"]
        relative = f" ({after / before:.3f}× the start)" if before > 0 else ""
        parts.append(f"loss {before:.6g} → {after:.6g}{relative}")
    if "directions" in figures:
        parts.append(f"{int(figures['directions'])} directions")
    return "  ".join(parts)


class _Rendered(MergeEvents):
    """The merge's events on stderr: RI and merge progress bars (when `bars`), the plan with -v,
    warnings once each unless quiet, and with `layers` each solved layer's line above the bar."""

    def __init__(self, bars: bool, quiet: bool, verbose: bool, layers: bool) -> None:
        self.bars, self.quiet, self.verbose, self.layers = bars, quiet, verbose, layers
        self._ri: Progress | _NoBars | None = None
        self._ri_tasks: dict[str, int] = {}
        self._merge: Progress | _NoBars | None = None
        self._merge_task = 0
        self._total = 0
        self._method = ""
        self._shown: set[str] = set()

    def __enter__(self) -> "_Rendered":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_ri()
        if self._merge is not None:
            self._merge.__exit__(None, None, None)
            self._merge = None

    def _close_ri(self) -> None:
        if self._ri is not None:
            self._ri.__exit__(None, None, None)
            self._ri = None

    def on_ri_start(self, expert: str, steps: int) -> None:
        if self._ri is None:
            self._ri = _steps_progress(not self.bars).__enter__()
        self._ri_tasks[expert] = self._ri.add_task(f"RI {expert}", total=steps)

    def on_ri_step(self, expert: str, step: int, l1: float, l2: float) -> None:
        if self._ri is not None and expert in self._ri_tasks:
            self._ri.update(
                self._ri_tasks[expert], completed=step, description=f"RI {expert}  L1 {l1:.4f}  L2 {l2:.4f}"
            )

    def on_stage(self, name: str | None, index: int, count: int, out: Path) -> None:
        """A new stage: its own line, and a fresh bar for its merge."""
        self._close_ri()
        if self._merge is not None:
            self._merge.__exit__(None, None, None)
            self._merge = None
        if not self.quiet:
            label = f"'{name}'" if name else "final"
            err.print(
                f"stage {index + 1}/{count} {label} → {out}", markup=False, highlight=False, soft_wrap=True
            )

    def on_plan(self, plan, total_bytes: int) -> None:
        self._close_ri()
        self._total, self._method = total_bytes, plan.method.name
        if self.verbose:
            _print_plan(plan, err)
            self._shown.update(plan.warnings)
            if plan.method.raw_inputs:
                from .kernels import native

                err.print(f"CPU kernels: {native.describe()}", markup=False, highlight=False, soft_wrap=True)

    def on_warning(self, text: str) -> None:
        if not self.quiet and text not in self._shown:
            self._shown.add(text)
            self._bar().console.print(f"warning: {text}", markup=False, soft_wrap=True)

    def on_progress(self, advance: int) -> None:
        self._bar().advance(self._merge_task, advance)

    def on_layer(self, name: str, figures: Mapping[str, float]) -> None:
        if self.layers:
            self._bar().console.print(
                _layer_line(name, figures), markup=False, highlight=False, soft_wrap=True
            )

    def _bar(self) -> "Progress | _NoBars":
        """The merge's bar, started on first use (after the plan and its warnings are printed)."""
        if self._merge is None:
            self._merge = _progress(not self.bars).__enter__()
            self._merge_task = self._merge.add_task(f"merging ({self._method})", total=self._total)
        return self._merge


def _run_merge(
    recipe: Path,
    output: Path,
    options: "MergeOptions",
    *,
    dry_run: bool = False,
    quiet: bool = False,
    as_json: bool = False,
    verbose: bool = False,
) -> None:
    """`ri-merge merge` (and the demo's merge): the API's plan or merge, printed."""
    from . import api

    if dry_run:
        report = api.plan(recipe, options=options)
        if as_json:
            print(json.dumps({"dry_run": True, **report.summary()}, indent=2))
            return
        if report.stages is not None:
            out.print("stages, in the order they run (the plan below is the first one's):", markup=False)
            for i, stage in enumerate(report.stages):
                needs = f" (uses {', '.join(stage['needs'])})" if stage["needs"] else ""
                out.print(
                    f"  {i + 1}. {stage['name'] or 'final'}: {stage['merge_method']}{needs}",
                    markup=False,
                    highlight=False,
                )
        _print_plan(report.plan, out)
        if report.ri is not None:
            out.print(
                f"RI: {len(report.ri.cache_hits)} of {len(report.ri.adapted)} experts already adapted "
                f"in the cache; the others would be trained first",
                markup=False,
            )
        return
    show_bars = not quiet and (err.is_terminal or verbose)
    try:
        with _Rendered(
            show_bars, quiet, verbose and not quiet, verbose and not quiet and not as_json
        ) as events:
            result = api.merge(recipe, output, options=options, events=events)
    except MergeInterrupted as exc:
        exc.command = _resume_command(recipe, output, options)
        raise
    if result.interference is not None:
        xi = result.interference
        err.print(
            f"interference ξ on the auxiliary data: {xi['without_ri']:.4f} without RI, "
            f"{xi['with_ri']:.4f} with RI (reported only; never used to tune the merge)",
            markup=False,
            soft_wrap=True,
        )
    if as_json:
        print(json.dumps(_json_summary(result, verbose), indent=2))
    elif not quiet:
        out.print(
            f"merged {result.tensors} tensors ({_human(result.bytes_read)} read) with "
            f"{result.method} on {result.device} in {result.seconds:.1f}s → {result.out}",
            markup=False,
            highlight=False,
        )


def _json_summary(result, verbose: bool) -> dict[str, Any]:
    """`--json`: "files" names the output folder's entries; "manifest" lists every written file
    (heads/ included) with its size and sha256."""
    from .io.manifest import top_level_names

    ri = {}
    if result.ri is not None:
        xi = {"interference": dict(result.interference)} if result.interference is not None else {}
        ri = {"ri": {**result.ri.summary(), **xi}}
    return {
        "output": str(result.out),
        "method": result.method,
        "device": result.device,
        "tensors": result.tensors,
        "shards": result.shards,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "files": top_level_names(result.files),
        "manifest": [f.to_json() for f in result.files],
        **({"units": {k: list(v) for k, v in result.units.items()}} if result.units is not None else {}),
        **ri,
        **({"layers": {k: dict(v) for k, v in (result.layers or {}).items()}} if verbose else {}),
    }


OutPathArg = Annotated[
    Optional[Path],
    typer.Argument(
        metavar="OUT_PATH",
        show_default=False,
        help="Output folder, as mergekit-yaml takes it (or -o; created, must not exist or be empty unless "
        "--force).",
    ),
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        "--out-path",
        help="Output folder (created; must not exist or be empty unless --force).",
    ),
]
IntermediateOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--intermediate-dir",
        help="Multi-stage recipes: where the named stages are written, kept, and reused "
        "while their recipe and inputs are unchanged (default: a hidden folder beside "
        "the output, removed at the end).",
    ),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help=(
            "Print the plan, warnings, each solved layer's loss before → after (wudi, wudi2; with --json under "
            '"layers") and tracebacks of internal errors.'
        ),
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate and print the plan; read no weight, write nothing.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")]
PrefetchOpt = Annotated[
    int, typer.Option("--prefetch", min=1, max=64, help="Tensors read ahead of the merge.")
]
MaxMemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Cap on the tensors the merge holds, e.g. 512MiB, 2G (= 2GiB), 1.5GB; the Python/torch runtime "
        "(~0.25 GB) comes on top. Default: the recipe's max_memory, else half the machine's memory.",
    ),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads", "--num-threads", "-j", min=1, help="CPU threads for the maths (default: all cores)."
    ),
]

ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the merge into this output that Ctrl-C, SIGTERM, a kill, crash or lost machine left "
        "unfinished: finished work units are verified by hash and kept (refused if the recipe or inputs "
        "changed).",
    ),
]
FingerprintOpt = Annotated[
    bool,
    typer.Option(
        "--fingerprint-inputs",
        help="List each input in the model card by a sha256 of its tensor bytes, hashed as the merge reads "
        "them (costs CPU time: about one sha256 pass over the inputs); else by its header's fingerprint.",
    ),
]
RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Run the work units as Ray tasks (pip install 'mergekit-ri[ray]'): on the cluster at ADDRESS "
        "(host:port, ray://host:port, auto), or alone: Ray's default (RAY_ADDRESS, a cluster on this "
        "machine, else a new local one).",
    ),
]
DevicesOpt = Annotated[
    Optional[str],
    typer.Option(
        "--devices",
        metavar="LIST",
        help="Spread the work units over several local devices of one kind, one worker process each "
        "(e.g. cuda:0,cuda:1), without Ray.",
    ),
]
UnitSizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--unit-size",
        metavar="SIZE",
        help="Output bytes per work unit, the grain of --resume and --ray (default: 1/64 of the output, "
        "16 MiB to 1 GiB).",
    ),
]

# mergekit-yaml's flags (mergekit 0.1.5 options.py), so that a command from mergekit runs unchanged
MK = "mergekit-yaml's flags"
MK_NOOP = "mergekit-yaml's flags with nothing to do here (accepted, no effect)"
CudaOpt = Annotated[bool, typer.Option("--cuda/--no-cuda", rich_help_panel=MK, help="Same as --device cuda.")]
GpuRichOpt = Annotated[
    bool,
    typer.Option(
        "--gpu-rich",
        rich_help_panel=MK,
        help="Same as --device cuda (the rest of mergekit's alias streams anyway).",
    ),
]
CopyTokenizerOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--copy-tokenizer/--no-copy-tokenizer",
        show_default=False,
        rich_help_panel=MK,
        help="Copy the tokenizer files (default); --no-copy-tokenizer writes none unless the recipe names "
        "tokenizer_source.",
    ),
]
ShardSizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--out-shard-size",
        metavar="SIZE",
        rich_help_panel=MK,
        help="Bytes per output shard: 5B is 5·10⁹ as in mergekit, also 500M, 2GB, 1GiB (overrides the "
        "recipe).",
    ),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        "--random-seed",
        rich_help_panel=MK,
        help="Seed of the random methods, e.g. DARE (overrides the recipe).",
    ),
]
ModelCardOpt = Annotated[
    bool,
    typer.Option(
        "--write-model-card/--no-write-model-card",
        rich_help_panel=MK,
        help="Write README.md and mergekit_config.yml beside the weights.",
    ),
]
AllowCrimesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-crimes/--no-allow-crimes",
        rich_help_panel=MK,
        help="No effect: models of different architectures merge whenever their tensor names and shapes match.",
    ),
]
TruncateOpt = Annotated[
    bool,
    typer.Option(
        "--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings",
        rich_help_panel=MK,
        help="Refused: cutting rows loses tokens silently; set tokenizer_source to merge vocabularies.",
    ),
]


def _noop(*flags: str, text: str) -> Any:
    return typer.Option(*flags, rich_help_panel=MK_NOOP, help=text)


STREAMED = "No effect: ri-merge streams tensors from disk with bounded memory."
LazyOpt = Annotated[bool, _noop("--lazy-unpickle/--no-lazy-unpickle", text=STREAMED)]
LowMemOpt = Annotated[bool, _noop("--low-cpu-memory/--no-low-cpu-memory", text=STREAMED)]
ReadGpuOpt = Annotated[bool, _noop("--read-to-gpu/--no-read-to-gpu", text=STREAMED)]
AsyncOpt = Annotated[
    bool,
    _noop(
        "--async-write/--no-async-write",
        text="No effect: shards are always written by a thread beside the merge.",
    ),
]
WriteThreadsOpt = Annotated[Optional[int], _noop("--write-threads", text="No effect (see --async-write).")]
MultiGpuOpt = Annotated[bool, _noop("--multi-gpu/--no-multi-gpu", text="No effect: one device merges.")]
CloneOpt = Annotated[
    bool,
    _noop("--clone-tensors/--no-clone-tensors", text="No effect: every output tensor is written on its own."),
]
SafeOpt = Annotated[
    bool,
    _noop(
        "--safe-serialization/--no-safe-serialization", text="No effect: the output is always safetensors."
    ),
]
RemoteCodeOpt = Annotated[
    bool,
    _noop(
        "--trust-remote-code/--no-trust-remote-code",
        text="No effect: ri-merge runs no code from model repositories.",
    ),
]
CacheOpt = Annotated[
    Optional[str],
    _noop("--transformers-cache", text="No effect: downloads go to the Hugging Face cache (HF_HOME)."),
]
NO_LORA = "No effect: LoRA adapters are applied per tensor in fp32 while streaming; no merged copy is cached."
LoraCacheOpt = Annotated[Optional[str], _noop("--lora-merge-cache", text=NO_LORA)]
LoraDtypeOpt = Annotated[Optional[str], _noop("--lora-merge-dtype", text=NO_LORA)]


def _output_folder(positional: Path | None, option: Path | None, dry_run: bool) -> Path:
    """OUT_PATH as mergekit-yaml takes it, or -o; both only when they agree."""
    if positional is not None and option is not None and positional != option:
        raise UserError(f"two output folders: {positional} and -o {option}; give one")
    folder = positional or option
    if folder is None and not dry_run:
        raise UserError("no output folder: ri-merge RECIPE OUT_PATH (or -o OUT_PATH)")
    return folder or Path(".")


def _merge_device(device: str | None, cuda: bool, truncate: bool) -> str | None:
    """--device, else mergekit's --cuda/--gpu-rich; refuses flags that would change the model."""
    if truncate:
        raise UserError(
            "--unsafe-truncate-embeddings is not supported: cutting embedding rows loses tokens "
            "silently; set tokenizer_source (union, base or a model) to merge different vocabularies"
        )
    return device if device is not None else ("cuda" if cuda else None)


@app.command("merge", cls=Command)
def merge(  # noqa: PLR0913 -- one parameter per flag: mergekit-yaml's command lines run unchanged
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    out_path: OutPathArg = None,
    output: OutputOpt = None,
    intermediate_dir: IntermediateOpt = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    prefetch: PrefetchOpt = 2,
    max_memory: MaxMemoryOpt = None,
    threads: ThreadsOpt = None,
    resume: ResumeOpt = False,
    fingerprint_inputs: FingerprintOpt = False,
    ray: RayOpt = None,
    unit_size: UnitSizeOpt = None,
    devices: DevicesOpt = None,
    cuda: CudaOpt = False,
    gpu_rich: GpuRichOpt = False,
    copy_tokenizer: CopyTokenizerOpt = None,
    out_shard_size: ShardSizeOpt = None,
    random_seed: SeedOpt = None,
    write_model_card: ModelCardOpt = True,
    allow_crimes: AllowCrimesOpt = False,
    unsafe_truncate_embeddings: TruncateOpt = False,
    lazy_unpickle: LazyOpt = False,
    low_cpu_memory: LowMemOpt = False,
    read_to_gpu: ReadGpuOpt = False,
    async_write: AsyncOpt = False,
    write_threads: WriteThreadsOpt = None,
    multi_gpu: MultiGpuOpt = False,
    clone_tensors: CloneOpt = False,
    safe_serialization: SafeOpt = True,
    trust_remote_code: RemoteCodeOpt = False,
    transformers_cache: CacheOpt = None,
    lora_merge_cache: LoraCacheOpt = None,
    lora_merge_dtype: LoraDtypeOpt = None,
) -> None:
    """Merge the models of RECIPE into OUT_PATH: `ri-merge RECIPE OUT_PATH` as with mergekit-yaml,
    or `ri-merge RECIPE -o OUT_PATH`. mergekit-yaml's flags are taken too; those whose help says
    "No effect" have nothing to do in a streaming merge."""

    def body() -> None:
        from .api import MergeOptions

        folder = _output_folder(out_path, output, dry_run)
        options = MergeOptions(
            device=_merge_device(device, cuda or gpu_rich, unsafe_truncate_embeddings),
            threads=threads,
            prefetch=prefetch,
            max_memory=max_memory,
            force=force,
            report_layers=verbose,
            interference=verbose,
            checksums=as_json,
            seed=random_seed,
            out_shard_size=out_shard_size,
            copy_tokenizer=copy_tokenizer,
            write_model_card=write_model_card,
            intermediate_dir=intermediate_dir,
            resume=resume,
            fingerprint_inputs=fingerprint_inputs,
            ray=ray,
            unit_size=unit_size,
            devices=devices,
        )
        _run_merge(recipe, folder, options, dry_run=dry_run, quiet=quiet, as_json=as_json, verbose=verbose)

    _guarded(body, verbose)


@app.command("validate", cls=Command)
def validate(
    recipe: Annotated[Path, typer.Argument(help="The YAML recipe.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check a recipe and every input's headers, reading no weight."""

    def body() -> None:
        from .api import plan as make_plan

        plan = make_plan(recipe).plan
        if as_json:
            print(json.dumps({"valid": True, **plan.summary()}, indent=2))
        elif not quiet:
            out.line(
                f"{recipe}: valid — {len(plan.tasks)} tensors from {len(plan.experts)} model(s), "
                f"method {plan.method.name}"
            )
            for warning in plan.warnings:
                out.print(f"warning: {warning}", markup=False, soft_wrap=True)

    _guarded(body)


@app.command("extract-lora", cls=Command)
def extract_lora(  # noqa: PLR0913 -- mergekit-extract-lora's flags, one parameter each
    model: Annotated[str, typer.Option("--model", help="The fine-tuned (or merged) model.")],
    base_model: Annotated[str, typer.Option("--base-model", help="Its base model.")],
    out_path: Annotated[Path, typer.Option("--out-path", "-o", help="The adapter folder to write.")],
    max_rank: Annotated[int, typer.Option("--max-rank", help="Largest rank of a module.")] = 128,
    distribute_scale: Annotated[
        bool, typer.Option("--distribute-scale/--no-distribute-scale", help="√S into both A and B.")
    ] = True,
    embed_lora: Annotated[
        bool, typer.Option("--embed-lora/--no-embed-lora", help="Decompose embeddings (else saved whole).")
    ] = False,
    save_module: Annotated[
        Optional[list[str]], typer.Option("--save-module", help="Save this module whole (repeatable).")
    ] = None,
    exclude_regex: Annotated[
        Optional[list[str]], typer.Option("--exclude-regex", "-e", help="Leave out matching modules.")
    ] = None,
    include_regex: Annotated[
        Optional[list[str]], typer.Option("--include-regex", "-i", help="Only matching modules.")
    ] = None,
    sv_epsilon: Annotated[
        float, typer.Option("--sv-epsilon", help="Drop singular values at or below this.")
    ] = 0.0,
    energy: Annotated[
        Optional[float],
        typer.Option(
            "--energy", help="Per module, the fewest singular values keeping this share of ‖τ‖² (0-1]."
        ),
    ] = None,
    skip_undecomposable: Annotated[
        bool, typer.Option("--skip-undecomposable", help="Leave out tensors that are not 2-D weights.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (the SVDs).")] = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """A model's difference from its base as a PEFT LoRA adapter (like mergekit-extract-lora)."""

    def body() -> None:
        from .extract_lora import ExtractOptions
        from .extract_lora import extract_lora as run

        options = ExtractOptions(
            max_rank=max_rank,
            distribute_scale=distribute_scale,
            embed_lora=embed_lora,
            modules_to_save=tuple(save_module or ()),
            exclude_regexes=tuple(exclude_regex or ()),
            include_regexes=tuple(include_regex or ()),
            sv_epsilon=sv_epsilon,
            energy=energy,
            skip_undecomposable=skip_undecomposable,
        )
        summary = run(model, base_model, out_path, options, device=device, force=force).summary()
        if as_json:
            print(json.dumps(summary, indent=2))
        elif not quiet:
            out.print(
                f"{out_path}: {summary['modules']} modules at rank {summary['rank_min']}–{summary['rank_max']} "
                f"(worst relative error {summary['worst_relative_error']:.3g}), {summary['saved_whole']} "
                f"tensors saved whole, {_human(summary['bytes_written'])}",
                markup=False,
                highlight=False,
            )

    _guarded(body, verbose)


@app.command("methods", cls=Command)
def methods(as_json: JsonOpt = False) -> None:
    """List the merge methods and their parameters."""
    from .methods import all_methods

    specs = all_methods()
    if as_json:
        print(
            json.dumps(
                {
                    name: {
                        "summary": s.summary,
                        "needs_base": s.needs_base,
                        "citation": s.citation,
                        "parameters": [
                            {
                                "name": p.name,
                                "default": p.default,
                                "per_model": p.per_model,
                                "doc": p.doc,
                                **({"choices": list(p.choices)} if p.choices else {}),
                            }
                            for p in s.params
                        ],
                    }
                    for name, s in specs.items()
                },
                indent=2,
            )
        )
        return
    plain = out.surely_plain  # no styles to show: the lines as they are, without loading rich
    for name, spec in specs.items():
        no_base = "" if spec.needs_base else " (no base needed)"
        if plain:
            out.line(f"{name} — {spec.summary}{no_base}")
        else:
            out.print(f"[bold]{name}[/bold] — {spec.summary}{no_base}")
        for p in spec.params:
            scope = "per model" if p.per_model else "global"
            out.line(f"    {p.name} = {p.default!r} ({scope}): {p.doc}")
        if plain:
            out.line(f"    {spec.citation}")
        else:
            out.print(f"    [dim]{spec.citation}[/dim]")


@app.command("demo", cls=Command)
def demo(
    folder: Annotated[
        Optional[Path],
        typer.Option(
            "--dir",
            show_default=False,
            help="Where to write the demo checkpoints and the merge (default ri-merge-demo, with --ri "
            "ri-merge-demo-ri).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    ri: Annotated[
        bool,
        typer.Option(
            "--ri",
            help="RI instead: train a tiny image-classifier base and 4 experts on procedural tasks, merge "
            "them with task arithmetic with and without resolve_interference, print each task's accuracy "
            "(about a minute on a CPU; default --dir ri-merge-demo-ri).",
        ),
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="With --ri: a smaller, faster run (for tests).")
    ] = False,
) -> None:
    """Generate a tiny Llama-style base + 2 experts and merge them with configs/demo.yaml
    (--ri: show what RI does to a merge of image classifiers)."""

    def body() -> None:
        from .api import MergeOptions

        if ri:
            _ri_demo(folder or Path("ri-merge-demo-ri"), quick, quiet, as_json)
            return
        if quick:
            raise UserError("--quick goes with --ri: ri-merge demo --ri --quick")
        where = folder or Path("ri-merge-demo")
        recipe = prepare_demo_folder(where)
        if not quiet and not as_json:
            out.print(
                f"wrote a tiny base and 2 experts under {where}/, recipe {recipe}",
                markup=False,
                highlight=False,
            )
        _run_merge(
            recipe,
            where / "merged",
            MergeOptions(force=True, checksums=as_json),
            quiet=quiet or as_json,
            as_json=as_json,
        )
        if not quiet and not as_json:
            out.print(_check_loads(where / "merged"), markup=False, highlight=False)

    _guarded(body)


def _ri_demo(folder: Path, quick: bool, quiet: bool, as_json: bool) -> None:
    """`ri-merge demo --ri`: the RI demo's table (or its JSON) on stdout, bars on stderr."""
    from .demo_ri import render_table, ri_demo

    bars = not quiet and not as_json and err.is_terminal
    report = ri_demo(folder, quick=quick, progress=bars)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    if quiet:
        return
    out.print(render_table(report))
    xi = report.interference
    out.print(
        f"interference ξ on the auxiliary images: {xi['without_ri']:.2f} without RI, "
        f"{xi['with_ri']:.2f} with RI (lower: the merge stays closer to each expert)",
        markup=False,
        highlight=False,
    )
    out.print(
        f"{report.seconds:.0f}s. Models, auxiliary images, merges and the recipes under {folder}/; rerun the "
        f"RI merge with: ri-merge {report.recipe} -o my-merge -v",
        markup=False,
        highlight=False,
    )


def _check_loads(folder: Path) -> str:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "(install transformers to check that the merged model loads)"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder)
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    return f"transformers loads {folder} as {type(model).__name__}; forward pass logits {tuple(logits.shape)}"


@app.command("version", cls=Command)
def version() -> None:
    """Print the version."""
    print(__version__)


SUBCOMMANDS = {"merge", "validate", "methods", "demo", "version", "extract-lora"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: a first argument that is not a subcommand or an option means `merge`.

    The cyclic garbage collector runs 70x less often than Python's default: importing torch
    allocates ~10^6 objects, and the default thresholds rescanned them all three times (0.15 s,
    10% of a small merge). Cycles are still collected, just in bigger batches. numpy's OpenBLAS
    (which no merge uses) gets one thread: its idle workers otherwise spin for 0.1 s of CPU at
    import. pydantic looks for plugins (observability hooks) in the entry points of every
    installed distribution the first time it builds a validator, for hooks these commands have
    no use for: they are turned off. `ri-merge version` is answered before typer parses
    anything, which would import pydantic for an option-less command (half of its start-up)."""
    gc.set_threshold(50_000, 20, 20)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    args = _bare_ray(list(sys.argv[1:] if argv is None else argv))
    if args == ["version"]:
        print(__version__)
        sys.exit(0)  # as typer ends a command
    _INVOKED[:] = args
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        args.insert(0, "merge")
    try:
        app(args, prog_name="ri-merge")
    finally:
        _INVOKED.clear()


def _bare_ray(args: list[str]) -> list[str]:
    """`--ray` without an address (last, or followed by another option) means `--ray local`."""
    return [
        "--ray=local" if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")) else a
        for i, a in enumerate(args)
    ]


def entry() -> None:
    """The `ri-merge` command (and `python -m mergekit_ri.cli`): `main`, then a fast exit.

    By the time `main` returns or exits, every output is written, closed and renamed into place
    (or its staging folder removed) and the engine's reader and writer threads are joined; what is
    left is the interpreter tearing down torch's ~10^6 objects, which takes a second on a small
    machine (a third of a 250M-parameter merge), so the process ends right there with the same
    exit code, its output streams flushed. An unexpected exception takes the normal way out, with
    its traceback. (`main` itself returns normally, for callers in the same process.)"""
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
