"""loraflow models | promote | pull: the registry and object storage, no pipeline run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

from loraflow.config import ConfigError, load_config, loraflow_home
from loraflow.environment import configure


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
    models.set_defaults(handler=run_release_command, release=models_command)


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
    promote.set_defaults(handler=run_release_command, release=promote_command)


def add_versions_command(commands: argparse._SubParsersAction) -> None:
    versions = commands.add_parser(
        "versions",
        help="the library versions a registered version was trained with, against this "
        "environment's (exit 1 when they differ)",
    )
    _release_arguments(versions)
    which = versions.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="alias to read (default: champion)")
    which.add_argument("--version", help="version number to read instead of an alias")
    versions.set_defaults(handler=run_release_command, release=versions_command)


def add_pull_command(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser(
        "pull", help="download a registered version from object storage and verify every file"
    )
    _release_arguments(pull)
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="alias to pull (default: champion)")
    which.add_argument("--version", help="version number to pull instead of an alias")
    pull.add_argument(
        "--dest", type=Path,
        help="directory to download into (default: $LORAFLOW_HOME/pulled/NAME-vVERSION, which "
        "`make clean` removes; a folder in the checkout would sit untracked in git status)",
    )  # fmt: skip
    pull.add_argument(
        "--format", choices=("gguf-f16", "gguf-q8_0", "vllm"),
        help="pull only this export (exports/FORMAT/: the GGUF file and its Ollama Modelfile, "
        "or the vLLM bundle with its README) instead of the transformers model and adapter",
    )  # fmt: skip
    pull.set_defaults(handler=run_release_command, release=pull_command)


def run_release_command(args: argparse.Namespace) -> int:
    """models, promote, pull: a config problem exits 2, a registry or storage error exits 1,
    each with its message and no traceback."""
    try:
        return args.release(args)
    except ConfigError as exc:
        print(f"loraflow: {exc}", file=sys.stderr)
        return 2
    except _release_errors() as exc:
        print(f"loraflow {args.command}: {_explain(exc)}", file=sys.stderr)
        return 1


def _explain(exc: Exception) -> str:
    """A refusal from the tracking server in words: who was refused and what to do."""
    from loraflow.credentials import redact

    text = str(exc)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "error code 403" in text or "PERMISSION_DENIED" in text:
        return (
            f"the MLflow tracking server refused user {user!r} (403 permission denied): it may "
            "read but not change this model. Fix: use the pipeline's credentials "
            "(MLFLOW_TRACKING_USERNAME/PASSWORD) or have the admin grant it MANAGE "
            "(infra/mlflow-users.py --models NAME)."
        )
    if "error code 401" in text:
        return (
            "the MLflow tracking server refused the credentials (401). Fix: set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or $LORAFLOW_CREDENTIALS_FILE)."
        )
    return redact(text)


def _release_context(args: argparse.Namespace):  # -> (cfg, name, MlflowClient)
    from loraflow.credentials import check_mlflow

    cfg = load_config(args.config, args.overrides, flag="--set ")
    configure()  # loads $LORAFLOW_CREDENTIALS_FILE
    check_mlflow()  # missing or refused credentials: one clear message, before anything
    from mlflow import MlflowClient

    return cfg, args.name or cfg.registry.model_name, MlflowClient()


def _chosen_version(client, name: str, args: argparse.Namespace):  # -> ModelVersion
    """The version --version names, else the one --alias points at."""
    if args.version:
        return client.get_model_version(name, args.version)
    return client.get_model_version_by_alias(name, args.alias)


def _release_errors():  # the errors a release command reports as a message, exit code 1
    from mlflow.exceptions import MlflowException

    from loraflow.credentials import CredentialsError
    from loraflow.release.registry import RegistryError
    from loraflow.release.storage import (
        StorageIntegrityError,
        StoragePermanentError,
        StorageUnreachableError,
    )

    return (
        CredentialsError,
        RegistryError,
        MlflowException,
        StoragePermanentError,
        StorageIntegrityError,
        StorageUnreachableError,
    )


def models_command(args: argparse.Namespace) -> int:
    """The versions, newest first, in a table as wide as the terminal: aliases, the primary
    test set's metrics (the gate metric first; `<set>.<metric>` tags repeat them per set and
    are left out) and where each version was pushed."""
    cfg, name, client = _release_context(args)
    from loraflow.release import registry

    rows = registry.list_versions(client, name)
    gate = cfg.registry.gate_metric
    metrics = sorted({m for r in rows for m in r["metrics"] if "." not in m},
                     key=lambda m: (m != gate, m))  # fmt: skip
    pushed = {r["storage_uri"].rpartition("/")[0] for r in rows if r["storage_uri"]}
    one_root = len(pushed) == 1 and all(r["storage_uri"] for r in rows)
    unfinished = "(release unfinished: run the pipeline again)"  # killed before its aliases
    columns = {"version": [r["version"] for r in rows],
               "aliases": [",".join(r["aliases"]) or "-" if r["release"] == "complete"
                           else unfinished for r in rows]}  # fmt: skip
    if any(r["stage"] for r in rows):
        columns["stage"] = [r["stage"] or "-" for r in rows]
    if not one_root:
        columns["storage"] = [r["storage_uri"] or "-" for r in rows]
    room = shutil.get_terminal_size((100, 24)).columns
    left_out = []
    for metric in metrics:
        values = [f"{r['metrics'][metric]:.3f}" if metric in r["metrics"] else "-" for r in rows]
        if _table_width({**columns, metric: values}) <= room or not left_out and metric == gate:
            columns[metric] = values
        else:
            left_out.append(metric)
    if not one_root:  # storage last
        columns["storage"] = columns.pop("storage")
    print(f"{name}  ({client.tracking_uri})")
    widths = {k: max(len(k), *(len(v) for v in values)) for k, values in columns.items()}
    for line in [list(columns), *zip(*columns.values(), strict=True)]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths.values(), strict=True)).rstrip())
    if one_root:
        print(f"pushed to {pushed.pop()}/<merged model's SHA-256>")
    if left_out:
        print(textwrap.fill(f"not shown (too wide): {', '.join(left_out)}; every metric, per "
                            "test set: the version's metric.* tags in MLflow", room))
    return 0


def _table_width(columns: dict[str, list[str]]) -> int:
    return sum(max(len(k), *(len(v) for v in values)) + 2 for k, values in columns.items()) - 2


def promote_command(args: argparse.Namespace) -> int:
    cfg, name, client = _release_context(args)
    from loraflow.release import registry

    mirroring = cfg.registry.stage_mirroring
    if args.rollback:
        old, new = registry.rollback(client, name, mirroring)
        print(f"{name}: champion rolled back from v{old} to v{new}")
    else:
        client.get_model_version(name, args.version)  # a clear error if it does not exist
        current = registry.champion(client, name)
        if current is not None and current[0] == str(args.version):
            print(f"{name}: v{args.version} is already the champion; nothing changed")
            return 0
        previous = registry.promote(
            client, name, args.version, "promoted by hand (loraflow promote)", mirroring
        )
        was = f" (was v{previous})" if previous else ""
        print(f"{name}: champion is now v{args.version}{was}")
    return 0


def versions_command(args: argparse.Namespace) -> int:
    """What a version was trained with (its lineage's libraries) against what is installed
    here: before a re-run, whether it can reproduce that version."""
    import json

    from loraflow.release.lineage import library_differences

    _, name, client = _release_context(args)
    version = _chosen_version(client, name, args)
    recorded = version.tags.get("loraflow.libraries")
    if not recorded:
        print(f"loraflow versions: {name} v{version.version} records no library versions "
              "(registered before loraflow recorded them)", file=sys.stderr)
        return 1
    rows = library_differences(json.loads(recorded))
    differ = [(pkg, then) for pkg, then, now in rows if then != now]
    print(f"{name} v{version.version} was trained with:")
    width = max(len(pkg) for pkg, _, _ in rows)
    print(f"  {'package'.ljust(width)}  {'trained':<16}  {'here':<16}")
    for pkg, then, now in rows:
        mark = "" if then == now else "  differs"
        print(f"  {pkg.ljust(width)}  {then:<16}  {now:<16}{mark}".rstrip())
    if not differ:
        print("this environment has the same versions: a re-run trains as it did")
        return 0
    pins = " ".join(f"{pkg}=={then.split('+')[0]}" for pkg, then in differ)
    print(f"{len(differ)} of {len(rows)} differ: a re-run here may not reproduce "
          f"v{version.version}. To train with its versions: pip install {pins}")
    return 1


def pull_command(args: argparse.Namespace) -> int:
    cfg, name, client = _release_context(args)
    from loraflow.release.storage import open_store, pull_tree

    version = _chosen_version(client, name, args)
    uri = version.tags.get("loraflow.storage_uri")
    if not uri:
        print(
            f"loraflow pull: {name} v{version.version} was never pushed to object storage "
            "(no loraflow.storage_uri tag). Fix: run the pipeline's push step for it.",
            file=sys.stderr,
        )
        return 1
    # the endpoint: --set storage.endpoint_url, else $AWS_ENDPOINT_URL, else the one the
    # version was pushed through (its loraflow.storage_endpoint tag)
    endpoint = (
        cfg.storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL")
        or version.tags.get("loraflow.storage_endpoint")
    )
    store = open_store(
        uri, endpoint, cfg.storage.multipart_threshold_mb, cfg.storage.multipart_chunk_mb
    )
    dest = args.dest or loraflow_home() / "pulled" / f"{name}-v{version.version}"
    under = f"exports/{args.format}/" if args.format else ""
    if args.format and f"loraflow.export.{args.format}.agreement" not in version.tags:
        print(f"loraflow pull: {name} v{version.version} has no {args.format} export (exported: "
              f"{_exported(version.tags) or 'none'}). Fix: add it to export.formats and run the "
              "pipeline again.", file=sys.stderr)
        return 1
    pulled = pull_tree(store, "", dest, under)
    files = sum(key.startswith(under) for key in pulled["manifest"]["files"])
    print(
        f"{name} v{version.version}: {files} files verified in {dest / under} "
        f"({pulled['downloaded']} downloaded) from {uri}"
    )
    if args.format:
        agreement = version.tags[f"loraflow.export.{args.format}.agreement"]
        in_llama_cpp = version.tags.get(f"loraflow.export.{args.format}/llama.cpp.agreement")
        also = (f" (in llama.cpp: {float(in_llama_cpp):.1%})" if in_llama_cpp else "")
        print(f"{args.format} answered {float(agreement):.1%} of the test prompts as the "
              f"evaluated model did{also}; how to serve it: docs/serving.md")
    return 0


def _exported(tags: dict[str, str]) -> str:
    """The formats a version ships (gguf-f16), not their second runtimes (gguf-f16/llama.cpp)."""
    names = (k.removeprefix("loraflow.export.").removesuffix(".agreement") for k in tags
             if k.startswith("loraflow.export.") and k.endswith(".agreement"))
    return ", ".join(sorted(n for n in names if "/" not in n))
