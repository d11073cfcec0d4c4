"""The `loraflow` command.

loraflow run [--config FILE] [section.field=value ...]   run the whole pipeline
loraflow models [NAME]                                    list versions, aliases and metrics
loraflow promote [NAME] --version N | --rollback          move alias champion by hand
loraflow pull [NAME] [--alias A | --version N] --dest DIR download a version, verify checksums

NAME defaults to registry.model_name of --config (or the built-in default). The registry is
the one MLFLOW_TRACKING_URI names (default: the embedded one under $LORAFLOW_HOME).
loraflow validate PATH... [--json]                       validate and clean data, train nothing
loraflow generate MODEL --prompt TEXT | --prompts FILE    answer with a registered or local model
loraflow watch LOCATION [--interval S] [--once]           emit a Prefect event per new data file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraflow.config import ConfigError, load_config
from loraflow.data import DataError
from loraflow.environment import configure
from loraflow.model import ModelNotFoundError

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the fine-tuning pipeline")
    run.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="override one config value, e.g. train.max_steps=20",
    )
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
    add_models_command(commands)
    add_promote_command(commands)
    add_pull_command(commands)
    add_generate_parser(commands)
    add_watch_command(commands)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return generate_command(args)
    if args.command == "validate":
        return validate_command(args)
    if args.command != "run":
        return run_release_command(args)

    try:
        cfg = load_config(args.config, args.overrides)  # every config problem, before any work
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    configure()
    from flows.finetune import finetune  # imports prefect/mlflow after the env is set

    try:
        finetune(config=cfg)
    except USER_ERRORS as exc:
        print(f"\nloraflow: the run stopped, nothing was registered:\n{exc}", file=sys.stderr)
        return 1
    return 0


# --- release commands: the registry and storage, no pipeline run --------------------------


def _release_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("name", nargs="?", help="registered model (default: from the config)")
    command.add_argument("--config", type=Path, help="YAML config for registry/storage settings")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="section.field=value",
        help="override one config value, e.g. --set storage.endpoint_url=http://127.0.0.1:9000",
    )


def add_models_command(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="list registered versions, aliases and metrics")
    _release_arguments(models)
    models.set_defaults(handler=models_command)


def add_promote_command(commands: argparse._SubParsersAction) -> None:
    promote = commands.add_parser(
        "promote", help="make a version the champion by hand, or roll back to the previous one"
    )
    _release_arguments(promote)
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="version to make the champion")
    which.add_argument(
        "--rollback", action="store_true", help="give champion back to the version it replaced"
    )
    promote.set_defaults(handler=promote_command)


def add_pull_command(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser(
        "pull", help="download a registered version from object storage and verify every file"
    )
    _release_arguments(pull)
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="alias to pull (default: champion)")
    which.add_argument("--version", help="version number to pull instead of an alias")
    pull.add_argument("--dest", type=Path, required=True, help="directory to download into")
    pull.set_defaults(handler=pull_command)


def run_release_command(args: argparse.Namespace) -> int:
    """models, promote, pull: a config problem exits 2, a registry or storage error exits 1,
    each with its message and no traceback."""
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    except _release_errors() as exc:
        print(f"loraflow {args.command}: {exc}", file=sys.stderr)
        return 1


def _release_context(args: argparse.Namespace):  # -> (cfg, name, MlflowClient)
    cfg = load_config(args.config, args.overrides)
    configure()
    from mlflow import MlflowClient

    return cfg, args.name or cfg.registry.model_name, MlflowClient()


def _release_errors():  # the errors a release command reports as a message, exit code 1
    from mlflow.exceptions import MlflowException

    from loraflow.registry import RegistryError
    from loraflow.storage import StorageIntegrityError, StoragePermanentError

    return (RegistryError, MlflowException, StoragePermanentError, StorageIntegrityError)


def models_command(args: argparse.Namespace) -> int:
    cfg, name, client = _release_context(args)
    from loraflow import registry

    rows = registry.list_versions(client, name)
    metric_names = sorted({m for r in rows for m in r["metrics"]})
    print(f"{name}  ({client.tracking_uri})")
    header = ["version", "aliases", "stage", *metric_names, "storage"]
    table = [
        [
            r["version"],
            ",".join(r["aliases"]) or "-",
            r["stage"] or "-",
            *(f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "-" for m in metric_names),
            r["storage_uri"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table, strict=True)]
    for line in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def promote_command(args: argparse.Namespace) -> int:
    cfg, name, client = _release_context(args)
    from loraflow import registry

    mirroring = cfg.registry.stage_mirroring
    if args.rollback:
        old, new = registry.rollback(client, name, mirroring)
        print(f"{name}: champion rolled back from v{old} to v{new}")
    else:
        client.get_model_version(name, args.version)  # a clear error if it does not exist
        previous = registry.promote(
            client, name, args.version, "promoted by hand (loraflow promote)", mirroring
        )
        was = f" (was v{previous})" if previous else ""
        print(f"{name}: champion is now v{args.version}{was}")
    return 0


def pull_command(args: argparse.Namespace) -> int:
    cfg, name, client = _release_context(args)
    from loraflow.storage import open_store, pull_tree

    version = (
        client.get_model_version(name, args.version)
        if args.version
        else client.get_model_version_by_alias(name, args.alias)
    )
    uri = version.tags.get("loraflow.storage_uri")
    if not uri:
        print(
            f"loraflow pull: {name} v{version.version} was never pushed to object storage "
            "(no loraflow.storage_uri tag). Fix: run the pipeline's push step for it.",
            file=sys.stderr,
        )
        return 1
    store = open_store(
        uri,
        cfg.storage.endpoint_url,
        cfg.storage.multipart_threshold_mb,
        cfg.storage.multipart_chunk_mb,
    )
    pulled = pull_tree(store, "", args.dest)
    files = len(pulled["manifest"]["files"])
    print(
        f"{name} v{version.version}: {files} files verified in {args.dest} "
        f"({pulled['downloaded']} downloaded) from {uri}"
    )
    return 0


def validate_command(args: argparse.Namespace) -> int:
    """Validation and cleaning alone: exit 0 when every split passes, 1 when one keeps less
    than data.min_kept_fraction (or nothing), 2 for a bad config or a missing file."""
    from loraflow.config import loraflow_home
    from loraflow.data import validate_splits

    try:
        cfg = load_config(args.config, args.set).data
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
        report = validate_splits(sources, out, cfg, count_tokens, progress=not args.json)
    except (DataError, ModelNotFoundError) as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.totals() | {"out": str(out)}, indent=2))
    else:
        print(render_report(report, out))
    try:
        report.check(out)
    except DataError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 1
    return 0


def _token_counter(config: Path | None, overrides: list[str]):  # noqa: ANN202
    """Answers -> token counts with model.base's tokenizer (resolved as a run would)."""
    from loraflow.config import loraflow_home
    from loraflow.model import load_tokenizer, resolve_base_model

    base = resolve_base_model(load_config(config, overrides).model.base, loraflow_home() / "models")
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
        f"  quarantine             {out}/quarantine/<split>.jsonl (+ .tsv: file:line, why)"
    )
    lines += [f"    {p}" for p in report.problems]
    verdict = "passed" if totals["passed"] else "FAILED: " + "; ".join(report.failures())
    lines.append(
        f"  threshold              data.min_kept_fraction={report.min_kept_fraction}: {verdict}"
    )
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="answer prompts with a registered model (models:/<name>@champion) or a model dir",
        description="Load a model loraflow made, apply the prompt template recorded with it, "
        "and print its answers.",
    )
    gen.add_argument(
        "model", help="models:/<name>@<alias>, models:/<name>/<version> or a model directory"
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the instruction to answer")
    source.add_argument(
        "--prompts", type=Path, help='JSONL file of {"instruction": ..., "input": ...}'
    )
    gen.add_argument("--input", default="", help="input text that goes with --prompt")
    gen.add_argument("--output", type=Path, help="write JSONL answers here (default: stdout)")
    gen.add_argument("--max-new-tokens", type=int, default=96)
    gen.add_argument("--decoding", choices=["greedy", "beam"], default="greedy")
    gen.add_argument("--num-beams", type=int, default=4, help="beams when --decoding beam")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--quantize",
        choices=["none", "8bit", "4bit"],
        default="none",
        help="load the weights in 8 or 4 bits (CUDA GPU and bitsandbytes only)",
    )
    gen.add_argument(
        "--template",
        choices=["chat", "alpaca"],
        help="override the template recorded with the model",
    )
    gen.add_argument("--batch-size", type=int, default=8)


