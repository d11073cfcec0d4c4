"""The evaluation report a person looks at: loss curves and base/tuned/champion metric bars as
PNGs, and one self-contained HTML page that embeds them beside a side-by-side table of answers.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from loraflow.config import LOWER_IS_BETTER  # noqa: E402
from loraflow.evaluation.evaluate import AnswerParity, EvalResult  # noqa: E402
from loraflow.evaluation.gate import Flip, GateDecision  # noqa: E402
from loraflow.search import SweepOutcome  # noqa: E402

COLOURS = {"base": "#7f7f7f", "tuned": "#1f77b4", "champion": "#ff7f0e"}
OTHER_COLOURS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
SHARE_HIDDEN = {"examples", "fuzzy_p10", "fuzzy_p50", "fuzzy_p90", "thresholds_met"}

Curve = list[tuple[int, float]]


def colour(label: str, index: int) -> str:
    return COLOURS.get(label, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def plot_loss_curves(curves: dict[str, Curve], out: Path) -> Path | None:
    """Training and validation loss per step; None when no curve was recorded."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    styles = {"train.loss": ("#1f77b4", "-", "training loss"),
              "train.val_loss": ("#d62728", "o--", "validation loss")}
    for name, points in curves.items():
        steps, values = zip(*sorted(points), strict=True)
        colour_, style, label = styles.get(name, ("#2ca02c", "-", name))
        ax.plot(steps, values, style, color=colour_, label=label, markersize=5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_metric_bars(results: dict[str, EvalResult], out: Path) -> Path:
    """One row per test set: shares and ratios (0..1, higher is better) on the left, held-out
    loss (lower is better) on the right, one bar per model."""
    labels = list(results)
    set_names = list(next(iter(results.values())).sets)
    fig, axes = plt.subplots(
        len(set_names), 2, figsize=(10, 3.4 * len(set_names)), dpi=100,
        gridspec_kw={"width_ratios": [4, 1]}, squeeze=False,
    )
    for row, set_name in enumerate(set_names):
        shares_ax, loss_ax = axes[row]
        metrics = [
            m for m in results[labels[0]].sets[set_name]
            if m not in SHARE_HIDDEN and m not in LOWER_IS_BETTER
        ]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [results[label].sets[set_name].get(m, 0.0) for m in metrics]
            positions = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(metrics))]
            shares_ax.bar(positions, values, width, label=label, color=colour(label, i))
        shares_ax.set_xticks(range(len(metrics)), metrics, rotation=20)
        shares_ax.set_ylim(0, 1.05)
        shares_ax.set_title(f"{set_name}: higher is better")
        shares_ax.grid(axis="y", alpha=0.3)
        shares_ax.legend(loc="upper left", fontsize="small")
        losses = [results[label].sets[set_name].get("loss") for label in labels]
        if any(v is not None for v in losses):
            loss_ax.bar(
                range(len(labels)), [v or 0.0 for v in losses],
                color=[colour(label, i) for i, label in enumerate(labels)],
            )
            loss_ax.set_xticks(range(len(labels)), labels, rotation=20)
            loss_ax.set_title("loss: lower is better")
        else:
            loss_ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_fuzzy_distribution(
    results: dict[str, EvalResult], set_name: str, out: Path
) -> Path | None:
    """How close answers come to the expected output, example by example."""
    values = {
        label: [r["scores"]["fuzzy"] for r in result.examples.get(set_name, [])
                if "fuzzy" in r["scores"]]
        for label, result in results.items()
    }
    if not any(values.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    bins = [i / 20 for i in range(21)]
    for i, (label, scores) in enumerate(values.items()):
        ax.hist(scores, bins=bins, histtype="step", linewidth=2, label=label,
                color=colour(label, i))
    ax.set_xlabel("fuzzy match ratio (difflib) to the expected output")
    ax.set_ylabel("examples")
    ax.set_title(f"{set_name}: distribution of fuzzy match")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_decision(decision: GateDecision, out: Path) -> Path | None:
    """The gate metric's and each guard's paired improvement: the estimate, its interval
    (lower end: the one-sided bound the gate reads) and the line it must clear."""
    tests = [t for t in [decision.primary, *decision.guards] if t is not None]
    if not tests:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.7 + 0.6 * len(tests)), dpi=100)
    for row, test in enumerate(reversed(tests)):
        colour_ = "#2ca02c" if test.passed else "#d62728"
        ax.plot([test.lower, test.upper], [row, row], color=colour_, linewidth=3)
        ax.plot([test.estimate], [row], "o", color=colour_)
        ax.plot([test.margin, test.margin], [row - 0.35, row + 0.35], color="#222",
                linestyle="--")
    ax.axvline(0.0, color="#999", linewidth=0.8)
    ax.set_yticks(range(len(tests)), [t.metric for t in reversed(tests)])
    ax.set_xlabel(f"improvement over {decision.reference_name} (paired; dashed: what the "
                  "lower end must reach)")
    ax.set_title(f"Promotion gate: {tests[0].confidence:.0%} one-sided bounds")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def decision_section(decision: GateDecision, figure: Path | None) -> list[str]:
    """The verdict, the interval plot, the guards and the examples that flipped each way."""
    esc = html.escape
    verdict = "promote" if decision.promote else "keep"
    parts = [f"<h2>Decision: {verdict}</h2><p id='decision' class="
             f"'{'note' if decision.promote else 'fail'}'>{esc(decision.verdict)}</p>"]
    if figure is not None:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img class='figure' alt='decision' src='data:image/png;base64,{data}'>")
    if decision.detectable is not None:
        parts.append(f"<p class='note'>With {decision.primary.examples} paired examples the "
                     f"smallest improvement this test set can show 4 times in 5 is "
                     f"{decision.detectable:.3f} at best (no answer lost).</p>")
    if decision.guards:
        parts.append("<table id='guards'><tr><th>guard</th><th>change</th><th>lower bound"
                     "</th><th>must stay above</th><th></th></tr>")
        parts += [f"<tr><td>{esc(g.metric)}</td><td>{g.estimate:+.3f}</td>"
                  f"<td>{g.lower:+.3f}</td><td>{g.margin:+.3f}</td>"
                  f"<td>{'held' if g.passed else 'FAILED'}</td></tr>" for g in decision.guards]
        parts.append("</table>")
    if decision.exports:
        parts.append("<table id='exports'><tr><th>export</th><th>answered as evaluated</th>"
                     "<th>needed</th><th>runtime</th><th>bytes</th><th></th></tr>")
        parts += [f"<tr><td>{esc(c.name)}</td><td>{c.agreement:.3f} of {c.answers}</td>"
                  f"<td>{c.min_agreement:.3f}</td><td>{esc(c.runtime)}</td>"
                  f"<td>{sum(c.files.values()):,}</td>"
                  f"<td>{'held' if c.passed else 'FAILED'}</td></tr>" for c in decision.exports]
        parts.append("</table>")
    for name, flipped in (("won", decision.won), ("lost", decision.lost)):
        parts += flips_table(name, flipped, decision.reference_name)
    return parts


