"""The whole retraining loop on one GPU, stage by stage: loraflow's library steps against the
guide's way of the same work, in one run.

    python benchmarks/pipeline_bench.py --workdir /tmp/pipeline-bench --out pipeline.json
    python benchmarks/pipeline_bench.py --workdir /tmp/pipeline-bench --stages guide --out g.json
    python benchmarks/pipeline_bench.py --small --workdir /tmp/pb-small --out small.json   # CPU

Workload (default): the Llama-2-7B architecture with random bf16 weights, saved once as
safetensors in --workdir so every load is a real load (throughput and load times do not depend
on the values); 20,000 synthetic instruction examples with log-normal lengths (median ~220
tokens, clipped to 32..1024, 40-80% prompt) plus 200 validation examples; 1,000 test prompts
answered with 128 new tokens (greedy). The tokenizer is a word-level one over the model's
32,000 ids, so token counts are exact.

loraflow, in the pipeline's order: validate (validate_splits) -> tokenize (tokenize_splits)
-> train (the engine as the pipeline starts it, `python -m loraflow.engine`: packed 8 x 2048,
compiled, bf16, one pass over --train-fraction of the examples, a validation pass at the end;
then the adapter's lineage manifest, which hashes the base) -> evaluate base (evaluate_models)
-> merge (merge_and_evaluate, as the pipeline's merge step: base + adapter answer the test
prompts, the merged model answers them in bf16 -- the tuned score -- and the answers are
compared). The guide's tuned answers are in its evaluate stage; ours in merge: compare the
whole loop, not those two stages one by one.

The guide, same run, same files: no validation; tokenize = its tokenize() on every example
(json per line, padding="max_length", max_length=1024; `datasets` is not on the GPU machine,
so there is no Arrow cache); train = its Trainer recipe (benchmarks/train_bench.run_guide) on
the same tokenized examples, timed over the workload's guide_steps steps (4) and scaled to the
real tokens loraflow trained on, plus loading the base; evaluate = its pipeline() loop
answering guide_prompts prompts (8) one by one with base and with tuned (loraflow's adapter),
scaled to all test prompts, plus the loads; merge = merge_and_unload + save_pretrained. Every
guide load is its from_pretrained(device_map="auto"), in bf16 (its recipe's 8-bit loading
left out, as in train_bench). Scaled figures are marked * in the table.

Each stage's seconds accumulate in WORKDIR/results.json, so the stages can be run in several
calls on one machine (--stages); the table covers every stage measured so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import LLAMA2_7B, build_model, run_guide  # noqa: E402

from loraflow.data.prompts import PromptTemplate  # noqa: E402

LOOP = ("validate", "tokenize", "train", "evaluate", "merge")
STAGES = {
    "loraflow": ("lf-data", "lf-train", "lf-evaluate", "lf-merge"),
    "guide": ("guide-data", "guide-train", "guide-evaluate", "guide-merge"),
}
ALPACA_TEMPLATE = PromptTemplate(kind="alpaca")  # the guide's layout, both sides
ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n{output}"


@dataclass(frozen=True)
class Workload:
    arch: dict[str, Any]
    examples: int
    validation: int
    test: int
    new_tokens: int
    median_tokens: int
    min_tokens: int
    max_tokens: int
    seq_len: int
    micro_batch: int
    compile: bool
    eval_batch: int
    guide_steps: int
    guide_prompts: int
    guide_pad_to: int = 1024  # the guide's padding; shorter only for the tiny CPU model


FULL = Workload(arch=LLAMA2_7B, examples=20_000, validation=200, test=1_000, new_tokens=128,
                median_tokens=220, min_tokens=32, max_tokens=1024, seq_len=2048, micro_batch=8,
                compile=True, eval_batch=64, guide_steps=4, guide_prompts=8)
SMALL = Workload(arch=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2),
                 examples=48, validation=4, test=8, new_tokens=4, median_tokens=40,
                 min_tokens=24, max_tokens=128, seq_len=256, micro_batch=4, compile=False,
                 eval_batch=8, guide_steps=1, guide_prompts=1, guide_pad_to=128)


# ---------------------------------------------------------------------------- setup


# The prompt template's own words have ids of their own: mapped to <unk> (id 0, the pad id, whose
# embedding row a random init leaves at zero) every example would start with zero-embedding
# tokens, and the bf16 flex-attention backward turns those into NaN gradients at the first step.
TEMPLATE_WORDS = ("###", "Instruction:", "Input:", "Output:")
FIRST_WORD = 3 + len(TEMPLATE_WORDS)  # the first "w<id>" word


def write_tokenizer(vocab_size: int, out: Path) -> None:
    """Word-level ids: "w<id>" is token <id>, so an example's length in tokens is exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ({"<unk>": 0, "<s>": 1, "</s>": 2}
             | {word: 3 + i for i, word in enumerate(TEMPLATE_WORDS)}
             | {f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<unk>").save_pretrained(out)


def write_base(w: Workload, out: Path, device: str) -> float:
    """The random base, saved once as safetensors (with its tokenizer); seconds taken."""
    if (out / "config.json").is_file():
        return 0.0
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    if device == "cuda":
        model = build_model("sdpa")
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**w.arch))
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    write_tokenizer(w.arch["vocab_size"], partial)
    partial.rename(out)
    del model
    free_memory()
    return time.perf_counter() - start


