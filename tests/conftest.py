"""Shared fixtures: one loraflow home for the session, a tiny random Llama with the small
tokenizer from tests/assets, a small slice of the shipped data, and one Prefect test server."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from loraflow.environment import configure

# Before prefect or mlflow is imported anywhere: both read their settings at import.
HOME = configure(Path(tempfile.mkdtemp(prefix="loraflow-test-home-")))
# Prefect binds its console log handler to sys.stderr when its logging is set up, on its first
# import: here, pytest's session-long capture, not a test's capsys stream (closed after that
# test: every later flow's log line then failed with "I/O operation on closed file").
import prefect.main  # noqa: E402, F401, I001

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def home() -> Path:
    return HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide LlamaForCausalLM with random weights and the tiny tokenizer."""
    from tiny import make_base  # tests/ is on sys.path (pytest's rootdir conftest)

    return make_base(tmp_path_factory.mktemp("tiny-llama"))


def write_split(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def small_data(tmp_path: Path) -> dict[str, Path]:
    """24/8/4 examples from the shipped splits, copied to a test's own folder."""
    sizes = {"train": 24, "validation": 8, "test": 4}
    out = {}
    for split, n in sizes.items():
        lines = (ROOT / "data" / "orders" / f"{split}.jsonl").read_text().splitlines()[:n]
        out[split] = write_split(
            tmp_path / "data" / f"{split}.jsonl", [json.loads(line) for line in lines]
        )
    return out


@pytest.fixture
def tokenized(tmp_path: Path, small_data: dict[str, Path], tiny_model_dir: Path) -> Path:
    """small_data validated and tokenized (chat template, max length 512) for the tiny model."""
    from loraflow.base_model import load_tokenizer
    from loraflow.config import DataConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.data.validation import validate_splits

    sources = {split: [str(path)] for split, path in small_data.items()}
    validate_splits(sources, tmp_path / "valid", DataConfig(), progress=False)
    tokenize_splits(
        tmp_path / "valid", load_tokenizer(tiny_model_dir), PromptTemplate(kind="chat"),
        TokenizeSettings(max_length=512), tmp_path / "tokens",
    )
    return tmp_path / "tokens"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3-protocol server on loopback, stopped after the module."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="models")
    yield s3_endpoint
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="models"):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket="models", Key=obj["Key"])
    client.delete_bucket(Bucket="models")


@pytest.fixture(scope="session", autouse=True)
def _remove_home():
    yield
    shutil.rmtree(HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with larger random weights: it answers varied text instead of repeating
    one token, which tests of batching, stop strings and inference need."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("chatty-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path
