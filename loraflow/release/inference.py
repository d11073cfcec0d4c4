"""Inference with a model loraflow made: a registered model by alias or version
(`models:/<name>@champion`, `models:/<name>/3`) or a local model directory.

The prompt template recorded with the model (loraflow.json) is applied, so a model is asked
exactly the way it was trained and evaluated. On a GPU the weights can be loaded in 8 or 4 bits
(bitsandbytes) for cheaper inference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraflow.base_model import (
    LOAD_OPTIONS,
    ModelNotFoundError,
    inference_device,
    inference_dtype,
    load_tokenizer,
)
from loraflow.config import loraflow_home
from loraflow.data.prompts import PromptTemplate, TemplateKind
from loraflow.data.records import read_records
from loraflow.evaluation.generation import BatchSize, Decoding, Prompt, generate
from loraflow.release.lineage import LINEAGE_FILE, read_manifest

Quantization = Literal["none", "int8", "nf4"]  # train.precision's names for them
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class InferenceError(ValueError):
    """The model cannot be loaded the way it was asked for (quantization, device)."""


class RegisteredModel(BaseModel):
    """One version of a registered model and where its files are."""

    name: str
    version: str
    source: str
    sha256: str | None = None  # loraflow.model_sha256 tag, when loraflow registered it


def _refused(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "PERMISSION_DENIED" or "error code 403" in str(exc)


def _model_exists(client, name: str) -> bool:  # noqa: ANN001 - an MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def registered_model(name: str, alias: str | None = None, version: str | None = None) -> (
    RegisteredModel | None
):
    """The version an alias points at (or a version by number); None if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, str(version))
        )
    except MlflowException as exc:
        # "no such model / alias / version" means none; any other error (server down) raises.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        if _refused(exc) and not _model_exists(client, name):
            return None  # MLflow's basic auth answers 403 for an alias of a model not yet made
        raise
    return RegisteredModel(
        name=name,
        version=str(found.version),
        # the transformers directory; the version's own source is the pyfunc package around it
        source=found.tags.get("loraflow.model_uri", found.source),
        sha256=found.tags.get("loraflow.model_sha256"),
    )


def download(model: RegisteredModel) -> Path:
    """A local directory with the version's files (a local artifact store is used in place)."""
    import mlflow

    if model.source.startswith("file://"):
        return Path(model.source.removeprefix("file://"))
    target = loraflow_home() / "downloads" / model.name / model.version
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=model.source, dst_path=str(target))
        # download_artifacts puts a directory source inside dst_path under its own name
        inner = [p for p in target.iterdir() if p.is_dir()]
        if not (target / "config.json").is_file() and len(inner) == 1:
            target = inner[0]
    return target


def resolve_model(ref: str) -> Path:
    """A local directory for `models:/<name>@<alias>`, `models:/<name>/<version>` or a path."""
    if ref.startswith("models:/"):
        match = MODEL_URI.match(ref)
        if match is None:
            raise ModelNotFoundError(
                f"model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>, "
                "e.g. models:/loraflow-orders@champion"
            )
        found = registered_model(match["name"], match["alias"], match["version"])
        if found is None:
            raise ModelNotFoundError(
                f"model {ref!r} is not in the registry at the configured MLflow tracking URI. "
                "Fix: check the name and alias in the MLflow UI (make ui-mlflow), or set "
                "MLFLOW_TRACKING_URI to the registry that holds it."
            )
        return download(found)
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {ref!r}: not a model directory (no config.json there) and not a "
            "models:/ URI. Fix: pass a merged model directory or models:/<name>@champion"
        )
    return path


def recorded_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    """The template the model was trained with (loraflow.json); for a model loraflow did not
    make, its chat template if it has one, else the guide's alpaca layout."""
    if (Path(path) / LINEAGE_FILE).is_file():
        return read_manifest(path).template
    return PromptTemplate(kind="chat" if tokenizer.chat_template else "alpaca")


def load_for_inference(
    path: Path, quantization: Quantization = "none", device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer; 8/4-bit loading needs a CUDA GPU and the bitsandbytes package."""
    from transformers import AutoModelForCausalLM

    device = device or inference_device()
    tokenizer = load_tokenizer(path)
    dtype = inference_dtype(device)
    kwargs: dict = {"dtype": dtype, **LOAD_OPTIONS}
    if quantization != "none":
        kwargs |= quantized_loading(quantization, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "none":
        model = model.to(device)
    return model.eval(), tokenizer


def quantized_loading(quantization: Quantization, device: str, dtype: torch.dtype) -> dict:
    """from_pretrained arguments for bitsandbytes 8-bit or 4-bit (NF4, double quantised)."""
    if device == "cpu" or not torch.cuda.is_available():
        raise InferenceError(
            f"quantization {quantization} needs a CUDA GPU (bitsandbytes); this machine has "
            "none. Fix: drop --quantize (full precision on CPU)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InferenceError(
            f"quantization {quantization} needs the bitsandbytes package. "
            "Fix: pip install 'loraflow[gpu]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return {"quantization_config": config, "device_map": {"": device}}


def read_prompts(path: Path) -> list[Prompt]:
    """A JSONL file of {"instruction": ..., "input": ...} (input optional); every bad line is
    reported with file:line."""
    return read_records(
        path, Prompt, "prompt file", '{"instruction": "...", "input": "..."} (input optional)'
    )


def generate_answers(
    model: str | Path,
    prompts: list[Prompt],
    decoding: Decoding | None = None,
    quantization: Quantization = "none",
    template: TemplateKind | None = None,
    batch_size: BatchSize = "auto",
) -> list[str]:
    """Answers to `prompts` from a registered model (models:/...) or a local directory."""
    path = resolve_model(str(model))
    loaded, tokenizer = load_for_inference(path, quantization)
    recorded = PromptTemplate(kind=template) if template else recorded_template(path, tokenizer)
    return generate(loaded, tokenizer, recorded, prompts, decoding or Decoding(), batch_size)