def generate_command(args: argparse.Namespace) -> int:
    """`loraflow generate`: one answer to stdout, or one JSON line per prompt of a file."""
    configure()  # the registry of the embedded default, unless MLFLOW_TRACKING_URI is set
    from loraflow.generation import Decoding, Prompt
    from loraflow.inference import InferenceError, generate_answers, read_prompts

    try:
        prompts = (
            read_prompts(args.prompts)
            if args.prompts
            else [Prompt(instruction=args.prompt, input=args.input)]
        )
        decoding = Decoding(
            max_new_tokens=args.max_new_tokens,
            decoding=args.decoding,
            num_beams=args.num_beams,
            stop=args.stop,
        )
        answers = generate_answers(
            args.model, prompts, decoding, args.quantize, args.template, args.batch_size
        )
    except (*USER_ERRORS, InferenceError) as exc:
        print(f"loraflow generate: {exc}", file=sys.stderr)
        return 1
    if args.prompt and not args.output:
        print(answers[0])
        return 0
    lines = [
        json.dumps(p.model_dump() | {"answer": a}, ensure_ascii=False) + "\n"
        for p, a in zip(prompts, answers, strict=True)
    ]
    if args.output:
        args.output.write_text("".join(lines), encoding="utf-8")
    else:
        sys.stdout.writelines(lines)
    return 0


