"""The flows' results as Prefect artifacts, so that whoever runs `webdistill serve` (or opens the
Prefect UI) sees what a run found, not only its states: each flow's summary as a table, a
selection's class coverage, the rounds with the students' accuracy, the report's path and, with a
ground truth, the AUROC of every score. Called at the end of a flow, inside its run; the stage
code never sees Prefect.

Keys (Prefect allows lowercase letters, digits and dashes) are fixed per kind, so the UI keeps one
history per kind: `<stage>-summary`, `selection-coverage`, `pipeline-rounds`, `report`,
`report-auroc`."""
from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def _cell(value: object) -> object:
    """A table cell: numbers and short text as they are, anything else as (cut) JSON."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:199] + "…"


def publish_summary(stage: str, summary: dict, title: str | None = None) -> None:
    """The summary a stage's runner returned, one row per field."""
    rows = [{"field": k, "value": _cell(v)} for k, v in summary.items()]
    create_table_artifact(table=rows, key=f"{stage}-summary", description=title or f"{stage}: summary")


def publish_coverage(summary: dict) -> None:
    """A selection's samples per pseudo-class: the first thing to check (a policy that lets one class
    take the budget gives a poor student)."""
    from curation.coverage import coverage_text

    counts = summary.get("counts_per_class") or {}
    rows = [{"class": k, "samples": int(v)} for k, v in counts.items()]
    coverage = coverage_text(summary["coverage"]) if summary.get("coverage") else "class coverage unknown"
    create_table_artifact(table=rows or [{"class": None, "samples": 0}], key="selection-coverage",
                          description=f"selection {summary.get('name')}: {summary.get('size')} samples from scoring "
                          f"run {summary.get('score_run')}, per pseudo-class ({coverage})")


def publish_rounds(rounds: list[dict]) -> None:
    """Per round: the selection, its size and scoring run, and the student's eval accuracy."""
    rows = [{"round": r["round"], "selection": r["selection"]["name"], "size": r["selection"]["size"],
             "score_run": r["selection"].get("score_run"),
             "student": (r.get("student") or {}).get("name"),
             "eval_accuracy": (r.get("student") or {}).get("eval_accuracy")} for r in rounds]
    create_table_artifact(table=rows, key="pipeline-rounds", description="pipeline: selection and student per round")


def publish_report(summary: dict) -> None:
    """Where the report is, what it holds, and the AUROC table when a ground truth was given."""
    lines = [f"**Report:** `{summary['path']}` ({summary['bytes'] / 2**20:.1f} MiB, built in {summary['seconds']} s; "
             "open it in a browser, it needs no network)", "",
             f"{summary['samples']:,} samples, {summary['rejected']:,} rejected; ground truth: "
             f"{summary['truth'] or 'none'}", "", "| selection | size | score run | precision |", "|---|---|---|---|"]
    for s in summary["selections"]:
        precision = f"{s['precision']:.3f}" if s.get("precision") is not None else "no truth"
        lines.append(f"| {s['name']} | {s['size']} | {s['score_run']} | {precision} |")
    lines += ["", "| student | selection | eval accuracy |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['selection']} | {s['eval_accuracy']} |" for s in summary["students"]]
    create_markdown_artifact(markdown="\n".join(lines), key="report", description="webdistill report")
    rows = [{"score_run": run, "score": r["score"], "auroc": r["auroc"]}
            for run, scores in summary.get("auroc", {}).items() for r in scores]
    if rows:
        create_table_artifact(table=rows, key="report-auroc",
                              description="AUROC of each score for the ground truth's in_domain")
