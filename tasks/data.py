"""Data tasks: validate the JSONL splits, tokenize them for the base model's tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from loraflow.artifacts import ArtifactRef
from loraflow.config import DataConfig
from loraflow.data import validate_splits
from loraflow.lineage import sha256_tree
from loraflow.model import BaseModelRef, load_tokenizer
from loraflow.tokenization import tokenize_splits, tokenizer_sha256
from tasks.caching import CONTENT
from tasks.tracking import fetch, log_dir, log_metrics


@task(cache_policy=CONTENT)
def validate_data(data: DataConfig, run_id: str) -> ArtifactRef:
    """Check every line of the splits; log the validated examples to the run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = validate_splits(
            {"train": data.train, "validation": data.validation, "test": data.test}, Path(tmp)
        )
        uri = log_dir(run_id, Path(tmp), "data")
    log_metrics(run_id, {f"data.{split}_examples": n for split, n in report.counts.items()})
    return ArtifactRef(uri=uri, sha256=report.sha256, meta=report.model_dump())


@task(cache_policy=CONTENT)
def tokenize_data(
    data: ArtifactRef, base: BaseModelRef, cfg: DataConfig, run_id: str
) -> ArtifactRef:
    """Prompt + answer token ids per example (no padding stored), logged to the run."""
    template, max_length = cfg.template, cfg.max_length
    tokenizer = load_tokenizer(base.path)
    with tempfile.TemporaryDirectory() as tmp:
        report = tokenize_splits(fetch(data.uri), tokenizer, template, max_length, Path(tmp))
        sha256 = sha256_tree(Path(tmp))
        uri = log_dir(run_id, Path(tmp), "tokenized")
    if report.counts["train"] == 0:
        raise ValueError(
            f"no training example fits data.max_length={max_length} tokens "
            f"({report.too_long['train']} are longer). Fix: raise data.max_length."
        )
    log_metrics(
        run_id,
        {f"tokens.{split}": n for split, n in report.tokens.items()}
        | {f"tokens.{split}_too_long": n for split, n in report.too_long.items()},
    )
    meta = report.model_dump() | {
        "tokenizer_sha256": tokenizer_sha256(base.path),
        "template": template,
        "data_sha256": data.sha256,
    }
    return ArtifactRef(uri=uri, sha256=sha256, meta=meta)
