"""The exports of a version, each checked by answering the test prompts in a runtime loraflow did
not write: the GGUF files through transformers' own GGUF reader (its tokenizer and chat template
from the file) and, where llama-cpp-python is installed (export.llama_cpp), through llama.cpp
itself, as llama-server and Ollama answer (chat template and stop ids from the file); the vLLM
bundle through plain PEFT (AutoPeftModelForCausalLM, the base named in its adapter_config.json).
Greedy answers are compared, prompt by prompt, with those of the evaluated model (the one the gate
scored); export.min_agreement per format decides, for each runtime of it. Exports answer
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
from loraflow.data.prompts import PromptTemplate, chat_messages
from loraflow.data.records import Example
from loraflow.evaluation.evaluate import (
    AnswerParity,
    EvalResult,
    EvalSet,
    compare_answers,
    encode_sets,
    evaluate_loaded,
    flat_metrics,
    score_set,
)
from loraflow.evaluation.generation import Decoding, cut_at_stop, progress_bar
from loraflow.evaluation.metrics import Scorer
from loraflow.release.gguf_export import ExportError, ollama_modelfile, write_gguf
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
    with_llama_cpp = llama_cpp_runs(cfg, eval_cfg)  # before any work: "required" stops here
    evaluated = answered_here(merged_dir, evaluated, sets, template, eval_cfg)
    tokenizer = load_tokenizer(merged_dir)  # the Modelfiles' stop tokens, llama.cpp's context
    longest = max(len(p) for t in encode_sets(tokenizer, template, sets).values()
                  for p in t.prompts) if with_llama_cpp else 0
    reports = []
    for fmt in cfg.formats:
        folder = Path(out_dir) / fmt
        start = time.perf_counter()
        if fmt == "vllm":
            write_bundle(adapter_dir, folder, name, eval_cfg.max_new_tokens)
            written = time.perf_counter()
            answers, runtime = bundle_answers(folder, sets, eval_cfg)
            reports.append(report(fmt, folder, evaluated, answers, cfg.min_agreement[fmt],
                                  runtime, written - start, time.perf_counter() - written))
            continue
        gguf_file = write_gguf(merged_dir, folder / f"{name}-{fmt.removeprefix('gguf-')}.gguf",
                               fmt, template, name)
        (folder / "Modelfile").write_text(ollama_modelfile(
            gguf_file.name, tokenizer, template, eval_cfg.max_new_tokens))
        written = time.perf_counter()
        answers, runtime = gguf_answers(gguf_file, sets, eval_cfg)
        reports.append(report(fmt, folder, evaluated, answers, cfg.min_agreement[fmt], runtime,
                              written - start, time.perf_counter() - written))
        if with_llama_cpp:
            start = time.perf_counter()
            answers, runtime = llama_cpp_answers(gguf_file, sets, eval_cfg, longest)
            reports.append(report(fmt, folder, evaluated, answers, cfg.min_agreement[fmt],
                                  runtime, 0.0, time.perf_counter() - start, via="llama.cpp"))
    return reports


def report(fmt: ExportFormat, folder: Path, evaluated: EvalResult, answers: EvalResult,
           min_agreement: float, runtime: str, write_seconds: float, check_seconds: float,
           via: str | None = None) -> ExportReport:
    parity = compare_answers(evaluated, answers, 1.0 - min_agreement)
    agreement = 1.0 - parity.differing / parity.answers if parity.answers else 1.0
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    check = ExportCheck(format=fmt, via=via, agreement=agreement, min_agreement=min_agreement,
                        answers=parity.answers, runtime=runtime, files=files,
                        write_seconds=round(write_seconds, 3),
                        check_seconds=round(check_seconds, 3))
    return ExportReport(check=check, parity=parity)


# The extra that brings llama.cpp (llama-cpp-python compiles it from source: ~5 min on 2 cores).
LLAMA_CPP_INSTALL = ("pip install 'loraflow[llamacpp]' (in a checkout: .venv/bin/pip install "
                     "-c constraints.txt -e '.[llamacpp]')")


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version where it is installed, else None."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def llama_cpp_skipped(cfg: ExportConfig, eval_cfg: EvalConfig) -> str | None:
    """The note a run shows where export.llama_cpp=auto asks llama.cpp to answer the GGUF
    exports and it cannot (once a run: the task that exports says it); None otherwise."""
    missing = _llama_cpp_missing(cfg, eval_cfg)
    if cfg.llama_cpp != "auto" or missing is None:
        return None
    fix = (f"To run it: {LLAMA_CPP_INSTALL}; export.llama_cpp=off silences this note."
           if llama_cpp_version() is None else "")
    return (f"the llama.cpp check of the GGUF exports was skipped ({missing}); they were "
            f"answered by transformers' GGUF reader only. {fix}").strip()


def llama_cpp_runs(cfg: ExportConfig, eval_cfg: EvalConfig) -> bool:
    """Whether llama.cpp answers the GGUF exports too (export.llama_cpp); "required" stops
    where it cannot."""
    if not _llama_cpp_wanted(cfg):
        return False
    missing = _llama_cpp_missing(cfg, eval_cfg)
    if missing and cfg.llama_cpp == "required":
        fix = LLAMA_CPP_INSTALL if llama_cpp_version() is None else "eval.decoding=greedy"
        raise ExportError(f"export.llama_cpp=required, but {missing}. Fix: {fix}, or "
                          "export.llama_cpp=auto.")
    return missing is None


def _llama_cpp_wanted(cfg: ExportConfig) -> bool:
    return cfg.llama_cpp != "off" and any(f.startswith("gguf") for f in cfg.formats)


def _llama_cpp_missing(cfg: ExportConfig, eval_cfg: EvalConfig) -> str | None:
    """Why llama.cpp cannot answer exports it is wanted for; None when it can or is not wanted."""
    if not _llama_cpp_wanted(cfg):
        return None
    if llama_cpp_version() is None:
        return "llama-cpp-python is not installed"
    if eval_cfg.decoding != "greedy":
        return f"eval.decoding={eval_cfg.decoding}: llama-cpp-python decodes greedily only"
    return None


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


def llama_cpp_answers(gguf_file: Path, sets: list[EvalSet], eval_cfg: EvalConfig,
                      longest_prompt: int) -> tuple[EvalResult, str]:
    """The test sets answered by llama.cpp from the GGUF file alone, as llama-server and Ollama
    answer chat requests: each prompt sent as chat messages, rendered with the chat template
    stored in the file, greedy, stopped at the file's EOS / end-of-turn ids (llama.cpp's
    end-of-generation tokens). A wrong template or stop id shows here as differing answers."""
    import gguf
    from llama_cpp import Llama  # the optional extra: llama_cpp_runs checked it is there

    decoding = Decoding.of(eval_cfg)
    field = gguf.GGUFReader(gguf_file).fields["llama.context_length"]
    # the KV cache for the longest prompt and its answer, not the model's whole context; the
    # margin: the file's template may lay a prompt out longer than the trained one (a mismatch
    # must show as answers, not as a context overflow)
    n_ctx = min(int(field.contents()), longest_prompt + decoding.max_new_tokens + 256)
    llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                verbose=False)
    per_set, rows = {}, {}
    try:
        with progress_bar(sum(len(s.examples) for s in sets), "export llama.cpp") as update:
            for test_set in sets:
                answers = []
                for e in test_set.examples:
                    llm.reset()  # no KV prefix kept from the last prompt: answers in any order
                    out = llm.create_chat_completion(
                        chat_messages(Example(instruction=e.instruction, input=e.input,
                                              output="")),
                        temperature=0.0, max_tokens=decoding.max_new_tokens,
                        stop=decoding.stop or None, repeat_penalty=1.0)
                    text = out["choices"][0]["message"]["content"] or ""
                    answers.append(cut_at_stop(text, decoding.stop).strip())
                    update(1)
                name = test_set.cfg.name
                per_set[name], rows[name] = score_set(test_set, Scorer(test_set.cfg), answers,
                                                      None)
    finally:
        llm.close()
    result = EvalResult(label="export llama.cpp", metrics=flat_metrics(per_set, sets[0].cfg.name),
                        sets=per_set, examples=rows, device="cpu")
    return result, f"llama.cpp (llama-cpp-python {llama_cpp_version()})"


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
