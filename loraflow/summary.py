"""The end-of-run summary: one screen for a person, the same as JSON in <home>/last-run.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_summary(summary: dict[str, Any], home: Path) -> Path:
    path = Path(home) / "last-run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def render(summary: dict[str, Any]) -> str:
    """A pipeline run's summary; an align-only run's (flows/align.py) has the align part alone."""
    lines = [
        "loraflow run summary",
        f"  MLflow run       {summary['run_id']}  ({summary['tracking_uri']})",
    ]
    if "sweep" in summary:
        lines += sweep_lines(summary["sweep"], summary["metrics"]["tuned"])
    if "model_version" in summary:
        lines += sft_lines(summary)
    if "align" in summary:
        lines += align_lines(summary["align"])
    lines += ["", f"  {'task':<22}{'state':<11}{'seconds':>9}"]
    for name, step in summary["tasks"].items():
        lines.append(f"  {name:<22}{step['state']:<11}{step['seconds']:>9.1f}")
    lines.append(f"  {'total':<33}{summary['seconds']:>9.1f}")
    return "\n".join(lines)


def sft_lines(summary: dict[str, Any]) -> list[str]:
    """The registered model, its gate and where it went, and base against tuned."""
    base, tuned = summary["metrics"]["base"], summary["metrics"]["tuned"]
    lines = [
        f"  registered model {summary['model_name']} v{summary['model_version']}"
        f"  aliases: {', '.join(summary['aliases']) or '-'}",
        f"  gate             {summary['gate']}",
        f"  storage          {summary['storage_uri']}",
        f"  report           {summary.get('report_uri', '-')}",
        "",
        f"  {'test metric':<16}{'base':>8}{'tuned':>8}{'delta':>9}",
    ]
    # the primary test set's metrics: the unprefixed names both sides report
    for metric in [m for m in tuned if "." not in m and m in base and m != "examples"]:
        delta = tuned[metric] - base[metric]
        lines.append(f"  {metric:<16}{base[metric]:>8.3f}{tuned[metric]:>8.3f}{delta:>+9.3f}")
    if summary.get("exports"):
        lines += ["", f"  {'export':<20}{'agrees':>8}{'needed':>8}{'MB':>9}  answered by"]
        for e in summary["exports"]:
            size = sum(e["files"].values()) / 1e6
            name = e.get("name", e["format"])  # gguf-f16/llama.cpp: a second runtime, same file
            lines.append(f"  {name:<20}{e['agreement']:>8.3f}{e['min_agreement']:>8.3f}"
                         f"{size:>9.1f}  {e['runtime']}")
    lines += [f"  note: {note}" for note in summary.get("export_notes", [])]
    return lines


def sweep_lines(sweep: dict[str, Any], test: dict[str, float]) -> list[str]:
    """The trials, and the winner's validation score beside its test scores: the winner was
    chosen on the validation split and the test split was read for it alone, by the gate."""
    trials = sweep["trials"]
    winner = next(t for t in trials if t["number"] == sweep["winner"])
    completed = sum(t["state"] == "COMPLETE" for t in trials)
    pruned = sum(t["state"] == "PRUNED" for t in trials)
    objective = sweep["objective"]
    settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in winner["params"].items())
    lines = [
        f"  sweep            {len(trials)} trials: {completed} completed, {pruned} pruned, "
        f"{len(trials) - completed - pruned} failed  (study {sweep['study']})",
        f"  winner           trial {winner['number']}: {settings}",
        "                   chosen on the validation split only; the test split was read "
        "once, for the winner, by the gate",
        "",
        f"  {'winner':<16}{'validation':>11}{'test':>8}",
    ]
    test_name = "loss" if objective == "val_loss" else objective
    same = f"{test[test_name]:>8.3f}" if test_name in test else f"{'-':>8}"
    lines.append(f"  {objective:<16}{winner['value']:>11.4f}{same}")
    for trial in trials:
        if trial["state"] != "COMPLETE":
            lines.append(f"  trial {trial['number']:<3} {trial['state'].lower():<8} "
                         f"{(trial['reason'] or '')[:90]}")
    return lines


def align_lines(align: dict[str, Any]) -> list[str]:
    """The align stage: its version and gate, and base / SFT / aligned side by side."""
    metrics = align["metrics"]
    lines = [
        "",
        f"  aligned model    v{align['model_version']} (on SFT v{align['parent_version']})"
        f"  aliases: {', '.join(align['aliases']) or '-'}",
        f"  align gate       {align['gate']}",
        "",
        f"  {'metric':<22}{'base':>8}{'sft':>8}{'aligned':>9}",
    ]
    aligned, sft = metrics["aligned"], metrics["sft"]
    base = {f"pref_{k}": v for k, v in metrics["base"].items()}
    def cell(values: dict[str, float], metric: str) -> str:
        return f"{values[metric]:>8.3f}" if metric in values else f"{'-':>8}"

    for metric in [m for m in aligned if "." not in m and m != "examples"]:
        lines.append(f"  {metric:<22}{cell(base, metric)}{cell(sft, metric)}"
                     f"{aligned[metric]:>9.3f}")
    if any(m.startswith("pref_reward_") for m in aligned):
        lines.append("  (pref_reward_*: the aligned model against its reference, the SFT model)")
    return lines
