"""FP8 frozen linears: the quantisation math, the real _scaled_mm path (it runs on CPU in
torch >= 2.13), PEFT LoRA on a converted tiny Llama, torch.compile without graph breaks, and
the same on a CUDA GPU (gpu marker)."""

import copy
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraflow.engine.fp8 import (
    FP8,
    Float8FrozenLinear,
    convert_frozen_linears,
    dequantize_rows,
    fp8_supported,
    quantize_rows,
)

# e4m3: 3 mantissa bits, so rounding a normal number moves it by at most 2^-4 of itself;
# below the smallest normal (2^-6) the code spacing is 2^-9 (in units of the row's scale).
E4M3_REL, E4M3_SUBNORMAL_STEP = 2.0**-4, 2.0**-9


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        got.float().flatten(), want.float().flatten(), dim=0).item()


def frozen_linear(k: int, n: int, bias: bool, device: str = "cpu") -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=bias, device=device, dtype=torch.bfloat16)
    return linear.requires_grad_(False)


def test_quantize_rows_round_trips_within_e4m3_rounding():
    torch.manual_seed(0)
    t = torch.randn(64, 96) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of many magnitudes
    t[5] = 0.0  # an all-zero row (padding) must not give 0/0
    codes, scale = quantize_rows(t)
    assert codes.dtype == FP8 and codes.is_contiguous() and scale.shape == (64, 1)
    back = dequantize_rows(codes, scale)
    assert torch.isfinite(back).all() and (back[5] == 0).all()
    assert ((back - t).abs() <= E4M3_REL * t.abs() + E4M3_SUBNORMAL_STEP * scale).all()
    # Each row's largest magnitude is coded as the largest e4m3 value, 448.
    nonzero = torch.arange(64) != 5
    assert (codes.float().abs().amax(dim=1)[nonzero] == torch.finfo(FP8).max).all()


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_match_bf16_within_fp8_error(bias):
    linear = frozen_linear(256, 128, bias)
    fp8 = Float8FrozenLinear(linear)
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    g = torch.randn_like(y)
    y.backward(g)

    w = linear.weight.float()
    want_y = x.float() @ w.t() + (linear.bias.float() if bias else 0.0)
    want_dx = g.float() @ w
    assert y.shape == (2, 8, 128) and y.dtype == x.grad.dtype == torch.bfloat16
    for got, want in ((y, want_y), (x.grad, want_dx)):
        assert rel_err(got, want) < 0.05 and cosine(got, want) > 0.99