# --- watch: new data files -> Prefect events (a deployment trigger starts the pipeline) ------


def add_watch_command(commands: argparse._SubParsersAction) -> None:
    watch = commands.add_parser(
        "watch",
        help="watch a directory or s3:// prefix; emit a Prefect event per new data file",
    )
    watch.add_argument("location", help="a local directory or s3://bucket/prefix")
    watch.add_argument("--pattern", default="*.jsonl", help="file names that count as data")
    watch.add_argument(
        "--marker",
        help="a suffix (e.g. .done) whose file marks a data file complete; default: a file is "
        "complete when its size is the same on two polls in a row",
    )
    watch.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    watch.add_argument("--once", action="store_true", help="poll twice (interval apart), exit")
    watch.set_defaults(handler=watch_command)


def watch_command(args: argparse.Namespace) -> int:
    import os
    import time

    from loraflow.watch import DATA_LANDED, Watcher, as_payload, state_path

    home = configure()
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "loraflow watch: PREFECT_API_URL is not set; events need a running Prefect server "
            "(infra/prefect-server.sh, then `. infra/env.sh`)",
            file=sys.stderr,
        )
        return 2
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    def emit(landed) -> None:  # noqa: ANN001 - a loraflow.watch.Landed
        event = emit_event(
            DATA_LANDED,
            resource={
                "prefect.resource.id": f"loraflow.data.{landed.sha256}",
                "loraflow.data.uri": landed.uri,
            },
            payload=as_payload(landed),
        )
        if event is None:
            raise RuntimeError(f"Prefect did not take the event for {landed.uri}")
        print(f"landed {landed.uri} sha256 {landed.sha256[:12]} -> event {event.id}", flush=True)

    try:
        watcher = Watcher(args.location, state_path(home, args.location), args.pattern, args.marker)
    except (FileNotFoundError, ValueError) as exc:
        print(f"loraflow watch: {exc}", file=sys.stderr)
        return 2
    print(f"watching {args.location} every {args.interval:g} s (state {watcher.state_file})")
    polls = 0
    while True:
        watcher.poll(emit)
        EventsWorker.drain_all(timeout=30)  # delivered before the next poll or exit
        polls += 1
        if args.once and polls >= (1 if args.marker else 2):
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
