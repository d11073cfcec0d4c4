"""Frozen-linear GEMMs on one GPU: bf16 nn.Linear against loraflow's FP8 Float8FrozenLinear.

    python benchmarks/fp8_bench.py [--tokens 16384] [--reps 50]

For each Llama-2-7B linear shape (N, K), times forward + input gradient (what a frozen LoRA base
layer computes: 4*M*N*K FLOPs, no weight gradient) under torch.compile, for bf16 and for FP8
with and without fast accumulation, including the FP8 quantisation of x and of the gradient.
The last row weighs the shapes as one decoder layer has them (q, k, v, o; gate, up; down).
Also prints the relative error of each FP8 output and input gradient against bf16.
"""

from __future__ import annotations

import argparse

import torch

from loraflow.engine.fp8 import Float8FrozenLinear, fp8_supported

# (N, K) of nn.Linear(K, N) in Llama-2-7B, with how many of each one decoder layer holds.
SHAPES = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
VARIANTS = ("bf16", "fp8", "fp8 fast-accum")


def build(variant: str, n: int, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.requires_grad_(False)
    if variant == "bf16":
        return linear
    return Float8FrozenLinear(linear, fast_accum=variant == "fp8 fast-accum")


def step(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


def time_ms(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, reps: int) -> float:
    for _ in range(5):  # compiles on the first call, then warms up
        step(module, x, g)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        step(module, x, g)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="M: tokens per micro-batch")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions (median kept)")
    args = parser.parse_args()
    ok, why = fp8_supported()
    if not ok:
        raise SystemExit(why)
    print(f"{why}; torch {torch.__version__}; M = {args.tokens} tokens")

    m = args.tokens
    ms: dict[tuple[str, tuple[int, int]], float] = {}
    header = (f"{'N x K':>13} {'variant':>15} {'ms':>8} {'TFLOP/s':>8} {'speedup':>8} "
              f"{'err y':>7} {'err dx':>7}")
    print(header)
    print("-" * len(header))
    for (n, k), _count in SHAPES.items():
        torch.manual_seed(1)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        reference = None
        for variant in VARIANTS:
            module = torch.compile(build(variant, n, k), fullgraph=True, dynamic=False)
            ms[variant, (n, k)] = time_ms(module, x, g, args.reps)
            y, dx = step(module, x, g)
            if reference is None:
                reference = (y, dx)
            errors = f"{rel_err(y, reference[0]):7.4f} {rel_err(dx, reference[1]):7.4f}"
            tflops = 4 * m * n * k / ms[variant, (n, k)] / 1e9
            speedup = ms["bf16", (n, k)] / ms[variant, (n, k)]
            print(f"{n:>6}x{k:<6} {variant:>15} {ms[variant, (n, k)]:8.3f} {tflops:8.1f} "
                  f"{speedup:7.2f}x {errors}")
            del module, y, dx
        del x, g, reference
        torch.cuda.empty_cache()
    print("-" * len(header))
    layer_flops = sum(4 * m * n * k * count for (n, k), count in SHAPES.items())
    for variant in VARIANTS:
        total = sum(ms[variant, shape] * count for shape, count in SHAPES.items())
        bf16 = sum(ms["bf16", shape] * count for shape, count in SHAPES.items())
        print(f"{'one layer':>13} {variant:>15} {total:8.3f} {layer_flops / total / 1e9:8.1f} "
              f"{bf16 / total:7.2f}x")


if __name__ == "__main__":
    main()