def write_data(w: Workload, out: Path) -> None:
    """train/validation/test JSONL of random words with log-normal lengths."""
    if (out / "test.jsonl").is_file():
        return
    rng = random.Random(0)
    words = w.arch["vocab_size"]

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(FIRST_WORD, words)}" for _ in range(n))

    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", w.examples), ("validation", w.validation), ("test", w.test)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                length = int(min(w.max_tokens - 16, max(w.min_tokens, rng.lognormvariate(
                    math.log(w.median_tokens), 0.6))))
                prompt = int(length * rng.uniform(0.4, 0.8))
                f.write(json.dumps({"instruction": text(prompt), "input": "",
                                    "output": text(length - prompt)}) + "\n")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- loraflow


def lf_data(w: Workload, work: Path) -> dict[str, Any]:
    from loraflow.base_model import load_tokenizer
    from loraflow.config import DataConfig
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.data.validation import validate_splits

    sources = {s: [str(work / "data" / f"{s}.jsonl")] for s in ("train", "validation", "test")}
    start = time.perf_counter()
    report = validate_splits(sources, work / "valid", DataConfig(), progress=False)
    report.check(work / "valid")
    validate_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = tokenize_splits(work / "valid", load_tokenizer(work / "base"), ALPACA_TEMPLATE,
                             TokenizeSettings(max_length=w.max_tokens), work / "tokens",
                             progress=False)
    return {"validate": {"seconds": validate_s,
                         "kept": {s: c.kept for s, c in report.splits.items()}},
            "tokenize": {"seconds": time.perf_counter() - start,
                         "tokens": tokens.tokens["train"]}}


