"""What `speechllm eval` writes: report.json, report.md, predictions.jsonl, metrics.png, and a table on stdout.

One row per task; one column per instruction set (seen, held-out). A task's cell lists its registered
metric first, then the companions (e.g. `macro_f1 / accuracy`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from speechllm.evaluation.evaluate import EvalReport
from speechllm.evaluation.metrics import TaskScores

SAMPLES_PER_TASK = 3  # example predictions kept in report.json, per task and instruction set
SET_TITLES = {"seen": "seen", "heldout": "held-out"}
FILES = {"json": "report.json", "markdown": "report.md", "predictions": "predictions.jsonl", "chart": "metrics.png"}


def write_reports(report: EvalReport, chart: bool = True) -> None:
    """Write every report file into `report.out_dir`; `report.files` names them."""
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report.files = {kind: out / name for kind, name in FILES.items() if chart or kind != "chart"}
    with open(report.files["predictions"], "w", encoding="utf-8") as f:
        for p in report.predictions:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
    report.files["markdown"].write_text(markdown(report))
    if chart:
        draw_chart(report, report.files["chart"])
    report.files["json"].write_text(json.dumps(summary(report), indent=2, ensure_ascii=False) + "\n")


def task_rows(report: EvalReport) -> list[tuple[TaskScores, dict[str, TaskScores]]]:
    """Per task (registry order): its scores under the first instruction set, and under each set."""
    by_set = {s: {t.task: t for t in scores} for s, scores in report.scores.items()}
    first = report.scores[report.instruction_sets[0]]
    return [(t, {s: by_set[s][t.task] for s in report.instruction_sets}) for t in first]


def summary(report: EvalReport) -> dict:
    tasks = {}
    for scores, per_set in task_rows(report):
        entry = {
            "metric": scores.metric,
            "metrics": list(scores.values),
            "higher_is_better": scores.higher_is_better,
            "examples": scores.examples,
            "max_new_tokens": report.budgets[scores.task],
        }
        entry.update({s: per_set[s].values for s in report.instruction_sets})
        entry["samples"] = {
            s: [asdict(p) for p in report.predictions if p.task == scores.task and p.instructions == s][:SAMPLES_PER_TASK]
            for s in report.instruction_sets
        }
        tasks[scores.task] = entry
    return {
        "run_dir": str(report.run_dir),
        "checkpoint": str(report.checkpoint),
        **report.details,
        "instructions": report.instruction_sets,
        "examples": len(report.predictions) // len(report.instruction_sets),
        "seconds": round(report.seconds, 2),
        "files": {kind: str(path) for kind, path in report.files.items()},
        "tasks": tasks,
    }


def markdown(report: EvalReport) -> str:
    d = report.details
    decoding = "greedy" if d["num_beams"] == 1 else f"beam search ({d['num_beams']} beams)"
    lines = [
        f"# Evaluation of `{report.run_dir}`",
        "",
        f"Checkpoint `{report.checkpoint.name}` (stage {d['stage']}, phase {d['phase']}, step {d['global_step']}); "
        f"split `{d['split']}`: {', '.join(f'`{m}`' for m in d['manifests'])}; "
        f"{len(report.predictions) // len(report.instruction_sets)} examples; {decoding}; "
        f"WER normalisation: {d['wer_normalize']}. ↑ higher is better, ↓ lower is better.",
        "",
        "| task | metric | examples | " + " | ".join(SET_TITLES[s] for s in report.instruction_sets) + " |",
        "|---|---|---:|" + "---:|" * len(report.instruction_sets),
    ]
    for scores, per_set in task_rows(report):
        cells = [" / ".join(_value(v) for v in per_set[s].values.values()) for s in report.instruction_sets]
        lines.append(f"| {scores.task} | {_metric_names(scores)} | {scores.examples} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_chart(report: EvalReport, path: Path) -> None:
    """Grouped bars: one group per (task, metric), one bar per instruction set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [(scores.task, metric, scores.higher_is_better[metric], per_set)
              for scores, per_set in task_rows(report) for metric in scores.values]
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(report.instruction_sets)
    for k, instruction_set in enumerate(report.instruction_sets):
        values = [per_set[instruction_set].values[metric] for _, metric, _, per_set in groups]
        xs = [i + (k - (len(report.instruction_sets) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=f"{SET_TITLES[instruction_set]} instructions")
        ax.bar_label(bars, labels=[_value(v, 2) for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{t}\n{m} {'↑' if up else '↓'}" for t, m, up, _ in groups], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"{report.run_dir} (step {report.details['global_step']}, split {report.details['split']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(report: EvalReport, console: Console | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"{report.run_dir} ({report.checkpoint.name})")
    table.add_column("task")
    table.add_column("metric", no_wrap=True)
    table.add_column("examples", justify="right")
    for s in report.instruction_sets:
        table.add_column(SET_TITLES[s], justify="right")
    for scores, per_set in task_rows(report):
        cells = [" / ".join(_value(v) for v in per_set[s].values.values()) for s in report.instruction_sets]
        table.add_row(scores.task, _metric_names(scores), str(scores.examples), *cells)
    (console or Console()).print(table)


def _metric_names(scores: TaskScores) -> str:
    return " / ".join(f"{m} {'↑' if scores.higher_is_better[m] else '↓'}" for m in scores.values)


def _value(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