def test_scaled_mm_uses_the_scales_and_layouts_as_the_emulated_product():
    """The real kernel equals dequantise-then-matmul up to bf16 output rounding: every operand
    is in the layout, and every scale on the axis, the math says."""
    linear = frozen_linear(128, 64, bias=False)
    fp8 = Float8FrozenLinear(linear)
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    g = torch.randn_like(y)
    y.backward(g)

    x_codes, x_scale = quantize_rows(x.detach())
    want_y = dequantize_rows(x_codes, x_scale) @ fp8.dequantized_weight().t()
    g_codes, g_scale = quantize_rows(g)
    w_for_grad = dequantize_rows(fp8.w_cols_t, fp8.w_cols_scale.reshape(-1, 1)).t()
    want_dx = dequantize_rows(g_codes, g_scale) @ w_for_grad
    torch.testing.assert_close(y.float(), want_y, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(x.grad.float(), want_dx, rtol=2**-7, atol=1e-3)


def test_the_frozen_weight_costs_the_bytes_of_bf16_and_leaves_no_parameters():
    linear = frozen_linear(256, 128, bias=True)
    fp8 = Float8FrozenLinear(linear)
    weight_bytes = sum(b.numel() * b.element_size() for b in (fp8.w_rows, fp8.w_cols_t))
    assert weight_bytes == linear.weight.numel() * linear.weight.element_size()
    assert list(fp8.parameters()) == [] and fp8.state_dict() == {}
    assert (fp8.in_features, fp8.out_features) == (256, 128)
    # Quantising did not touch the weight it was built from.
    before = linear.weight.clone()
    Float8FrozenLinear(linear)
    assert torch.equal(linear.weight, before)
    assert cosine(fp8.dequantized_weight(), linear.weight) > 0.999


def test_compiles_without_graph_breaks_inside_a_peft_lora_layer():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, dtype=torch.bfloat16))
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"]))
    assert convert_frozen_linears(model) == 1
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)

    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = (x.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.requires_grad))
    x.grad = None
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    grads = (x.grad, *(p.grad for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(out, eager_out)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_convert_replaces_only_frozen_aligned_unskipped_linears():
    model = torch.nn.ModuleDict({
        "frozen": torch.nn.Linear(32, 48),
        "odd": torch.nn.Linear(32, 40),  # 40 is not a multiple of 16
        "skipped": torch.nn.Linear(32, 32),
        "trained": torch.nn.Linear(32, 32),
    })
    for name in ("frozen", "odd", "skipped"):
        model[name].requires_grad_(False)
    assert convert_frozen_linears(model, skip=lambda name: name == "skipped") == 1
    assert isinstance(model["frozen"], Float8FrozenLinear)
    assert all(type(model[name]) is torch.nn.Linear for name in ("odd", "skipped", "trained"))


def tiny_lora(model_dir: Path) -> torch.nn.Module:
    """The conftest tiny Llama in bf16 with LoRA on q/v, and non-zero B as after some training
    (with B = 0 the gradient of A would be zero and prove nothing)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


def test_converted_tiny_llama_with_lora_trains_like_the_bf16_one(tiny_model_dir, tmp_path):
    reference = tiny_lora(tiny_model_dir)
    model = copy.deepcopy(reference)
    config = model.get_base_model().config
    count = convert_frozen_linears(model, skip=lambda name: name.endswith("lm_head"))

    # Every linear of every decoder layer (4 attention + 3 MLP), LoRA-wrapped or not.
    assert count == 7 * config.num_hidden_layers
    assert count == sum(isinstance(m, Float8FrozenLinear) for m in model.modules())
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            assert isinstance(module.base_layer, Float8FrozenLinear)
    # LoRA A/B are untouched: same names, trainable, same dtype (PEFT keeps them in fp32).
    lora_dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert lora_dtypes == {n: p.dtype for n, p in reference.named_parameters() if p.requires_grad}
    frozen_left = [n for n, m in model.named_modules()
                   if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert [n.rsplit(".", 1)[-1] for n in frozen_left] == ["lm_head"]
    assert lora_dtypes and all("lora_" in n for n in lora_dtypes)

    torch.manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    want_loss, want_grads = loss_and_lora_grads(reference, ids)
    loss, grads = loss_and_lora_grads(model, ids)
    assert math.isfinite(loss) and abs(loss - want_loss) < 0.01 * want_loss
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert cosine(grad, want_grads[name]) > 0.98, name

    # The adapter saved from the converted model holds exactly the LoRA tensors.
    model.save_pretrained(tmp_path / "fp8")
    reference.save_pretrained(tmp_path / "bf16")
    saved = load_file(tmp_path / "fp8" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "bf16" / "adapter_model.safetensors").keys()
    # ... and the engine's resume (set_peft_model_state_dict) loads them back into it.
    assert not set_peft_model_state_dict(model, saved).unexpected_keys


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_fp8_supported_says_why_not_without_cuda():
    ok, why = fp8_supported()
    assert not ok and "CUDA" in why and "Fix" in why


def test_fp8_supported_names_the_gpu_that_is_too_old(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    ok, why = fp8_supported()
    assert not ok and "A100" in why and "8.0" in why and "8.9" in why


@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True])
def test_on_cuda_matches_bf16_and_compiles_fullgraph(fast_accum):
    ok, why = fp8_supported()
    if not ok:
        pytest.skip(why)
    linear = frozen_linear(1024, 2048, bias=False, device="cuda")
    fp8 = Float8FrozenLinear(linear, fast_accum=fast_accum)
    torch.manual_seed(3)
    x = torch.randn(4, 300, 1024, device="cuda", dtype=torch.bfloat16)  # 1200 rows: not /256
    g = torch.randn(4, 300, 2048, device="cuda", dtype=torch.bfloat16)

    x_ref = x.clone().requires_grad_()
    want_y = linear(x_ref)
    want_y.backward(g)

    results = []
    for module in (fp8, torch.compile(fp8, fullgraph=True)):
        x_in = x.clone().requires_grad_()
        y = module(x_in)
        y.backward(g)
        assert rel_err(y, want_y) < 0.05 and cosine(y, want_y) > 0.99
        assert rel_err(x_in.grad, x_ref.grad) < 0.05 and cosine(x_in.grad, x_ref.grad) > 0.99
        results.append((y.float(), x_in.grad.float()))
    (eager_y, eager_dx), (compiled_y, compiled_dx) = results
    # Compiled quantisation may round a scale differently; the products must still agree.
    assert rel_err(compiled_y, eager_y) < 0.01 and rel_err(compiled_dx, eager_dx) < 0.01