def flips_table(name: str, flipped: list[Flip], reference_name: str) -> list[str]:
    esc = html.escape
    if not flipped:
        return []
    parts = [f"<h3>Examples {name} against {esc(reference_name)}</h3><table id='{name}'>"
             f"<tr><th>prompt</th><th>expected</th><th>candidate</th><th>"
             f"{esc(reference_name)}</th></tr>"]
    parts += [f"<tr><td><pre>{esc(f.input)}</pre></td><td><pre>{esc(f.expected)}</pre></td>"
              f"<td><pre>{esc(f.candidate)}</pre></td><td><pre>{esc(f.reference)}</pre></td>"
              "</tr>" for f in flipped]
    return [*parts, "</table>"]


def render_html(
    results: dict[str, EvalResult],
    figures: list[Path],
    side_by_side: int,
    title: str = "loraflow evaluation",
    notes: tuple[str, ...] = (),
    parity: AnswerParity | None = None,
    top: list[str] | None = None,
) -> str:
    """One page with everything inlined (figures as data: URIs), so it opens anywhere."""
    labels = list(results)
    first = results[labels[0]]
    primary = next(iter(first.sets))
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Models: {', '.join(esc(label) for label in labels)}. Same prompts, template and "
        "decoding for every model.</p>",
    ]
    parts += [f"<p class='note'>{esc(note)}</p>" for note in notes]
    parts += top or []  # the gate's decision
    for label, result in results.items():
        if result.failed_thresholds:
            parts.append(
                f"<p class='fail'>{esc(label)} misses thresholds: "
                f"{esc('; '.join(result.failed_thresholds))}</p>"
            )
    parts.append("<h2>Metrics</h2><table id='metrics'><tr><th>set</th><th>metric</th>")
    parts += [f"<th>{esc(label)}</th>" for label in labels]
    parts.append("</tr>")
    for set_name, metrics in first.sets.items():
        for metric in metrics:
            cells = "".join(
                f"<td>{results[label].sets.get(set_name, {}).get(metric, float('nan')):.4g}</td>"
                for label in labels
            )
            parts.append(f"<tr><td>{esc(set_name)}</td><td>{esc(metric)}</td>{cells}</tr>")
    parts.append("</table>")
    if parity is not None:
        parts += parity_section(parity)
    parts.append("<h2>Figures</h2>")
    for figure in figures:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(
            f"<figure><img class='figure' alt='{esc(figure.stem)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{esc(figure.stem)}</figcaption>"
            "</figure>"
        )
    rows = first.examples.get(primary, [])[:side_by_side]
    parts.append(
        f"<h2>Side by side: the first {len(rows)} examples of '{esc(primary)}'</h2>"
        "<table id='side-by-side'><tr><th>#</th><th>prompt</th><th>expected</th>"
    )
    parts += [f"<th>{esc(label)}</th>" for label in labels]
    parts.append("</tr>")
    for i, row in enumerate(rows):
        prompt = row["input"] or row["instruction"]
        cells = []
        for label in labels:
            answer = results[label].examples[primary][i]
            scores = answer["scores"]
            mark = ("match" if scores.get("exact_match") else "miss") if "exact_match" in scores \
                else "answer"
            detail = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None)
            cells.append(
                f"<td class='{mark}'><pre>{esc(answer['answer'])}</pre>"
                f"<small>{esc(detail)}</small></td>"
            )
        parts.append(
            f"<tr class='example'><td>{i + 1}</td><td><pre>{esc(prompt)}</pre></td>"
            f"<td><pre>{esc(row['expected'])}</pre></td>{''.join(cells)}</tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)


def parity_section(parity: AnswerParity) -> list[str]:
    """How many test answers the merged model (what ships) gives differently from base +
    adapter, and which."""
    esc = html.escape
    parts = [
        "<h2>Merge check</h2><p id='parity'>"
        f"{parity.differing} of {parity.answers} test answers differ between base + adapter "
        f"({esc(parity.reference_dtype)}) and the merged model that is registered (tuned); "
        f"allowed: {parity.max_differing:.0%}.</p>"
    ]
    if parity.examples:
        parts.append("<table id='differing'><tr><th>set</th><th>#</th><th>prompt</th>"
                     "<th>base + adapter</th><th>merged</th></tr>")
        parts += [
            f"<tr><td>{esc(e['set'])}</td><td>{int(e['index']) + 1}</td>"
            f"<td><pre>{esc(e['prompt'])}</pre></td><td><pre>{esc(e['adapter'])}</pre></td>"
            f"<td><pre>{esc(e['merged'])}</pre></td></tr>"
            for e in parity.examples
        ]
        parts.append("</table>")
    return parts


CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
pre { white-space: pre-wrap; word-break: break-word; max-width: 28em; margin: 0; }
td.match { background: #e6f4e6; } td.miss { background: #fbeaea; }
img.figure { max-width: 100%; border: 1px solid #ddd; }
.fail { color: #b00; font-weight: bold; } .note { color: #555; }
"""


def plot_sweep(sweep: SweepOutcome, out: Path) -> Path | None:
    """Parallel coordinates of the completed trials (each a line through its parameters,
    scaled to their ranges, coloured by the validation objective; the winner bold) beside
    each parameter's importance. None with no completed trial."""
    done = [t for t in sweep.trials if t.value is not None]
    if not done:
        return None
    names = list(done[0].params)
    axes_names = [*names, sweep.objective]
    values = [t.value for t in done]
    columns = [[position(t.params[n], [d.params[n] for d in done]) for t in done]
               for n in names] + [[position(v, values) for v in values]]
    fig, (lines, bars) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100,
                                      gridspec_kw={"width_ratios": [3, 1.2]})
    low, high = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    for row, trial in enumerate(done):
        shade = 0.5 if high == low else (trial.value - low) / (high - low)
        winner = trial.number == sweep.winner
        lines.plot(range(len(axes_names)), [c[row] for c in columns], "o-",
                   color="#d62728" if winner else cmap(shade), linewidth=3 if winner else 1.2,
                   label=f"winner: trial {trial.number}" if winner else None, zorder=3 if winner
                   else 2)
    for x, name in enumerate(names):  # each axis's extreme values, as the trials had them
        seen = sorted({str(t.params[name]) for t in done}, key=sort_key)
        lines.annotate(f"{seen[0]}", (x, -0.08), ha="center", fontsize=7, color="#555")
        lines.annotate(f"{seen[-1]}", (x, 1.04), ha="center", fontsize=7, color="#555")
    lines.annotate(f"{low:.4g}", (len(names), -0.08), ha="center", fontsize=7, color="#555")
    lines.annotate(f"{high:.4g}", (len(names), 1.04), ha="center", fontsize=7, color="#555")
    lines.set_xticks(range(len(axes_names)), axes_names, fontsize=8)
    lines.set_yticks([])
    lines.set_ylim(-0.15, 1.12)
    lines.set_title(f"Trials ({len(done)} completed of {len(sweep.trials)})")
    lines.legend(loc="lower right", fontsize=8)
    lines.grid(alpha=0.3, axis="x")
    if sweep.importances:
        ranked = sorted(sweep.importances.items(), key=lambda item: item[1])
        bars.barh([k for k, _ in ranked], [v for _, v in ranked], color="#1f77b4")
        bars.set_xlim(0, 1)
        bars.set_title("Importance (fANOVA)")
        bars.tick_params(axis="y", labelsize=8)
    else:
        bars.axis("off")
        bars.text(0.5, 0.5, "importance needs two or more\ncompleted trials that differ",
                  ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def sort_key(text: str) -> tuple[int, float | str]:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def position(value: Any, seen: list[Any]) -> float:
    """Where a value sits on its axis (0..1): numbers by value (log-spaced when all positive
    and wide apart), anything else by its rank among the values seen."""
    if all(isinstance(v, int | float) for v in seen):
        low, high = min(seen), max(seen)
        if high == low:
            return 0.5
        if low > 0 and high / low >= 10:
            return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        return (value - low) / (high - low)
    ranks = sorted({str(v) for v in seen})
    return 0.5 if len(ranks) == 1 else ranks.index(str(value)) / (len(ranks) - 1)


def sweep_section(sweep: SweepOutcome, figure: Path | None) -> list[str]:
    """Every trial: its settings, validation score or why it stopped; the winner marked."""
    esc = html.escape
    parts = [f"<h2>Sweep: {len(sweep.trials)} trials, winner trial {sweep.winner}</h2>"
             f"<p class='note'>Trials were compared on the validation split only "
             f"({esc(sweep.objective)}); the test split was read for the winner alone, by "
             "the gate below.</p>"]
    if figure is not None:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img class='figure' alt='sweep' src='data:image/png;base64,{data}'>")
    names = list(sweep.trials[0].params) if sweep.trials else []
    parts.append("<table id='trials'><tr><th>trial</th><th>state</th>"
                 + "".join(f"<th>{esc(n)}</th>" for n in names)
                 + f"<th>{esc(sweep.objective)} (validation)</th><th>note</th></tr>")
    for t in sweep.trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        mark = " (winner)" if t.number == sweep.winner else ""
        parts.append(f"<tr><td>{t.number}{mark}</td><td>{esc(t.state)}</td>"
                     + "".join(f"<td>{esc(str(t.params.get(n, '')))}</td>" for n in names)
                     + f"<td>{value}</td><td>{esc(t.reason or '')}</td></tr>")
    parts.append("</table>")
    return parts


def build_report(
    results: dict[str, EvalResult],
    curves: dict[str, Curve],
    out_dir: Path,
    side_by_side: int = 10,
    title: str = "loraflow evaluation",
    parity: AnswerParity | None = None,
    decision: GateDecision | None = None,
    sweep: SweepOutcome | None = None,
) -> Path:
    """Write the PNGs and report.html into out_dir; return the HTML's path. A sweep's trials
    and the gate's decision, when given, open the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = next(iter(next(iter(results.values())).sets))
    notes: list[str] = []
    loss_png = plot_loss_curves(curves, out_dir / "loss_curves.png")
    if loss_png is None:
        notes.append("No training loss was recorded for this model (train.loss is empty).")
    figures = [
        loss_png,
        plot_metric_bars(results, out_dir / "metric_bars.png"),
        plot_fuzzy_distribution(results, primary, out_dir / "fuzzy_distribution.png"),
    ]
    top = [] if sweep is None else sweep_section(sweep, plot_sweep(sweep, out_dir / "sweep.png"))
    top += [] if decision is None else decision_section(
        decision, plot_decision(decision, out_dir / "decision.png"))
    page = render_html(results, [f for f in figures if f is not None], side_by_side, title,
                       tuple(notes), parity, top)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
