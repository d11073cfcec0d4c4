"""DPO throughput: TRL's DPOTrainer against loraflow's DPO objective, in one run, one GPU.

    python benchmarks/preference_bench.py [--pairs 512] [--steps 10] [--out preference.json]

Llama-2-7B architecture with random bf16 weights built on the GPU (throughput does not depend
on the weight values), LoRA r=8 on q_proj/v_proj, no dropout. Preference pairs of random
tokens with log-normal lengths (prompt median ~200 tokens, each answer ~120, clipped so a
sequence stays under TRL's default max_length of 1024): TRL tokenizes them with a word-level
tokenizer whose word "w<i>" is token i, and loraflow trains on the very ids TRL produced.

- trl: DPOTrainer with its defaults (padded batches, gradient checkpointing on, bf16, the
  reference = the PEFT model with its adapter disabled, recomputed every step), 4 pairs per
  device batch x 4 accumulation.
- loraflow: loraflow.engine.loop.fit with train.objective=dpo, packed rows of seq_len tokens with
  per-example attention (flex_attention), the reference the same model with its adapter off
  in a no-grad forward, gradient checkpointing on (as TRL) - and a variant with the decoder
  layers compiled.

Counts only real (non-padding) tokens of the chosen and rejected sequences (prompt + answer,
each pair's prompt twice, as both trainers feed it), over the steps after the first two
(warm-up, compilation). Peak memory: torch.cuda.max_memory_allocated during the variant.
Needs torch, transformers, peft, accelerate, trl and datasets; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
# --smoke: the same code paths on CPU with a 2-layer model, to check the script runs
SMOKE = dict(LLAMA2_7B, vocab_size=512, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
TRL_BATCH, TRL_ACCUM = 4, 4
ARCH, DEVICE = LLAMA2_7B, "cuda"


def word_tokenizer() -> Any:
    """A fast tokenizer of the architecture's vocabulary size where "w<i>" is token i (no
    network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size = ARCH["vocab_size"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def make_pairs(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    size = ARCH["vocab_size"]

    def words(median: float, low: int, high: int) -> str:
        length = int(min(high, max(low, rng.lognormvariate(math.log(median * scale), 0.6))))
        return " ".join(f"w{rng.randrange(3, size)}" for _ in range(length))

    return [{"prompt": words(200, 16, 500), "chosen": " " + words(120, 8, 250),
             "rejected": " " + words(120, 8, 250)} for _ in range(n)]


def build_model(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ARCH)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(DEVICE):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    return model


def reset_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated(peak: bool = False) -> float:
    if DEVICE != "cuda":
        return 0.0
    return float(torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated())


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")


def run_trl(pairs: list[dict[str, str]], steps: int) -> tuple[dict[str, Any], list[dict]]:
    """TRL's DPOTrainer as it comes; returns the result and its tokenized pairs."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    reset_memory()
    leftover = allocated()
    model = get_peft_model(build_model("sdpa"), lora())
    marks: list[tuple[float, int]] = []
    held: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), held["trainer"]._total_train_tokens))

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=TRL_BATCH,
                     gradient_accumulation_steps=TRL_ACCUM, max_steps=steps + 2,
                     learning_rate=1e-4, warmup_steps=0, logging_steps=1000,
                     save_strategy="no", report_to=[], seed=0, dataloader_drop_last=True,
                     use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=word_tokenizer(), callbacks=[Clock()])
    held["trainer"] = trainer
    tokenized = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trainer.train()
    (t0, n0), (t1, n1) = marks[1], marks[-1]  # after two warm-up steps
    padded = steps * TRL_BATCH * TRL_ACCUM * 2  # sequences in the timed steps
    result = {"real_tokens_per_s": (n1 - n0) / (t1 - t0), "timed_s": t1 - t0,
              "tokens": n1 - n0, "sequences": padded,
              "peak_gib": (allocated(peak=True) - leftover) / 2**30}
    held.clear()
    del trainer, model
    return result, tokenized


def run_loraflow(tokenized: list[dict], steps: int, micro: int, seq_len: int,
                 compile: bool) -> dict[str, Any]:
    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.engine.batches import Unit
    from loraflow.engine.loop import fit
    from loraflow.engine.model import add_lora, prepare_for_training

    units = [Unit(((e["prompt_ids"] + e["chosen_ids"], len(e["prompt_ids"])),
                   (e["prompt_ids"] + e["rejected_ids"], len(e["prompt_ids"]))))
             for e in tokenized]
    cfg = TrainConfig(objective="dpo", max_steps=steps + 2, warmup_steps=0,
                      learning_rate=1e-4, micro_batch_size=micro, grad_accum_steps=1,
                      batching="packed", seq_len=seq_len, gradient_checkpointing=True,
                      compile=compile, watchdog_seconds=0)
    reset_memory()
    # Each variant compiles its own model: without a reset, earlier variants' graphs fill
    # dynamo's cache (8 entries) and later variants fall back to eager.
    torch._dynamo.reset()
    leftover = allocated()
    attn = "flex_attention" if DEVICE == "cuda" else "sdpa"
    model = add_lora(prepare_for_training(build_model(attn), cfg),
                     LoraSettings(r=8, alpha=32, dropout=0.0))
    out = Path(tempfile.mkdtemp())
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    fit(model, train_set=units, val_set=[], t=cfg, out=out, pad_id=0, dtype=dtype,
        attn_impl=attn, packed=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:]
    seconds = timed[-1]["elapsed_s"] - records[1]["elapsed_s"]
    result = {"real_tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
              "timed_s": seconds, "tokens": sum(r["tokens"] for r in timed),
              "peak_gib": (allocated(peak=True) - leftover) / 2**30,
              "first_step_s": records[0]["elapsed_s"],
              "reward_accuracy_last": records[-1]["reward_accuracy"]}
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (plus 2 warm-up)")
    parser.add_argument("--micro", type=int, default=4, help="loraflow rows per step")
    parser.add_argument("--seq-len", type=int, default=4096, help="loraflow's packed row length")
    parser.add_argument("--variants", default="trl,loraflow,loraflow-compile",
                        help="trl and loraflow[-compile][-mbN] (N packed rows a step)")
    parser.add_argument("--out", type=Path, default=Path("preference_bench.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model on CPU: checks the script, measures nothing")
    args = parser.parse_args()
    global ARCH, DEVICE
    if args.smoke:
        ARCH, DEVICE = SMOKE, "cpu"
    elif not torch.cuda.is_available():
        sys.exit("preference_bench needs a CUDA GPU (or --smoke)")
    variants = args.variants.split(",")
    pairs = make_pairs(args.pairs, scale=0.1 if args.smoke else 1.0)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    results: dict[str, Any] = {"gpu": gpu, "pairs": args.pairs,
                               "steps": args.steps}
    trl_result, tokenized = run_trl(pairs, args.steps)  # also the ids loraflow trains on
    if "trl" in variants:
        results["trl"] = trl_result
    for name in [v for v in variants if v.startswith("loraflow")]:
        # loraflow[-compile][-mbN]: compiled decoder layers; N rows a step instead of --micro
        parts = name.split("-")
        micro = next((int(x[2:]) for x in parts if x.startswith("mb")), args.micro)
        results[name] = run_loraflow(tokenized, args.steps, micro, args.seq_len,
                                     compile="compile" in parts) | {"rows_per_step": micro}
    base = results.get("trl", trl_result)["real_tokens_per_s"]
    print(f"{'variant':<20}{'real tok/s':>12}{'x TRL':>8}{'peak GiB':>10}")
    for name in ["trl"] + [v for v in variants if v.startswith("loraflow")]:
        if name in results:
            r = results[name]
            print(f"{name:<20}{r['real_tokens_per_s']:>12,.0f}"
                  f"{r['real_tokens_per_s'] / base:>8.2f}{r['peak_gib']:>10.1f}")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
