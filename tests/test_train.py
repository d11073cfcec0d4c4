import json
import subprocess
import sys

import pytest
import torch

from loraflow.config import LoraSettings, TrainConfig
from loraflow.model import load_model, load_tokenizer
from loraflow.tokenization import tokenize_splits
from loraflow.train import EngineConfig, add_lora, fit, lr_factor, read_examples


@pytest.fixture
def tokenized(tmp_path, small_data, tiny_model_dir):
    from loraflow.config import DataConfig
    from loraflow.data import validate_splits

    sources = {split: [str(path)] for split, path in small_data.items()}
    validate_splits(sources, tmp_path / "valid", DataConfig(), progress=False)
    tokenize_splits(
        tmp_path / "valid", load_tokenizer(tiny_model_dir), "chat", 512, tmp_path / "tokens"
    )
    return tmp_path / "tokens"


def test_training_moves_only_adapter_weights(tmp_path, tiny_model_dir, tokenized):
    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=3, micro_batch_size=4, learning_rate=1e-2, warmup_steps=0)
    fit(model, read_examples(tokenized / "train.jsonl"), [], cfg, tmp_path, 3, torch.float32)
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    assert all(torch.equal(before[n], after[n]) for n in frozen), "a base weight moved"
    assert all(not after[n].requires_grad for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)


def test_engine_process_writes_metrics_adapter_and_learns(tmp_path, tiny_model_dir, tokenized):
    out = tmp_path / "run"
    cfg = EngineConfig(
        base_path=tiny_model_dir,
        data_dir=tokenized,
        output_dir=out,
        lora=LoraSettings(target_modules=["all-linear"], dropout=0.0),
        train=TrainConfig(
            max_steps=25, micro_batch_size=8, learning_rate=5e-2, warmup_steps=2, eval_every=10
        ),
    )
    (tmp_path / "engine.json").write_text(cfg.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.train", "--config", str(tmp_path / "engine.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= records[0].keys()
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 25]
    # it learns: a random 2-layer model starts near ln(512) = 6.24 and moves slowly, so the bar
    # is a clear drop in training loss and a validation loss that falls at every evaluation
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] > val[1] > val[2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.partial"))
    assert json.loads((out / "result.json").read_text())["steps"] == 25


def test_engine_imports_neither_prefect_nor_mlflow():
    code = (
        "import sys, loraflow.train; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine")
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(10, cfg) == pytest.approx(0.0)
