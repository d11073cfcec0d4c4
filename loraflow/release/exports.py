"""The exports of a version, each checked by answering the test prompts in a runtime loraflow did
not write: the GGUF files through transformers' own GGUF reader (its tokenizer and chat template
from the file), the vLLM bundle through plain PEFT (AutoPeftModelForCausalLM, the base named in
its adapter_config.json). Greedy answers are compared, prompt by prompt, with those of the
evaluated model (the one the gate scored); export.min_agreement per format decides. Exports answer
in this machine's arithmetic (bf16 on a GPU, fp32 on CPU); where the evaluated answers were made
in another (the merge on a GPU worker, this check on a CPU worker), the merged model answers here
first and is the reference: a near-tie that rounds one way in bf16 and the other in fp32 is not
an export's fault.
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from loraflow.artifacts import ExportCheck
from loraflow.base_model import (
    dtype_name,
    inference_device,
    inference_dtype,
    load_model,
    load_tokenizer,
)
from loraflow.config import EvalConfig, ExportConfig, ExportFormat
from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation.evaluate import (
    AnswerParity,
    EvalResult,
    EvalSet,
    compare_answers,
    evaluate_loaded,
)
from loraflow.release.gguf_export import ollama_modelfile, write_gguf
from loraflow.release.lineage import read_manifest
from loraflow.release.vllm_bundle import write_bundle


class ExportReport(BaseModel):
    """One format checked, and the answers that differed."""

    check: ExportCheck
    parity: AnswerParity  # "adapter": the evaluated model's answer, "merged": the export's


def export_version(
    merged_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    cfg: ExportConfig,
    sets: list[EvalSet],
    eval_cfg: EvalConfig,
    evaluated: EvalResult,
    name: str,
) -> list[ExportReport]:
    """Write every format of cfg.formats under out_dir/<format>/ and check each one."""
    template = read_manifest(merged_dir).template
    evaluated = answered_here(merged_dir, evaluated, sets, template, eval_cfg)
    reports = []
    for fmt in cfg.formats:
        folder = Path(out_dir) / fmt
        start = time.perf_counter()
        if fmt == "vllm":
            write_bundle(adapter_dir, folder, name, eval_cfg.max_new_tokens)
            written = time.perf_counter()
            answers, runtime = bundle_answers(folder, sets, eval_cfg)
        else:
            gguf_file = write_gguf(merged_dir, folder / f"{name}-{fmt.removeprefix('gguf-')}.gguf",
                                   fmt, template, name)
            (folder / "Modelfile").write_text(ollama_modelfile(
                gguf_file.name, load_tokenizer(merged_dir), template,
                eval_cfg.max_new_tokens))
            written = time.perf_counter()
            answers, runtime = gguf_answers(gguf_file, sets, eval_cfg)
        reports.append(report(fmt, folder, evaluated, answers, cfg.min_agreement[fmt], runtime,
                              written - start, time.perf_counter() - written))
    return reports


def report(fmt: ExportFormat, folder: Path, evaluated: EvalResult, answers: EvalResult,
           min_agreement: float, runtime: str, write_seconds: float, check_seconds: float
           ) -> ExportReport:
    parity = compare_answers(evaluated, answers, 1.0 - min_agreement)
    agreement = 1.0 - parity.differing / parity.answers if parity.answers else 1.0
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    check = ExportCheck(format=fmt, agreement=agreement, min_agreement=min_agreement,
                        answers=parity.answers, runtime=runtime, files=files,
                        write_seconds=round(write_seconds, 3),
                        check_seconds=round(check_seconds, 3))
    return ExportReport(check=check, parity=parity)


def answered_here(merged_dir: Path, evaluated: EvalResult, sets: list[EvalSet],
                  template: PromptTemplate, eval_cfg: EvalConfig) -> EvalResult:
    """The evaluated answers if they were made in this machine's arithmetic, else the merged
    model's answers made here (the exports are answered here)."""
    device = inference_device()
    if (evaluated.device, evaluated.dtype) == (device, dtype_name(inference_dtype(device))):
        return evaluated
    merged = load_model(merged_dir, inference_dtype(device), device)
    return _answer(merged, load_tokenizer(merged_dir), sets, template, eval_cfg)


def gguf_answers(gguf_file: Path, sets: list[EvalSet], eval_cfg: EvalConfig
                 ) -> tuple[EvalResult, str]:
    """The test sets answered by the GGUF file as transformers reads it: weights dequantized,
    tokenizer and chat template from the file's metadata (a server's view of it)."""
    tokenizer = load_tokenizer(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=_here_dtype(), use_kernels=False)
    answers = _answer(model, tokenizer, sets, PromptTemplate(kind="chat"), eval_cfg)
    return answers, f"transformers {metadata.version('transformers')} GGUF reader"


def bundle_answers(bundle: Path, sets: list[EvalSet], eval_cfg: EvalConfig
                   ) -> tuple[EvalResult, str]:
    """The test sets answered by the bundle as plain PEFT loads it: the base its
    adapter_config.json names, the adapter applied unmerged, the base's tokenizer; the prompt
    template recorded in the bundle (a vLLM client renders with the same)."""
    from peft import AutoPeftModelForCausalLM, PeftConfig

    base = PeftConfig.from_pretrained(bundle).base_model_name_or_path
    tokenizer = load_tokenizer(base)
    model = AutoPeftModelForCausalLM.from_pretrained(bundle, dtype=_here_dtype(),
                                                     use_safetensors=True)
    answers = _answer(model, tokenizer, sets, read_manifest(bundle).template, eval_cfg)
    return answers, f"peft {metadata.version('peft')} AutoPeftModelForCausalLM"


def _here_dtype() -> torch.dtype:
    return inference_dtype(inference_device())


def _answer(model: Any, tokenizer: Any, sets: list[EvalSet], template: PromptTemplate,
            eval_cfg: EvalConfig) -> EvalResult:
    model = model.to(inference_device()).eval()
    return evaluate_loaded(model, tokenizer, sets, template, eval_cfg, label="export")
