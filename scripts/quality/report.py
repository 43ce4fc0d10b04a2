"""The table (terminal, Markdown, JSON) and the bar chart.

A row is one model evaluated on every task's test split: its per-task accuracy, their average,
and the normalised accuracy (merged / that task's expert, averaged) — the papers' two numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    name: str
    kind: str  # "pretrained" | "experts" | "default" | "tuned" | "ri-default" | "ri-tuned"
    test: dict[str, float]
    val: dict[str, float] = field(default_factory=dict)
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    scale: str | None = None
    scale_value: float | None = None
    heads_untouched: bool | None = None
    merge_seconds: float | None = None
    group: str = ""  # the chart's line: a method's default and tuned rows share one

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    @property
    def average(self) -> float:
        return sum(self.test.values()) / len(self.test)

    def normalised(self, experts: dict[str, float]) -> dict[str, float]:
        return {t: self.test[t] / experts[t] for t in self.test if experts.get(t)}

    def normalised_average(self, experts: dict[str, float]) -> float:
        values = self.normalised(experts)
        return sum(values.values()) / len(values)


def short(task: str) -> str:
    return task if len(task) <= 9 else task[:8] + "…"


def table_lines(rows: list[Row], tasks: list[str], experts: dict[str, float], markdown: bool) -> list[str]:
    """The table as text: Markdown pipes, or aligned columns for the terminal."""
    header = ["model", *[short(t) for t in tasks], "avg", "norm"]
    body = [
        [
            row.name,
            *[f"{100 * row.test[t]:.1f}" for t in tasks],
            f"{100 * row.average:.1f}",
            f"{100 * row.normalised_average(experts):.1f}",
        ]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return lines
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(c) for c in body]]


def summary_lines(rows: list[Row]) -> list[str]:
    """One Markdown line per method: average test accuracy at the defaults and with λ / α chosen
    on validation, with and without RI — the table to read first."""
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        if row.method is None:
            continue
        value = f"{100 * row.average:.1f}"
        if row.kind.endswith("tuned"):
            value += f" ({row.scale}={row.scale_value:g})"
        cells.setdefault(row.group.removeprefix("RI + "), {})[row.kind] = value
    kinds = ["default", "tuned", "ri-default", "ri-tuned"]
    present = [k for k in kinds if any(k in c for c in cells.values())]
    titles = {
        "default": "defaults",
        "tuned": "λ / α on val",
        "ri-default": "RI + defaults",
        "ri-tuned": "RI + λ / α on val",
    }
    refs = {r.kind: f"{100 * r.average:.1f}" for r in rows if r.method is None}
    lines = [
        f"pretrained (probe heads): **{refs.get('pretrained', '?')}** · individual experts: "
        f"**{refs.get('experts', '?')}** (average test accuracy, %)",
        "",
        "| method | " + " | ".join(titles[k] for k in present) + " |",
        "|---|" + "---|" * len(present),
    ]
    lines += [
        f"| {group} | " + " | ".join(c.get(k, "–") for k in present) + " |" for group, c in cells.items()
    ]
    return lines


def write_json(
    path: Path, rows: list[Row], tasks: list[str], experts: dict[str, float], extra: dict[str, Any]
) -> None:
    data = {
        **extra,
        "tasks": tasks,
        "rows": [
            {
                **asdict(row),
                "average": row.average,
                "normalised": row.normalised(experts),
                "normalised_average": row.normalised_average(experts),
            }
            for row in rows
        ],
    }
    path.write_text(json.dumps(data, indent=1))


def write_markdown(
    path: Path, rows: list[Row], tasks: list[str], experts: dict[str, float], notes: list[str]
) -> None:
    lines = [
        "# Merge quality",
        "",
        *summary_lines(rows),
        "",
        "## Every row",
        "",
        *table_lines(rows, tasks, experts, markdown=True),
        "",
        *notes,
        "",
    ]
    path.write_text("\n".join(lines))


COLOURS = {
    "pretrained": "#9e9e9e",
    "experts": "#2e7d32",
    "default": "#90caf9",
    "tuned": "#1565c0",
    "ri-default": "#ffcc80",
    "ri-tuned": "#ef6c00",
}
LEGEND = {
    "default": "defaults",
    "tuned": "λ / α chosen on validation",
    "ri-default": "RI, defaults",
    "ri-tuned": "RI, λ / α on validation",
}


def write_chart(path: Path, rows: list[Row], experts: dict[str, float], title: str) -> bool:
    """One line per method (its default and validation-tuned bars side by side), plus the
    pretrained and expert references as bars and vertical lines. Returns False (and writes
    nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys(r.group for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(groups) + 1.3), dpi=72)
    seen: set[str] = set()
    for line, group in enumerate(groups):
        members = [r for r in rows if r.group == group]
        height = 0.8 / len(members)
        for k, row in enumerate(members):
            y = len(groups) - 1 - line + 0.4 - height * (k + 0.5)
            label = LEGEND.get(row.kind) if row.kind not in seen else None
            seen.add(row.kind)
            ax.barh(
                y,
                100 * row.average,
                height=height * 0.92,
                color=COLOURS.get(row.kind, "#757575"),
                label=label,
            )
            ax.text(100 * row.average + 0.3, y, f"{100 * row.average:.1f}", va="center", fontsize=6)
    for kind, style in (("pretrained", ":"), ("experts", "--")):
        ref = next((r for r in rows if r.kind == kind), None)
        if ref:
            ax.axvline(100 * ref.average, color=COLOURS[kind], linestyle=style, linewidth=1)
    ax.set_yticks(range(len(groups)), groups[::-1], fontsize=7)
    values = [100 * r.average for r in rows]
    ax.set_xlim(max(0.0, min(values) - 5), min(100.0, max(values) + 5))
    ax.set_xlabel("average test accuracy over the tasks (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
