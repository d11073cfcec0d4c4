"""Data tasks: validate and clean the JSONL splits, tokenize them for the base model's tokenizer,
and log a data-quality report (counts per rule and reason, quarantine, length histogram)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.utilities.hashing import hash_objects

from loraflow.artifacts import HeldoutSplit, TokenizedData, ValidatedData
from loraflow.base_model import BaseModelRef, load_tokenizer, token_counter
from loraflow.config import DataConfig, loraflow_home
from loraflow.data.prompts import prompt_template
from loraflow.data.records import SPLITS
from loraflow.data.sources import source_fingerprint
from loraflow.data.tokenization import TokenizeSettings, plot_lengths, tokenize_cached
from loraflow.data.validation import validate_splits
from loraflow.hashing import sha256_file, sha256_tree, tokenizer_sha256
from tasks.caching import CONTENT
from tasks.tracking import fetch, log_dir, log_metrics


def split_sources_key(section: str) -> Callable[[Any, dict[str, Any]], str]:
    """A cache key fn: the bytes behind <section>.train/validation/test of the task's input
    named `section` (paths and s3:// URIs are strings)."""

    def key(context: Any, inputs: dict[str, Any]) -> str:
        sources = inputs[section]
        return hash_objects(
            {split: [source_fingerprint(s) for s in getattr(sources, split)] for split in SPLITS},
            raise_on_failure=True,
        )

    return key


source_bytes = split_sources_key("data")  # data.train/validation/test


@task(cache_policy=CONTENT + CacheKeyFnPolicy(cache_key_fn=source_bytes))
def validate_data(data: DataConfig, base: BaseModelRef, run_id: str) -> ValidatedData:
    """Validate and clean every line; log cleaned data, quarantine and report; fail under the
    kept-fraction threshold before anything trains."""
    count_tokens = token_counter(base.path) if data.clean.min_output_tokens else None
    sources = {split: list(getattr(data, split)) for split in SPLITS}
    with tempfile.TemporaryDirectory() as tmp:
        report = validate_splits(sources, Path(tmp), data, count_tokens=count_tokens)
        (Path(tmp) / "report.json").write_text(
            json.dumps(report.model_dump() | {"totals": report.totals()}, indent=2)
        )
        uri = log_dir(run_id, Path(tmp), "data")
        split_sha256 = {split: sha256_file(Path(tmp) / f"{split}.jsonl") for split in SPLITS}
    metrics: dict[str, float] = {}
    for split, c in report.splits.items():
        metrics |= {
            f"data.{split}_examples": c.usable,
            f"data.{split}_kept_fraction": c.kept_fraction,
        }
        for key in ("read", "blank", "kept", "cleaned", "quarantined"):
            metrics[f"data.{split}.{key}"] = getattr(c, key)
        metrics |= {f"data.{split}.reason.{r}": n for r, n in c.reasons.items()}
        metrics |= {f"data.{split}.rule.{r}": n for r, n in c.rules.items()}
    log_metrics(run_id, metrics)
    report.check(uri)
    return ValidatedData(uri=uri, sha256=report.sha256, counts=report.counts,
                         source_sha256=report.source_sha256, split_sha256=split_sha256)


def heldout_split(data: ValidatedData) -> HeldoutSplit:
    """The validated data's test split alone (test.jsonl under the same URI), hashed by its own
    bytes: what evaluation reads, so new training data leaves the base's evaluation cached."""
    return HeldoutSplit(uri=data.uri, sha256=data.split_sha256["test"])


@task(cache_policy=CONTENT)
def tokenize_data(
    data: ValidatedData, base: BaseModelRef, cfg: DataConfig, run_id: str
) -> TokenizedData:
    """Prompt + answer token ids (one example a row, no padding) as Parquet, cached on the
    content of data, tokenizer and template; logged to the run with a length histogram."""
    tokenizer = load_tokenizer(base.path)
    template = prompt_template(cfg.template, cfg.jinja_template)
    settings = TokenizeSettings(
        max_length=cfg.max_length, truncation=cfg.truncation, train_on=cfg.train_on
    )
    folder, report, _ = tokenize_cached(
        cache_root=loraflow_home() / "tokenized",
        data_dir=fetch(data.uri),
        data_sha256=data.sha256,
        tokenizer=tokenizer,
        tokenizer_sha=tokenizer_sha256(base.path),
        template=template,
        settings=settings,
    )
    if report.counts["train"] == 0:
        raise ValueError(
            f"no training example fits data.max_length={cfg.max_length} tokens "
            f"({report.too_long['train']} are longer, {report.completion_truncated_away['train']} "
            "would lose their whole answer). Fix: raise data.max_length."
        )
    uri = log_dir(run_id, folder, "tokenized")
    with tempfile.TemporaryDirectory() as tmp:
        plot_lengths(folder / "lengths.npz", cfg.max_length, Path(tmp) / "token_lengths.png")
        log_dir(run_id, Path(tmp), "data_quality")
    metrics: dict[str, float] = {}
    for split, n in report.tokens.items():
        metrics[f"tokens.{split}"] = n
        for key in ("too_long", "truncated", "completion_truncated_away", "label_tokens", "rows"):
            metrics[f"tokens.{split}_{key}"] = getattr(report, key)[split]
    log_metrics(run_id, metrics)
    return TokenizedData(uri=uri, sha256=sha256_tree(folder), template=template,
                         data_sha256=data.sha256, tokenizer_sha256=tokenizer_sha256(base.path),
                         report=report)
