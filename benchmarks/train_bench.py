"""Training throughput: the guide's recipe against loraflow's engine, in one run; and the
engine on 1, 2 and 4 GPUs (data-parallel under torchrun) with the loss curves compared.

    python benchmarks/train_bench.py [--variants guide,packed,packed-compile,nf4] [--steps 8]
    python benchmarks/train_bench.py --gpus 1,2,4 --variants packed-compile --accum 2
    python benchmarks/train_bench.py --gpus 4 --variants fsdp70b --steps 3
    python benchmarks/train_bench.py --variants nf4-70b --seq-lens 4096,8192,16384 --steps 3

Llama-2-7B architecture with random bf16 weights built on the GPU (throughput does not depend
on the weight values); fsdp70b: Llama-2-70B under launch.parallelism=fsdp, built on the meta
device and filled with random weights shard by shard on each GPU (never whole anywhere; needs
torchrun, i.e. --gpus, and 2 GPUs or more); nf4-70b: Llama-2-70B in memory mode on one GPU,
built layer by layer and quantized to NF4 as it is made (loraflow.engine.layerwise: the bf16
model never exists whole), one packed row of each --seq-lens length a step, the preflight's
estimate printed before each and compared with the measured peak. Instruction examples with
log-normal lengths (median ~220 tokens, clipped to 32..1024), 40-80% of each example prompt.
Counts only real (non-padding) tokens. MFU is real tokens/s x (4N + attention FLOPs per
token) / (the bf16 matmul rate measured in this run (an 8192^3 product) x GPUs), N the
variant's architecture's weights. Prints a table and writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def make_examples(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = int(min(1024, max(32, rng.lognormvariate(math.log(220), 0.6))))
        ids = [1] + [rng.randrange(3, 32000) for _ in range(length - 2)] + [2]
        examples.append((ids, int(length * rng.uniform(0.4, 0.8))))
    return examples


def build_model(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA2_7B)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    return model


def llama_params(arch: dict[str, Any]) -> int:
    """Weights of a Llama architecture, the output head included (untied): 6,738,415,616 for
    Llama-2-7B, 68,976,648,192 for Llama-2-70B."""
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    kv = hidden // arch["num_attention_heads"] * arch["num_key_value_heads"]
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * arch["intermediate_size"] \
        + 2 * hidden  # q, o; k, v (GQA); gate, up, down; two norms
    return 2 * arch["vocab_size"] * hidden + layers * layer + hidden


def flops_per_token(arch: dict[str, Any], mean_len: float) -> float:
    # 4N: forward 2N + backward through activations 2N (no weight grads for the frozen base;
    # checkpointing's recomputed forward is not counted). Attention scores and values:
    # 2 matmuls x 2 FLOP x L/2 average causal span x hidden (every query head, GQA or not),
    # per layer, x3 for forward + backward.
    attn = 3 * 2 * 2 * (mean_len / 2) * arch["hidden_size"] * arch["num_hidden_layers"]
    return 4 * llama_params(arch) + attn


def reset_memory() -> None:
    gc.collect()  # an earlier variant's model can sit in reference cycles
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_guide(examples: list[tuple[list[int], int]], steps: int,
              model: torch.nn.Module | None = None, pad_to: int = 1024) -> dict[str, Any]:
    """HF Trainer + PEFT, r=8 q/v, pad to 1024, batch 4 x accum 4, checkpointing, bf16 (fp32
    on CPU). `model`: the base to train (default: a random Llama-2-7B built on the GPU);
    `pad_to` other than 1024 only for the CPU tests' tiny models."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = model if model is not None else build_model("sdpa")
    cuda = next(model.parameters()).is_cuda
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    model.enable_input_require_grads()

    class Padded(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(examples)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = examples[i][0]
            pad = pad_to - len(ids)
            input_ids = torch.tensor(ids + [0] * pad)
            mask = torch.tensor([1] * len(ids) + [0] * pad)
            labels = torch.where(mask.bool(), input_ids, -100)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
        gradient_accumulation_steps=4, learning_rate=2e-5, max_steps=steps + 1,
        lr_scheduler_type="cosine", warmup_steps=0, bf16=cuda, gradient_checkpointing=True,
        logging_steps=1000, save_strategy="no", report_to=[], dataloader_drop_last=True,
        seed=0, use_cpu=not cuda,
    )
    if cuda:
        reset_memory()
    trainer = Trainer(model=model, args=args, train_dataset=Padded(), callbacks=[Clock()])
    trainer.train()
    per_step = 16
    real = sum(len(examples[i][0]) for i in range(per_step, per_step * (steps + 1)))
    seconds = times[-1] - times[0]  # the first step is warm-up
    result = {"real_tokens_per_s": real / seconds, "seconds_per_step": seconds / steps,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
              "padding_share": 1 - real / (per_step * steps * pad_to)}
    del trainer, model
    return result


