"""FP8 (e4m3) matmuls for the frozen base linear layers of a LoRA model, on Ada/Hopper GPUs.

In LoRA the base weights never change, so a base linear needs only y = x @ W^T (forward) and
dx = g @ W (backward); no weight gradient. Both run through `torch._scaled_mm` with rowwise
scales: W is quantised once (two fp8 copies, one per GEMM, together the bytes of one bf16 W),
activations and gradients per row on the fly. Nothing of x is saved for backward.

Use after `get_peft_model`, on a model already on its GPU in its final dtype:

    ok, why = fp8_supported()
    if not ok:
        raise RuntimeError(why)
    convert_frozen_linears(peft_model, skip=lambda name: name.endswith("lm_head"))

Why e4m3 for gradients too (not e5m2): each row of g gets its own scale, so the row's largest
value lands on 448 and e5m2's extra range is not needed, while e4m3 keeps one more mantissa bit.
(Recent CUDA rowwise kernels take e5m2 only as the first operand and older ones not at all;
e5m2 gradients were not measured.)

What PEFT touches on `base_layer` (peft 0.21, `lora.Linear.forward`): it only calls
`self.base_layer(x)`; the LoRA branch reads `lora_A.weight.dtype`, never the base weight. There
is deliberately no `weight` attribute: what reads or writes the base weight (merge_adapter,
DoRA, PiSSA/OLoRA init) fails loudly instead of acting on a dequantised copy. Train on the
converted model, save the adapter, and merge into the bf16 base as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The rowwise kernel wants both inner dimensions of its operands to be multiples of 16.
ALIGN = 16


def fp8_supported() -> tuple[bool, str]:
    """Whether this process can run FP8 GEMMs, and if not, why and what to do."""
    if torch.version.hip is not None:
        return False, ("FP8 training here targets NVIDIA GPUs; this torch is a ROCm build "
                       f"({torch.version.hip}). Fix: turn FP8 off for this run.")
    if not torch.cuda.is_available():
        return False, ("FP8 training needs a CUDA GPU and none is visible "
                       "(torch.cuda.is_available() is False). Fix: turn FP8 off for this run.")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, (f"FP8 training needs compute capability 8.9+ (Ada L4/L40, Hopper H100/H200 "
                       f"or newer); {torch.cuda.get_device_name()} is {major}.{minor}. "
                       "Fix: turn FP8 off for this run.")
    return True, f"{torch.cuda.get_device_name()} ({major}.{minor}) runs FP8 e4m3 GEMMs"


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> fp8 codes (R, C) and fp32 scales (R, 1) with t ~= codes * scales."""
    t32 = t.float()
    # clamp: an all-zero row gets a tiny scale and codes of 0 instead of 0/0.
    scale = t32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    # clamp again: CUDA casts values past 448 to NaN, not to 448.
    codes = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes.contiguous(), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values fp8 codes and their (R, 1) scales stand for."""
    return codes.float() * scale


class _FrozenFp8Matmul(torch.autograd.Function):
    """y = x @ W^T + b with gradient for x only; W and b are frozen."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w_rows: torch.Tensor,
        w_rows_scale: torch.Tensor,
        w_cols_t: torch.Tensor,
        w_cols_scale: torch.Tensor,
        bias: torch.Tensor | None,
        fast_accum: bool,
    ) -> torch.Tensor:
        in_features, out_features = w_rows.shape[1], w_rows.shape[0]
        codes, scale = quantize_rows(x.reshape(-1, in_features))
        # mat2 must be column-major: w_rows is (N, K) row-major, so its .t() is (K, N) col-major.
        y = torch._scaled_mm(codes, w_rows.t(), scale_a=scale, scale_b=w_rows_scale, bias=bias,
                             out_dtype=x.dtype, use_fast_accum=fast_accum)
        ctx.save_for_backward(w_cols_t, w_cols_scale)
        ctx.fast_accum = fast_accum
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        w_cols_t, w_cols_scale = ctx.saved_tensors
        in_features, out_features = w_cols_t.shape
        codes, scale = quantize_rows(grad_y.reshape(-1, out_features))
        # W^T is stored (K, N) row-major, so its .t() is W as (N, K) column-major.
        grad_x = torch._scaled_mm(codes, w_cols_t.t(), scale_a=scale, scale_b=w_cols_scale,
                                  out_dtype=grad_y.dtype, use_fast_accum=ctx.fast_accum)
        return grad_x.reshape(*grad_y.shape[:-1], in_features), None, None, None, None, None, None


class Float8FrozenLinear(nn.Module):
    """A frozen nn.Linear whose matmuls run in FP8 e4m3; gradients flow to its input only.

    Holds W (N, K) quantised per output row n for forward, and W^T (K, N) quantised per input
    column k for the input gradient, as non-persistent buffers: they follow `.to(device)` but
    stay out of state_dict, so adapters and checkpoints are the same as without FP8. Do not cast
    the module's dtype after conversion (`.to(torch.bfloat16)` would cast the codes too).
    """

    def __init__(self, linear: nn.Linear, fast_accum: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.fast_accum = fast_accum
        with torch.no_grad():
            w = linear.weight.detach()
            w_rows, w_rows_scale = quantize_rows(w)
            w_cols, w_cols_scale = quantize_rows(w.t())
        self.register_buffer("w_rows", w_rows, persistent=False)
        self.register_buffer("w_rows_scale", w_rows_scale.reshape(1, -1), persistent=False)
        self.register_buffer("w_cols_t", w_cols, persistent=False)
        self.register_buffer("w_cols_scale", w_cols_scale.reshape(1, -1), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenFp8Matmul.apply(x, self.w_rows, self.w_rows_scale, self.w_cols_t,
                                      self.w_cols_scale, self.bias, self.fast_accum)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 (N, K) weight the forward GEMM multiplies by (for tests and inspection)."""
        return dequantize_rows(self.w_rows, self.w_rows_scale.reshape(-1, 1))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8=e4m3 rowwise, fast_accum={self.fast_accum}")


def convert_frozen_linears(
    model: nn.Module,
    skip: Callable[[str], bool] | None = None,
    fast_accum: bool = False,
) -> int:
    """Replace, in place, each frozen nn.Linear with a Float8FrozenLinear; returns how many.

    Converted: exactly nn.Linear (not subclasses such as bitsandbytes layers) whose weight and
    bias do not require grad, with both dimensions multiples of 16, whose weight is not shared
    with another module (tied embeddings: freeing it would save nothing and break the tie), and
    whose qualified name `skip(name)` does not reject. After `get_peft_model` that is every LoRA
    `base_layer` and every untargeted linear; `lora_A`/`lora_B` are trainable and stay as they are.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    chosen = [
        (name, module) for name, module in model.named_modules()
        if name and type(module) is nn.Linear
        and not module.weight.requires_grad
        and (module.bias is None or not module.bias.requires_grad)
        and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0
        and uses[id(module.weight)] == 1
        and not (skip is not None and skip(name))
    ]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Float8FrozenLinear(module, fast_accum=fast_accum))
    return len(chosen)