def lf_train(w: Workload, work: Path, fraction: float) -> dict[str, Any]:
    from loraflow.base_model import BaseModelRef
    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.data.tokenization import TokenizeSettings
    from loraflow.engine.batches import read_examples
    from loraflow.engine.config import EngineConfig
    from loraflow.engine.loop import steps_for_epochs
    from loraflow.hashing import sha256_tree
    from loraflow.release.lineage import adapter_lineage

    base, run = work / "base", work / "run"
    train = TrainConfig(batching="packed", seq_len=w.seq_len, micro_batch_size=w.micro_batch,
                        compile=w.compile, precision="bf16" if torch.cuda.is_available()
                        else "fp32", warmup_steps=10, eval_every=0, max_steps=1)
    examples = read_examples(work / "tokens", "train")
    one_pass = steps_for_epochs(examples, train.model_copy(update={"epochs": 1}), packed=True)
    steps = max(1, math.ceil(fraction * one_pass))
    train = train.model_copy(update={"max_steps": steps})
    lora = LoraSettings()
    if run.exists():
        import shutil

        shutil.rmtree(run)  # a fresh run, never a resumed one
    run.mkdir(parents=True)
    config = run.with_name("engine.json")
    config.write_text(EngineConfig(base_path=base, data_dir=work / "tokens", output_dir=run,
                                   lora=lora, train=train).model_dump_json())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraflow.engine", "--config", str(config)],
                   check=True)
    engine_s = time.perf_counter() - start
    # the train_adapter task's manifest (lf_data tokenized with max_length=w.max_tokens)
    reference = BaseModelRef(name="random-llama", path=base, sha256=sha256_tree(base),
                             source=str(base))
    adapter_lineage(reference, lora=lora, train=train, data_sha256="0" * 64,
                    template=ALPACA_TEMPLATE, tokenize=TokenizeSettings(max_length=w.max_tokens)
                    ).write(run / "adapter")
    seconds = time.perf_counter() - start
    lineage_s = seconds - engine_s  # the manifest hashes the base's weights
    result = json.loads((run / "result.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:] or records
    steady = (sum(r["tokens"] for r in timed)
              / max(timed[-1]["elapsed_s"] - (records[1]["elapsed_s"] if len(records) > 2
                                              else 0.0), 1e-9))
    return {"train": {"seconds": seconds, "engine_s": engine_s, "lineage_s": lineage_s,
                      "steps": steps,
                      "one_pass_steps": one_pass, "fraction": fraction,
                      "real_tokens": result["tokens"], "first_step_s": records[0]["elapsed_s"],
                      "steady_real_tokens_per_s": steady, "compiled": result.get("compiled"),
                      "val_loss": result["val_loss"]}}


def eval_config(w: Workload) -> Any:
    from loraflow.config import EvalConfig, EvalSetConfig

    return EvalConfig(max_new_tokens=w.new_tokens, batch_size=w.eval_batch,
                      sets=[EvalSetConfig(name="test", metrics=["exact_match", "fuzzy"])])


def lf_evaluate(w: Workload, work: Path) -> dict[str, Any]:
    """The pipeline's evaluate_base (the tuned score comes from the merge stage, as in the
    pipeline, which scores the merged model it ships)."""
    from loraflow.evaluation.evaluate import ModelSource, evaluate_models, load_sets

    cfg = eval_config(w)
    start = time.perf_counter()
    sets = load_sets(cfg, work / "valid" / "test.jsonl")
    results = evaluate_models({"base": ModelSource(path=work / "base")}, sets, ALPACA_TEMPLATE,
                              cfg)
    return {"evaluate": {"seconds": time.perf_counter() - start, "prompts": len(sets[0].examples),
                         "per_model_s": {k: r.seconds for k, r in results.items()}}}


def lf_merge(w: Workload, work: Path) -> dict[str, Any]:
    """The pipeline's merge_adapter: base + adapter answer the test prompts, the adapter is
    folded in, the merged model answers them in its serving dtype (the tuned evaluation), the
    answers are compared, the merged model is saved."""
    from loraflow.evaluation.evaluate import load_sets
    from loraflow.release.merge import merge_and_evaluate

    cfg = eval_config(w)
    sets = load_sets(cfg, work / "valid" / "test.jsonl")
    start = time.perf_counter()
    report, tuned, reference = merge_and_evaluate(
        work / "base", work / "run" / "adapter", work / "merged", sets, ALPACA_TEMPLATE, cfg,
        "bf16" if torch.cuda.is_available() else "fp32", max_differing=1.0)
    parity = report.parity
    return {"merge": {"seconds": time.perf_counter() - start,
                      "evaluations_s": {"adapter": reference.seconds, "tuned": tuned.seconds},
                      "answers_differing": f"{parity.differing}/{parity.answers}"}}


# ---------------------------------------------------------------------------- the guide


def guide_load(path: Path) -> tuple[Any, float]:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if torch.cuda.is_available():  # the guide's device_map="auto"; bf16 as in its recipe here
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                     device_map="auto")
        torch.cuda.synchronize()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, time.perf_counter() - start


def guide_data(w: Workload, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(work / "base")

    def tokenize(example: dict[str, str]) -> Any:  # the guide's, section "Tokenization"
        return tokenizer(ALPACA.format(**example), truncation=True, padding="max_length",
                         max_length=w.guide_pad_to)

    with open(work / "data" / "train.jsonl", encoding="utf-8") as f:
        rows = [tokenize(json.loads(line)) for line in f]
    seconds = time.perf_counter() - start
    return {"validate": {"seconds": 0.0, "note": "the guide validates nothing"},
            "tokenize": {"seconds": seconds, "examples": len(rows)}}


def guide_train(w: Workload, work: Path, lf_tokens: int) -> dict[str, Any]:
    from loraflow.engine.batches import read_examples

    examples = read_examples(work / "tokens", "train")
    model, load_s = guide_load(work / "base")
    start = time.perf_counter()
    measured = run_guide(examples, w.guide_steps, model=model, pad_to=w.guide_pad_to)
    run_s = time.perf_counter() - start
    del model
    free_memory()
    steps_s = lf_tokens / measured["real_tokens_per_s"]
    return {"train": {"seconds": load_s + steps_s, "scaled": True, "load_s": load_s,
                      "measured_steps": w.guide_steps, "measured_run_s": run_s,
                      "real_tokens_per_s": measured["real_tokens_per_s"],
                      "scaled_to_real_tokens": lf_tokens, "peak_gib": measured["peak_gib"]}}


def guide_evaluate(w: Workload, work: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    with open(work / "valid" / "test.jsonl", encoding="utf-8") as f:
        tests = [json.loads(line) for line in f]
    sample = [ALPACA.format(instruction=t["instruction"], input=t.get("input", ""), output="")
              for t in tests[: w.guide_prompts]]
    per_model = {}
    for label in ("base", "tuned"):
        model, load_s = guide_load(work / "base")
        if label == "tuned":
            start = time.perf_counter()
            model = PeftModel.from_pretrained(model, work / "run" / "adapter")
            load_s += time.perf_counter() - start
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        pipe(sample[0], max_new_tokens=2)  # warm-up, not timed
        start = time.perf_counter()
        answers = [pipe(p, max_new_tokens=w.new_tokens) for p in sample]
        per_prompt = (time.perf_counter() - start) / len(sample)
        new = sum(len(tokenizer(a[0]["generated_text"])["input_ids"])
                  - len(tokenizer(p)["input_ids"]) for a, p in zip(answers, sample, strict=True))
        per_model[label] = {"load_s": load_s, "per_prompt_s": per_prompt,
                            "tokens_per_s": new / (per_prompt * len(sample)),
                            "seconds": load_s + per_prompt * len(tests)}
        del pipe, model
        free_memory()
    return {"evaluate": {"seconds": sum(m["seconds"] for m in per_model.values()),
                         "scaled": True, "measured_prompts": len(sample),
                         "scaled_to_prompts": len(tests), "per_model": per_model}}


def guide_merge(w: Workload, work: Path) -> dict[str, Any]:
    from peft import PeftModel

    start = time.perf_counter()
    model, _ = guide_load(work / "base")
    model = PeftModel.from_pretrained(model, work / "run" / "adapter")
    model = model.merge_and_unload()
    model.save_pretrained(work / "guide-merged")
    seconds = time.perf_counter() - start
    del model
    free_memory()
    return {"merge": {"seconds": seconds, "note": "no check"}}


# ---------------------------------------------------------------------------- table


def table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: stage, loraflow s, guide s, guide / loraflow, share of loraflow's total."""
    lf, guide = results.get("loraflow", {}), results.get("guide", {})
    lf_total = sum(lf[s]["seconds"] for s in LOOP if s in lf)
    guide_total = sum(guide[s]["seconds"] for s in LOOP if s in guide)
    lines = ["| stage | loraflow s | guide s | guide / loraflow | share of loraflow total |",
             "|---|---|---|---|---|"]
    for stage in LOOP:
        a, b = lf.get(stage), guide.get(stage)
        lf_s = f"{a['seconds']:.1f}" if a else "-"
        g_s = f"{b['seconds']:.1f}{'*' if b.get('scaled') else ''}" if b else "-"
        ratio = f"{b['seconds'] / a['seconds']:.1f}x" if a and b and a["seconds"] else "-"
        share = f"{a['seconds'] / lf_total:.0%}" if a and lf_total else "-"
        lines.append(f"| {stage} | {lf_s} | {g_s} | {ratio} | {share} |")
    ratio = f"{guide_total / lf_total:.1f}x" if lf_total and guide_total else "-"
    lines.append(f"| **whole loop** | **{lf_total:.1f}** | **{guide_total:.1f}** | **{ratio}** | "
                 "100% |")
    if lf_total and guide_total:
        heavy = [s for s in LOOP if s != "train" and s in lf and lf[s]["seconds"] > 0.3 * lf_total]
        lines.append(f"\ngoals: whole loop >= 10x the guide: {guide_total / lf_total:.1f}x "
                     f"({'met' if guide_total >= 10 * lf_total else 'NOT met'}); no stage but "
                     f"train above 30%: {'met' if not heavy else 'NOT met: ' + ', '.join(heavy)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True,
                        help="base model, data and results.json (kept between calls)")
    parser.add_argument("--out", type=Path, required=True, help="the results as JSON")
    parser.add_argument("--stages", default="all",
                        help="all, loraflow, guide, or a list of: "
                             + ", ".join(STAGES["loraflow"] + STAGES["guide"]))
    parser.add_argument("--small", action="store_true",
                        help="the tiny random Llama on CPU, a few hundred examples (tests)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="share of one pass over the training examples loraflow trains")
    args = parser.parse_args(argv)
    w = SMALL if args.small else FULL
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if device == "cpu" and not args.small:
        parser.error("the full workload needs a GPU; use --small on CPU")
    wanted: list[str] = []
    for name in args.stages.split(","):
        wanted += ([*STAGES["loraflow"], *STAGES["guide"]] if name == "all"
                   else list(STAGES.get(name, (name,))))
    unknown = [s for s in wanted if s not in STAGES["loraflow"] + STAGES["guide"]]
    if unknown:
        parser.error(f"--stages: unknown {unknown}")

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results["workload"] = asdict(w) | {"train_fraction": args.train_fraction}
    results["machine"] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                          "torch": torch.__version__}
    setup_s = write_base(w, work / "base", device)
    write_data(w, work / "data")
    if setup_s:
        results["setup_s"] = setup_s
        print(f"pipeline_bench: random base written in {setup_s:.1f} s", flush=True)

    lf_tokens = results.get("loraflow", {}).get("train", {}).get("real_tokens")
    for stage in wanted:
        side = "loraflow" if stage.startswith("lf-") else "guide"
        print(f"pipeline_bench: {stage}", flush=True)
        if stage == "lf-data":
            done = lf_data(w, work)
        elif stage == "lf-train":
            done = lf_train(w, work, args.train_fraction)
            lf_tokens = done["train"]["real_tokens"]
        elif stage == "lf-evaluate":
            done = lf_evaluate(w, work)
        elif stage == "lf-merge":
            done = lf_merge(w, work)
        elif stage == "guide-data":
            done = guide_data(w, work)
        elif stage == "guide-train":
            if lf_tokens is None:
                parser.error("guide-train scales to the tokens loraflow trained: run lf-train "
                             "first (same --workdir)")
            done = guide_train(w, work, lf_tokens)
        elif stage == "guide-evaluate":
            done = guide_evaluate(w, work)
        else:
            done = guide_merge(w, work)
        results.setdefault(side, {}).update(done)
        store.write_text(json.dumps(results, indent=2))
        print(f"pipeline_bench: {stage} " + json.dumps(done), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n" + "\n".join(table(results)))
    print("* measured on a sample (steps or prompts) and scaled; see the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