def timed_metrics(out: Path) -> dict[str, Any]:
    """What the engine's metrics.jsonl in `out` says of the run: real tokens/s over the steps
    after two warm-up steps (compilation, flex_attention's kernels), the first step's seconds,
    the timed seconds and every step's loss."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:]
    seconds = timed[-1]["elapsed_s"] - records[1]["elapsed_s"]
    return {"real_tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "first_step_s": records[0]["elapsed_s"], "timed_s": seconds,
            "losses": [r["loss"] for r in records]}


def run_engine(examples: list[tuple[list[int], int]], steps: int, ranks: Any = None,
               **train: Any) -> dict[str, Any]:
    """loraflow's own loop (loraflow.engine.loop.fit) on the same examples; under torchrun each
    rank trains its share of every step (tokens/s counts every rank's tokens)."""
    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.engine.distributed import SINGLE
    from loraflow.engine.loop import fit
    from loraflow.engine.model import add_lora, load_base, prepare_for_training, use_fp8

    cfg = TrainConfig(max_steps=steps + 2, warmup_steps=0, learning_rate=1e-4,
                      watchdog_seconds=0, **train)
    reset_memory()
    # What earlier variants in this process left allocated (the guide's Trainer keeps its
    # model reachable) is not this variant's: it is subtracted from the peak.
    leftover = torch.cuda.memory_allocated()
    packed = cfg.batching == "packed"
    attn = "flex_attention" if packed else "sdpa"
    model_dir = None
    if cfg.precision in ("int8", "nf4"):  # quantised loading goes through from_pretrained
        model_dir = Path(tempfile.mkdtemp(dir="/tmp"))
        build_model("sdpa").save_pretrained(model_dir)
        reset_memory()
        model = load_base(model_dir, cfg, "cuda", attn)
    else:
        model = prepare_for_training(build_model(attn), cfg)
    model = add_lora(model, LoraSettings(dropout=0.0))
    if cfg.precision == "fp8":
        use_fp8(model)
    reset_memory()
    ranks = ranks or SINGLE
    out = Path(tempfile.mkdtemp())
    fit(model, train_set=examples, val_set=[], t=cfg, out=out, pad_id=0, dtype=torch.bfloat16,
        attn_impl=attn, packed=packed, ranks=ranks)
    if not ranks.main:
        del model
        return {}
    result = timed_metrics(out) | {
        "peak_gib": (torch.cuda.max_memory_allocated() - leftover) / 2**30,
        "leftover_gib": leftover / 2**30, "gpus": ranks.world_size,
        "grad_accum_steps": cfg.grad_accum_steps}
    del model
    if model_dir:
        shutil.rmtree(model_dir, ignore_errors=True)
    return result


def random_base_sharded(
    config: Any, cfg: Any, lora: Any, device: str, attn_impl: str, ranks: Any, seed: int = 0
) -> Any:
    """Benchmarks of launch.parallelism=fsdp on a model too large to build whole (a 70B): the
    architecture `config` (a transformers config) with LoRA, built on the meta device on every
    rank, sharded as load_base_sharded's model is, and filled with random weights on each
    rank's device (distributed.fill_random). Throughput does not depend on the values."""
    from loraflow.engine import distributed
    from loraflow.engine.model import add_lora, fsdp_precision, meta_base, prepare_for_training

    model = add_lora(prepare_for_training(meta_base(config, fsdp_precision(cfg, device),
                                                    attn_impl), cfg), lora)
    distributed.shard_layers(model, ranks)
    distributed.fill_random(model, ranks, seed)
    return model


def run_fsdp_random(
    examples: list[tuple[list[int], int]], steps: int, ranks: Any, arch: dict[str, Any],
    micro_batch: int, accum: int = 1, seq_len: int = 2048, device: str = "cuda",
) -> dict[str, Any]:
    """The engine's launch.parallelism=fsdp on an architecture too large to build whole (the
    70B): random weights made shard by shard on each rank (random_base_sharded, above),
    then loraflow.engine.loop.fit as run_engine runs it; packed rows, checkpointing, no compile.
    Rank 0 returns the numbers, with every rank's weights held and peak memory; the others {}.
    On CPU (gloo, fp32) for the tests."""
    from torch import distributed as dist
    from transformers import LlamaConfig

    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.engine.distributed import held_weights
    from loraflow.engine.loop import fit

    if not ranks.distributed:
        raise ValueError("the fsdp variant shards the model across GPUs: run it under torchrun "
                         "with 2 GPUs or more, e.g. --gpus 4")
    cuda = device == "cuda"
    cfg = TrainConfig(max_steps=steps + 2, warmup_steps=0, learning_rate=1e-4,
                      watchdog_seconds=0, batching="packed",
                      seq_len=seq_len, micro_batch_size=micro_batch, grad_accum_steps=accum,
                      precision="bf16" if cuda else "fp32", gradient_checkpointing=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = "flex_attention" if cuda else "sdpa"  # as the engine picks for packed rows
    if cuda:
        reset_memory()
    start = time.perf_counter()
    model = random_base_sharded(LlamaConfig(**arch), cfg, LoraSettings(dropout=0.0), device,
                                attn, ranks)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    build_s = time.perf_counter() - start
    if ranks.main:
        print(f"fsdp: built on meta, sharded and filled with random weights in {build_s:.1f} s",
              flush=True)
    out = Path(tempfile.mkdtemp())
    fit(model, train_set=examples, val_set=[], t=cfg, out=out, pad_id=0, dtype=dtype,
        attn_impl=attn, packed=True, ranks=ranks)
    mine = {"held": held_weights(model),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0}
    every: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(every, mine)
    total = sum(p.numel() for p in model.parameters())  # DTensors count their whole shape
    del model
    if not ranks.main:
        return {}
    result = timed_metrics(out)
    shutil.rmtree(out, ignore_errors=True)
    return result | {"peak_gib": max(r["peak_gib"] for r in every),
                     "peak_gib_per_rank": [r["peak_gib"] for r in every],
                     "reserved_gib_per_rank": [r["reserved_gib"] for r in every],
                     "weights": total, "held_per_rank": [r["held"] for r in every],
                     "build_s": build_s, "gpus": ranks.world_size,
                     "micro_batch_size": micro_batch, "grad_accum_steps": accum}


def reset_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA as PEFT starts it (A Kaiming-uniform, B zero), no gradients: each nf4-70b sequence
    length trains from the same start on the one model built."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.grad = None
            if "lora_A" in name:
                torch.nn.init.kaiming_uniform_(param, a=5**0.5, generator=generator)
            elif "lora_B" in name:
                param.zero_()


def run_nf4_70b(examples: list[tuple[list[int], int]], steps: int, seq_lens: list[int],
                ceiling_tflops: float, arch: dict[str, Any] = LLAMA2_70B,
                device: str = "cuda") -> dict[str, Any]:
    """Memory mode on the Llama-2-70B architecture on one GPU: the base built once, layer by
    layer, each layer quantized to NF4 as it is made (loraflow.engine.layerwise); then, for each
    sequence length, the preflight's estimate and the engine's loop (fit) on one packed row of
    that length a step, checkpointing, each layer compiled. A length that runs out of memory is
    reported as such and the next is tried. On CPU (fp32, the NF4 stand-in, no compile, no
    memory figures) for the tests, with a tiny `arch`."""
    from transformers import LlamaConfig

    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.engine.layerwise import build_random_nf4
    from loraflow.engine.loop import fit
    from loraflow.engine.preflight import GIB, estimate

    cuda = device == "cuda"
    dtype, attn = (torch.bfloat16, "flex_attention") if cuda else (torch.float32, "sdpa")
    lora = LoraSettings(dropout=0.0)
    base = TrainConfig(max_steps=steps + 2, warmup_steps=0, learning_rate=1e-4,
                       watchdog_seconds=0, **NF4_70B | {"compile": cuda})
    if cuda:
        reset_memory()
    model, built = build_random_nf4(LlamaConfig(**arch), base, lora, device, dtype, attn)
    result: dict[str, Any] = {
        "build_s": built.seconds, "built_gib": built.held_bytes / GIB,
        "build_peak_gib": built.peak_bytes / GIB, "layer_gib": built.layer_bytes / GIB,
        "config": base.model_dump(mode="json") | {"lora": lora.model_dump()}, "by_seq_len": {}}
    if cuda:  # what the allocator saw, beside the model's own tensors
        result |= {"cuda_build_peak_gib": torch.cuda.max_memory_allocated() / GIB,
                   "cuda_built_gib": torch.cuda.memory_allocated() / GIB}
    print(f"nf4-70b: built layer by layer in {built.seconds:.1f} s: {result['built_gib']:.2f} GiB "
          f"held, at most {result['build_peak_gib']:.2f} GiB while building (one layer "
          f"unquantized: {result['layer_gib']:.2f} GiB)", flush=True)
    per_token = flops_per_token(arch, sum(len(e[0]) for e in examples) / len(examples))
    for seq_len in seq_lens:
        cfg = base.model_copy(update={"seq_len": seq_len})
        guess = estimate(arch, cfg, lora, seq_len)
        print(f"nf4-70b seq_len {seq_len}: preflight estimate {guess.total_gib:.1f} GiB (weights "
              f"{guess.weights_gib:.1f}, LoRA state {guess.lora_gib:.2f}, activations "
              f"{guess.activations_gib:.1f}, overhead {guess.overhead_gib:.1f})", flush=True)
        reset_lora(model)
        torch._dynamo.reset()  # each length compiles its own graphs, as a fresh run would
        if cuda:
            reset_memory()
        out = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        try:
            fit(model, train_set=examples, val_set=[], t=cfg, out=out, pad_id=0, dtype=dtype,
                attn_impl=attn, packed=True)
            run = timed_metrics(out)
            run["mfu"] = run["real_tokens_per_s"] * per_token / (ceiling_tflops * 1e12)
        except torch.OutOfMemoryError as exc:
            run = {"error": f"OutOfMemoryError: {str(exc)[:300]}"}
        run |= {"peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
                "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
                "estimate_gib": guess.total_gib, "wall_s": time.perf_counter() - start}
        result["by_seq_len"][seq_len] = run
        print(f"nf4-70b seq_len {seq_len}:", json.dumps(run), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    del model
    return result


def isolation_check(examples: list[tuple[list[int], int]]) -> float:
    """Largest relative gap between each example's loss alone and inside a packed row."""
    from loraflow.config import LoraSettings
    from loraflow.engine.batches import collate
    from loraflow.engine.loss import completion_loss
    from loraflow.engine.model import add_lora

    model = add_lora(build_model("flex_attention"), LoraSettings(dropout=0.0)).eval()
    worst = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        row = [e for e in examples if len(e[0]) < 400][:5]
        packed = {k: v.cuda() for k, v in collate([row], 0, width=2048).items()}
        for d, example in enumerate(row):
            alone = {k: v.cuda() for k, v in collate([[example]], 0, width=2048).items()}
            n = int((alone["labels"][:, 1:] != -100).sum())
            a = float(completion_loss(model, alone, n, "flex_attention"))
            # the same example's tokens inside the packed row: mask out the others' labels
            only = dict(packed, labels=torch.where(packed["doc_ids"] == d, packed["labels"],
                                                   -100))
            b = float(completion_loss(model, only, n, "flex_attention"))
            worst = max(worst, abs(a - b) / abs(a))
    del model
    return worst


# fsdp70b: 2 rows of 2048 a GPU under checkpointing; about 32 GiB of weight shards a GPU on 4.
FSDP70B_MICRO_BATCH = 2
ARCHITECTURES = {"fsdp70b": LLAMA2_70B, "nf4-70b": LLAMA2_70B}  # the others are Llama-2-7B

# The engine's variants: speed mode (bf16 weights, 8 packed rows of 2048, no checkpointing)
# and memory mode (QLoRA nf4 with checkpointing); mbN = N rows per micro-batch.
SPEED = {"batching": "packed", "seq_len": 2048, "micro_batch_size": 8, "precision": "bf16"}
QLORA = {"batching": "packed", "seq_len": 2048, "precision": "nf4", "gradient_checkpointing": True}
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "packed": SPEED,
    "packed-compile": SPEED | {"compile": True},
    "packed-compile-mb12": SPEED | {"compile": True, "micro_batch_size": 12},
    "packed-liger": SPEED | {"kernels": "liger"},
    "packed-liger-compile": SPEED | {"kernels": "liger", "compile": True},
    "packed-fp8": SPEED | {"precision": "fp8"},
    "packed-fp8-compile": SPEED | {"precision": "fp8", "compile": True},
    "nf4": QLORA | {"micro_batch_size": 2, "grad_accum_steps": 4},
    "nf4-mb3": QLORA | {"micro_batch_size": 3, "grad_accum_steps": 3},
    "nf4-mb4": QLORA | {"micro_batch_size": 4, "grad_accum_steps": 2},
    "nf4-liger-mb4": QLORA | {"micro_batch_size": 4, "grad_accum_steps": 2, "kernels": "liger"},
    "nf4-compile-mb1": QLORA | {"micro_batch_size": 1, "grad_accum_steps": 8, "compile": True},
    "nf4-compile-mb2": QLORA | {"micro_batch_size": 2, "grad_accum_steps": 4, "compile": True},
    "nf4-compile-mb4": QLORA | {"micro_batch_size": 4, "grad_accum_steps": 2, "compile": True},
}
# nf4-70b: memory mode as measured at 7B (run 9), one row of --seq-lens tokens a step.
NF4_70B = QLORA | {"micro_batch_size": 1, "grad_accum_steps": 1, "compile": True}


def scaling(args: argparse.Namespace) -> None:
    """The engine on each GPU count of --gpus, same per-GPU work (--accum micro-batches a
    step); scaling efficiency against one GPU when 1 is among the counts; and, when 2 is, one
    GPU with twice the accumulation: the same rows per step as two GPUs, so its loss curve
    must match theirs."""
    runs = [(n, args.accum) for n in map(int, args.gpus.split(","))]
    if any(n == 2 for n, _ in runs):
        runs.append((1, 2 * args.accum))
    results = {}
    for gpus, accum in runs:
        out = args.out.with_name(f"{args.out.stem}-gpus{gpus}-accum{accum}.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(gpus), __file__, "--variants", args.variants,
                   "--steps", str(args.steps), "--accum", str(accum), "--micro-batch",
                   str(args.micro_batch), "--out", str(out)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
        results[(gpus, accum)] = json.loads(out.read_text())[args.variants]
    args.out.write_text(json.dumps({f"{g}x{a}": r for (g, a), r in results.items()}, indent=2))

    one = results.get((1, args.accum), {}).get("real_tokens_per_s")
    print(f"\n{args.variants}, accum {args.accum or 'as the variant'}, micro-batch "
          f"{args.micro_batch or 'as the variant'} (rows of 2048) a GPU a step")
    print("| GPUs | real tokens/s | per GPU | MFU | scaling efficiency | peak GiB a GPU |")
    print("|---|---|---|---|---|---|")
    for (gpus, accum), r in results.items():
        if accum != args.accum:
            continue
        tps = r["real_tokens_per_s"]
        efficiency = f"{tps / (gpus * one):.1%}" if one else "-"  # no 1-GPU run to compare
        print(f"| {gpus} | {tps:,.0f} | {tps / gpus:,.0f} | {r['mfu']:.1%} | {efficiency} | "
              f"{r['peak_gib']:.1f} |")
    if (2, args.accum) in results:
        a, b = results[(1, 2 * args.accum)]["losses"], results[(2, args.accum)]["losses"]
        gap = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
        print(f"\nloss curve, 1 GPU x accum {2 * args.accum} vs 2 GPUs x accum {args.accum} "
              f"(same rows each step): largest relative gap {gap:.2e} over {len(a)} steps")
        print("1 GPU :", " ".join(f"{x:.4f}" for x in a))
        print("2 GPUs:", " ".join(f"{x:.4f}" for x in b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="guide,packed,packed-compile,nf4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--accum", type=int, default=0,
                        help="grad_accum_steps for the engine's variants (0: each variant's)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="micro_batch_size (rows a GPU) for the engine's variants (0: each "
                             f"variant's; fsdp70b: {FSDP70B_MICRO_BATCH})")
    parser.add_argument("--gpus", default="", help="e.g. 1,2,4: the scaling run (torchrun)")
    parser.add_argument("--seq-lens", default="4096,8192,16384",
                        help="nf4-70b: the packed row lengths to train, one row a step")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0,
                        help="let the allocator hold at most this many GiB, as a smaller card "
                             "would (torch.cuda.set_per_process_memory_fraction); 0: the GPU's")
    parser.add_argument("--out", type=Path, default=Path("train_bench.json"))
    args = parser.parse_args()
    if args.gpus:
        return scaling(args)

    from loraflow.engine import distributed

    ranks = distributed.init("cuda", 1800)  # one process unless started by torchrun
    examples = make_examples(4000)
    mean_len = sum(len(ids) for ids, _ in examples) / len(examples)
    ceiling = matmul_tflops()
    if args.memory_cap_gib:  # e.g. a 48 GB card: 47.5 GiB after its CUDA context
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s; mean example {mean_len:.0f} tokens; "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {ranks.world_size} GPU(s)"
        + (f"; allocator capped at {args.memory_cap_gib} GiB" if args.memory_cap_gib else ""),
        flush=True)
    plans = {
        "guide": lambda: run_guide(examples, args.steps),
        "isolation": lambda: {"max_rel_loss_gap": isolation_check(examples)},
    }
    overrides = ({"grad_accum_steps": args.accum} if args.accum else {}) | (
        {"micro_batch_size": args.micro_batch} if args.micro_batch else {})
    for name, train in ENGINE_VARIANTS.items():
        plans[name] = lambda train=train: run_engine(examples, args.steps, ranks,
                                                     **(train | overrides))
    plans["nf4-70b"] = lambda: run_nf4_70b(examples, args.steps,
                                           [int(n) for n in args.seq_lens.split(",")], ceiling)
    plans["fsdp70b"] = lambda: run_fsdp_random(
        examples, args.steps, ranks, LLAMA2_70B, args.micro_batch or FSDP70B_MICRO_BATCH,
        args.accum or 1)
    results: dict[str, Any] = {"ceiling_tflops": ceiling, "mean_len": mean_len,
                               "memory_cap_gib": args.memory_cap_gib}
    for name in args.variants.split(","):
        start = time.perf_counter()
        try:
            results[name] = plans[name]()
        except Exception as exc:  # a variant that fails is reported in the table, not hidden
            if ranks.distributed:
                raise
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        results[name]["wall_s"] = time.perf_counter() - start
        if "real_tokens_per_s" in results[name]:
            per_token = flops_per_token(ARCHITECTURES.get(name, LLAMA2_7B), mean_len)
            results[name]["mfu"] = (results[name]["real_tokens_per_s"] * per_token
                                    / (ceiling * 1e12 * ranks.world_size))
        reset_memory()
        say(name, json.dumps(results[name]), flush=True)
        if ranks.main:
            args.out.write_text(json.dumps(results, indent=2))
    distributed.shutdown(ranks)

    guide = results.get("guide", {}).get("real_tokens_per_s")
    say("\n| recipe | real tokens/s | MFU | peak GiB | vs guide |\n|---|---|---|---|---|")
    for name, r in results.items():
        if not isinstance(r, dict) or "real_tokens_per_s" not in r:
            continue
        tps = r["real_tokens_per_s"]
        ratio = f"{tps / guide:.2f}x" if guide and name in ENGINE_VARIANTS else "-"
        say(f"| {name} | {tps:,.0f} | {r['mfu']:.0%} | {r['peak_gib']:.1f} | {ratio} |")
    if "by_seq_len" in results.get("nf4-70b", {}):
        say("\nnf4-70b (Llama-2-70B, NF4 built layer by layer, one packed row a step)\n"
            "| seq len | real tokens/s | MFU | peak GiB (reserved) | preflight estimate GiB | "
            "loss per step |\n|---|---|---|---|---|---|")
        for seq_len, r in results["nf4-70b"]["by_seq_len"].items():
            speed = (f"{r['real_tokens_per_s']:,.0f} | {r['mfu']:.0%}" if "mfu" in r
                     else f"{r['error'][:40]} | -")
            losses = " ".join(f"{x:.4f}" for x in r.get("losses", []))
            say(f"| {seq_len} | {speed} | {r['peak_gib']:.1f} ({r['reserved_gib']:.1f}) | "
                f"{r['estimate_gib']:.1f} | {losses} |")


if __name__ == "__main__":
    main()
