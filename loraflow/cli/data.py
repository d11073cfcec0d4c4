"""loraflow validate: validation and cleaning alone, before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraflow.base_model import ModelNotFoundError
from loraflow.config import ConfigError, load_config
from loraflow.data.records import DataError


def add_validate_command(commands: argparse._SubParsersAction) -> None:
    validate = commands.add_parser(
        "validate",
        help="validate and clean JSONL data (no training): report, cleaned data, quarantine",
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="training JSONL, local or s3://")
    validate.add_argument("--validation", nargs="*", default=[], metavar="PATH", help="validation")
    validate.add_argument("--test", nargs="*", default=[], metavar="PATH", help="test split")
    validate.add_argument("--config", type=Path, help="YAML config whose data section applies")
    validate.add_argument(
        "--set", action="append", default=[], metavar="section.field=value", help="override"
    )
    validate.add_argument(
        "--out", type=Path, help="where cleaned data and quarantine go (default: "
        "$LORAFLOW_HOME/validated)",
    )  # fmt: skip
    validate.add_argument("--json", action="store_true", help="print the counts as JSON")
    validate.set_defaults(handler=validate_command)


def validate_command(args: argparse.Namespace) -> int:
    """Validation and cleaning alone: exit 0 when every split passes, 1 when one keeps less
    than data.min_kept_fraction (or nothing), 2 for a bad config or a missing file."""
    from loraflow.config import loraflow_home
    from loraflow.data.validation import validate_splits

    try:
        pipeline = load_config(args.config, args.set, flag="--set ")
        cfg = pipeline.data
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    sources = {"train": args.paths, "validation": args.validation, "test": args.test}
    sources = {split: paths for split, paths in sources.items() if paths}
    out = args.out or loraflow_home() / "validated"
    count_tokens = None
    try:
        if cfg.clean.min_output_tokens:
            count_tokens = _token_counter(args.config, args.set)
        report = validate_splits(sources, out, cfg, count_tokens=count_tokens,
                                 progress=not args.json)
    except (DataError, ModelNotFoundError) as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    detectable = None
    if "test" in report.counts:  # what the promotion gate can see with this test split
        from loraflow.evaluation.gate import detectable_note

        detectable = detectable_note(report.counts["test"], pipeline.registry)
    if args.json:
        print(json.dumps(report.totals() | {"out": str(out), "gate": detectable}, indent=2))
    else:
        print(render_report(report, out) + (f"\ngate: {detectable}" if detectable else ""))
    try:
        report.check(out)
    except DataError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 1
    return 0


def _token_counter(config: Path | None, overrides: list[str]):  # noqa: ANN202
    """Answers -> token counts with model.base's tokenizer (resolved as a run would)."""
    from loraflow.base_model import load_tokenizer, resolve_base_model
    from loraflow.config import loraflow_home

    base = resolve_base_model(load_config(config, overrides, flag="--set ").model.base,
                              loraflow_home() / "models")
    tokenizer = load_tokenizer(base.path)
    return lambda texts: [
        len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]


def render_report(report, out: Path) -> str:  # noqa: ANN001 - a loraflow.data.DataReport
    totals = report.totals()
    lines = [
        "loraflow data report",
        f"  {'split':<11}{'read':>9}{'blank':>8}{'kept':>9}{'cleaned':>9}{'quarantined':>13}"
        f"{'kept%':>9}",
    ]
    for split, c in report.splits.items():
        lines.append(
            f"  {split:<11}{c.read:>9}{c.blank:>8}{c.kept:>9}{c.cleaned:>9}{c.quarantined:>13}"
            f"{c.kept_fraction:>9.1%}"
        )
    lines.append(f"  quarantined by reason: {_pairs(totals['reasons'])}")
    lines.append(f"  cleaned by rule:       {_pairs(totals['rules'])}")
    lines.append(f"  cleaned data           {out}/<split>.jsonl")
    lines.append(
        f"  quarantine             {out}/quarantine/<split>.jsonl (+ .tsv: file:line or row, why)"
    )
    lines += [f"    {p}" for p in report.problems]
    verdict = "passed" if totals["passed"] else "FAILED: " + "; ".join(report.failures())
    lines.append(
        f"  threshold              data.min_kept_fraction={report.min_kept_fraction}: {verdict}"
    )
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
