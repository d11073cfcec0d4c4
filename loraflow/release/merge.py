"""Merging a LoRA adapter into its base and saving a standalone model directory
(safetensors, tokenizer, generation config) that transformers and vLLM load as is.

Before merging, the adapter's lineage manifest is checked against the base; after merging, the
merged model must answer like base + adapter, or nothing is saved. The pipeline's check
(merge_and_evaluate) is the evaluation itself: base + adapter answer the test sets, the adapter
is folded in, the merged model in its serving dtype answers them again (the score the promotion
gate reads), and the answers that differ are counted. merge_adapter checks a few greedy answers
and their logits instead, for a merge outside the pipeline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from pydantic import BaseModel

from loraflow.base_model import (
    DTYPES,
    inference_device,
    inference_dtype,
    load_as_trained,
    load_model,
    load_tokenizer,
)
from loraflow.config import EvalConfig
from loraflow.data.prompts import PromptTemplate, encode_prompt, render_prompt
from loraflow.evaluation.evaluate import (
    AnswerParity,
    EvalResult,
    EvalSet,
    compare_answers,
    evaluate_loaded,
)
from loraflow.evaluation.generation import Decoding, generate_ids
from loraflow.release.lineage import Lineage, check_adapter_matches_base

log = logging.getLogger(__name__)

Dtype = Literal["bf16", "fp16", "fp32"]
Onto = Literal["as_trained", "original"]  # merge.onto: for an adapter trained on int8/nf4
# Logit gap under which two tokens count as a tie: merged weights are rounded once more than
# base + adapter, so near-ties may flip; anything wider is a broken merge. Measured on
# SmolLM2-135M with an r=8 adapter (3 prompts x 16 tokens, all identical): the largest
# |logit difference| anywhere in the vocabulary was 1.5 in bf16 and 7e-5 in fp32.
TIE_TOLERANCE = {"fp32": 1e-3, "fp16": 2.5e-1, "bf16": 1.0}


class MergeError(RuntimeError):
    """The merge cannot be done or did not reproduce base + adapter; nothing was saved."""


class MergeCheck(BaseModel):
    """Greedy answers of the merged model against base + adapter, same prompts, same dtype."""

    prompts: int
    identical_outputs: int
    max_logit_diff: float
    tie_tolerance: float
    passed: bool
    detail: list[str]


class MergeReport(BaseModel):
    dtype: Dtype
    device: str
    base_quantization: str  # how the adapter's base was loaded for training
    note: str  # what was merged onto what, in words
    check: MergeCheck | None = None  # merge_adapter's greedy check on a few prompts
    parity: AnswerParity | None = None  # merge_and_evaluate's check on the test sets


def merge_adapter(
    base_path: Path,
    adapter_path: Path,
    out_dir: Path,
    dtype: Dtype = "bf16",
    check_prompts: list[str] | tuple[str, ...] = (),
    check_new_tokens: int = 16,
    lineage_extra: dict[str, Any] | None = None,
    onto: Onto = "as_trained",
) -> MergeReport:
    """Fold the adapter into the base in `dtype`; check; save to out_dir (atomically).

    Loads one copy of the base in the requested precision (on the GPU when there is one): the
    reference answers are taken from base + adapter before merging, in place, then compared.
    """
    manifest, quantization, note = checked_manifest(base_path, adapter_path, dtype, onto)
    device = inference_device()
    tokenizer = load_tokenizer(base_path)
    base = load_base(base_path, quantization, onto, DTYPES[dtype], device)
    model = PeftModel.from_pretrained(base, adapter_path)
    model.eval()
    template = manifest.template
    prompts = [
        torch.tensor(encode_prompt(tokenizer, template, render_prompt(tokenizer, template, p, "")))
        for p in check_prompts
    ]
    reference = [
        _with_logits(model, _greedy(model, tokenizer, p, check_new_tokens)) for p in prompts
    ]
    merged = model.merge_and_unload()
    check = _compare(merged, tokenizer, prompts, reference, check_new_tokens, dtype)
    log.info(
        "merge check: %d/%d identical greedy outputs, max logit diff %.3g (%s)",
        check.identical_outputs,
        check.prompts,
        check.max_logit_diff,
        "passed" if check.passed else "FAILED",
    )
    if not check.passed:
        raise MergeError(
            f"the merged model does not reproduce base + adapter: {check.identical_outputs}/"
            f"{check.prompts} identical greedy outputs, max logit diff {check.max_logit_diff:.3g} "
            f"(near-tie tolerance {check.tie_tolerance}); {'; '.join(check.detail)}. Nothing was "
            "saved. Fix: merge in a wider dtype (merge.dtype=fp32)."
        )
    report = MergeReport(
        dtype=dtype, device=device, base_quantization=quantization, note=note, check=check
    )
    save_merged(merged, tokenizer, out_dir,
                manifest.updated(merge=report.model_dump(), **(lineage_extra or {})))
    return report


def merge_and_evaluate(
    base_path: Path,
    adapter_path: Path,
    out_dir: Path,
    sets: list[EvalSet],
    template: PromptTemplate,
    eval_cfg: EvalConfig,
    dtype: Dtype = "bf16",
    max_differing: float = 0.2,
    lineage_extra: dict[str, Any] | None = None,
    onto: Onto = "as_trained",
) -> tuple[MergeReport, EvalResult, EvalResult]:
    """Base + adapter answer the test sets; the adapter is folded in; the merged model, in
    `dtype` (what is saved and served), answers them again; the merge is saved to out_dir
    unless more than `max_differing` of the answers differ. One load of the base for both.

    Returns (report, the merged model's result labelled "tuned", base + adapter's result).
    base + adapter answer in the device's dtype when that is `dtype` (bf16 on a GPU), else in
    fp32, which the merged weights are then rounded from once (fp32 on CPU). The merged model
    answers from its rounded weights in the device's dtype too (inference_dtype: bf16 on a
    GPU, fp32 on CPU), as the champion, the base model and the exports are scored on this
    device: one model scores the same wherever this device scores it."""
    manifest, quantization, note = checked_manifest(base_path, adapter_path, dtype, onto)
    device = inference_device()
    load_dtype = DTYPES[dtype] if inference_dtype(device) == DTYPES[dtype] else torch.float32
    tokenizer = load_tokenizer(base_path)
    base = load_base(base_path, quantization, onto, load_dtype, device)
    model = PeftModel.from_pretrained(base, adapter_path)
    model.eval()
    reference = evaluate_loaded(model, tokenizer, sets, template, eval_cfg, label="adapter")
    merged = model.merge_and_unload()
    # The weights rounded once to what is saved, then answered from as this device answers
    # any model loaded from those files (on CPU: fp32 arithmetic, rotary tables in fp32). In
    # bf16 arithmetic the demo's merged model scored 0.672, and 0.688 when the champion step
    # re-scored the same files: one model, two scores.
    with torch.no_grad():
        for weight in merged.parameters():
            weight.copy_(weight.to(DTYPES[dtype]))
    result = evaluate_loaded(merged, tokenizer, sets, template, eval_cfg, label="tuned")
    merged = merged.to(DTYPES[dtype])  # exactly: every weight's value came from `dtype`
    parity = compare_answers(reference, result, max_differing)
    log.info("merge parity: %d of %d test answers differ from base + adapter's",
             parity.differing, parity.answers)
    if not parity.passed:
        shown = "; ".join(f"{e['set']} #{e['index']}: {e['adapter']!r} -> {e['merged']!r}"
                          for e in parity.examples[:3])
        raise MergeError(
            f"the merged model does not answer like base + adapter: {parity.differing} of "
            f"{parity.answers} test answers differ (merge.max_differing={max_differing}), e.g. "
            f"{shown}. Nothing was saved. Fix: merge in a wider dtype (merge.dtype=fp32), or "
            "raise merge.max_differing if near-ties in a narrow dtype explain it."
        )
    report = MergeReport(dtype=dtype, device=device, base_quantization=quantization, note=note,
                         parity=parity)
    lineage = manifest.updated(merge=report.model_dump(exclude={"parity": {"examples"}}),
                               **(lineage_extra or {}))
    save_merged(merged, tokenizer, out_dir, lineage)
    return report, result, reference


def load_base(base_path: Path, quantization: str, onto: Onto, dtype: torch.dtype,
              device: str) -> Any:
    """The base weights the adapter is merged into: for an adapter trained on an int8/nf4 base
    and onto=as_trained, those quantized weights dequantized (what it learned against: on one
    H100 an nf4 adapter scored 0.703 exact match merged onto the unquantized weights and 0.797
    merged so, 0.875 and 0.969 at twice the steps; docs/benchmarks.md); else the base files."""
    if quantization in ("int8", "nf4") and onto == "as_trained":
        try:
            return load_as_trained(base_path, quantization, dtype)
        except RuntimeError as exc:
            raise MergeError(str(exc)) from exc
    return load_model(base_path, dtype, device)


def checked_manifest(base_path: Path, adapter_path: Path, dtype: Dtype, onto: Onto = "as_trained"
                     ) -> tuple[Lineage, str, str]:
    """The adapter's lineage manifest once it matches the base; (manifest, how its base was
    quantized for training, what is merged onto what in words)."""
    manifest = check_adapter_matches_base(adapter_path, base_path)
    base_config = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in base_config:
        method = base_config["quantization_config"].get("quant_method", "unknown")
        raise MergeError(
            f"base {base_path} stores quantized weights ({method}); LoRA deltas are merged onto "
            "unquantized weights only. Fix: point model.base at the original fp16/bf16/fp32 "
            "checkpoint the quantized one was made from (QLoRA quantizes it at load time)."
        )
    quantization = manifest.base_quantization
    if quantization == "none":
        note = f"merged onto the base in {dtype}"
    elif onto == "as_trained":
        note = (f"adapter trained on a {quantization}-quantized base; merged onto those "
                f"{quantization} weights dequantized to {dtype} (what it learned against)")
    else:
        note = (f"adapter trained on a {quantization}-quantized base; merged onto the "
                f"unquantized {dtype} weights of the same base files (merge.onto=original)")
    log.info("merge: %s", note)
    return manifest, quantization, note


def save_merged(merged: Any, tokenizer: Any, out_dir: Path, lineage: Lineage) -> None:
    """Weights, tokenizer, generation config and lineage into out_dir, atomically."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)  # also generation_config.json
    tokenizer.save_pretrained(staging)
    lineage.write(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def _greedy(model: Any, tokenizer: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prompt + greedy continuation ids by the generation path evaluation uses, one prompt at a
    time (no padding to disagree on) and eager (a few short prompts do not pay for a compile)."""
    [new] = generate_ids(
        model, tokenizer, [prompt.tolist()], Decoding(max_new_tokens=new_tokens), 1, False
    ).ids
    return torch.tensor(prompt.tolist() + new, device=model.device)


@torch.no_grad()
def _with_logits(model: Any, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence, model(sequence[None]).logits[0].float()


@torch.no_grad()
def _compare(
    merged: Any,
    tokenizer: Any,
    prompts: list[torch.Tensor],
    reference: list[tuple[torch.Tensor, torch.Tensor]],
    new_tokens: int,
    dtype: Dtype,
) -> MergeCheck:
    """A prompt passes when its greedy output is identical, or first differs at a near-tie of
    the merged model's own logits on the reference continuation."""
    tolerance = TIE_TOLERANCE[dtype]
    identical, max_diff, detail, passed = 0, 0.0, [], True
    for number, (prompt, (ref, ref_logits)) in enumerate(zip(prompts, reference, strict=True)):
        prompt_len = len(prompt)
        # The merged model teacher-forced on the reference continuation: same logits, or close.
        logits = merged(ref[None]).logits[0].float()
        max_diff = max(max_diff, float((logits - ref_logits)[prompt_len - 1 :].abs().max()))
        out = _greedy(merged, tokenizer, prompt, new_tokens)
        if torch.equal(out, ref):
            identical += 1
            continue
        diverge = next(
            (i for i in range(prompt_len, min(len(out), len(ref))) if out[i] != ref[i]),
            min(len(out), len(ref)),
        )
        step = logits[diverge - 1]
        gap = float(step.max() - step[ref[diverge]]) if diverge < len(ref) else 0.0
        near_tie = gap <= tolerance
        passed &= near_tie
        detail.append(
            f"prompt {number + 1} differs at token {diverge - prompt_len} "
            f"(logit gap {gap:.3g}{', a near-tie' if near_tie else ''})"
        )
    return MergeCheck(
        prompts=len(prompts),
        identical_outputs=identical,
        max_logit_diff=max_diff,
        tie_tolerance=tolerance,
        passed=passed,
        detail=detail,
    )
