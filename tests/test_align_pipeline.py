"""The align stage in the pipeline on the tiny model: after SFT, a preference adapter is
trained on the SFT model, scored beside base and SFT, registered with the SFT model as its
parent; new preference data re-runs only the align steps; an align-only run starts from the
champion."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from loraflow.config import PipelineConfig

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ALIGN_STEPS = {"validate_preferences", "tokenize_preferences", "train_aligned",
               "evaluate_preferences", "merge_aligned", "register_aligned",
               "push_aligned", "promote_aligned", "tag_parent_metrics",
               "export_aligned"}


@pytest.fixture
def preference_data(tmp_path) -> dict[str, Path]:
    out = {}
    for split, n in {"train": 16, "validation": 4, "test": 4}.items():
        lines = (ROOT / "data/orders/preference" / f"{split}.jsonl").read_text().splitlines()
        path = tmp_path / "pref" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines[:n]) + "\n")
        out[split] = path
    return out


def config(data, preference, model_dir, name, **align) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {k: str(v) for k, v in data.items()},
        "model": {"base": str(model_dir)},
        "train": {"max_steps": 2, "micro_batch_size": 8, "learning_rate": 1e-2},
        "eval": {"max_new_tokens": 8, "batch_size": 4, "compare_champion": False},
        "merge": {"dtype": "fp32"},
        "registry": {"model_name": name},
        "align": {**{k: str(v) for k, v in preference.items()},
                  "training": {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-2},
                  "gate_metric": "pref_win_rate"} | align,
    })


def states(summary) -> dict[str, str]:
    return {name: step["state"] for name, step in summary["tasks"].items()}


def test_align_after_sft_registers_the_aligned_model_with_its_parent_and_caches(
    prefect_server, home, small_data, preference_data, tiny_model_dir
):
    from flows.finetune import finetune

    cfg = config(small_data, preference_data, tiny_model_dir, "tiny-align")
    first = finetune(config=cfg)
    assert set(states(first)) >= ALIGN_STEPS
    aligned = first["align"]
    assert aligned["parent_version"] == first["model_version"] == "1"
    assert aligned["model_version"] == "2"
    for label in ("base", "sft", "aligned"):
        assert 0 <= aligned["metrics"][label]["win_rate" if label == "base"
                                              else "pref_win_rate"] <= 1
    assert "exact_match" in aligned["metrics"]["aligned"]
    assert "pref_reward_accuracy" in aligned["metrics"]["aligned"]

    client = MlflowClient()
    version = client.get_model_version("tiny-align", "2")
    sft = client.get_model_version("tiny-align", "1")
    assert version.tags["loraflow.sft_parent_version"] == "1"
    assert version.tags["loraflow.sft_parent_adapter_sha256"] == sft.tags[
        "loraflow.adapter_sha256"]
    assert version.tags["loraflow.preference_data_sha256"] == aligned["preference_data_sha256"]
    assert version.tags["loraflow.align_objective"] == "dpo"
    # the aligned model ships its exports too, checked against its own evaluated answers
    assert [c["name"] for c in aligned["exports"] if c["via"] is None] == ["gguf-f16"]
    assert version.tags["loraflow.export.gguf-f16.agreement"] == (
        f"{aligned['exports'][0]['agreement']:.6g}")
    assert "metric.pref_win_rate" in sft.tags  # the parent scored on the same pairs
    pushed = Path(version.tags["loraflow.storage_uri"].removeprefix("file://"))
    assert pushed == home / "storage" / "tiny-align" / version.tags["loraflow.model_sha256"]
    lineage = json.loads((pushed / "adapter" / "loraflow.json").read_text())
    assert lineage["sft_parent"]["version"] == "1" and lineage["train"]["objective"] == "dpo"
    from loraflow.data.prompts import PromptTemplate

    assert PromptTemplate.recorded(lineage).kind == "chat"
    run = client.get_run(aligned["run_id"])  # the align stage's own run, nested
    assert run.data.tags["mlflow.parentRunId"] == first["run_id"]
    assert "align.train.reward_accuracy" in run.data.metrics
    assert version.run_id == aligned["run_id"]

    # one changed preference line: only the align stage trains again
    lines = preference_data["train"].read_text().splitlines()
    record = json.loads(lines[0])
    record["rejected"] = record["rejected"].replace("}", ',"note":"x"}', 1)
    preference_data["train"].write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    second = finetune(config=cfg)
    got = states(second)
    for name in ("validate_data", "tokenize_data", "train_adapter", "merge_adapter"):
        assert got[name] == "Cached", (name, got[name])
    for name in ("validate_preferences", "train_aligned", "register_aligned"):
        assert got[name] == "Completed", (name, got[name])
    assert second["align"]["model_version"] == "3"


def test_align_only_starts_from_the_champion_and_says_what_is_missing(
    prefect_server, home, small_data, preference_data, tiny_model_dir
):
    from flows.align import AlignError, align

    cfg = config(small_data, preference_data, tiny_model_dir, "tiny-align-only")
    with pytest.raises(AlignError, match="no champion of 'tiny-align-only'.*loraflow run"):
        align(config=cfg)
    with pytest.raises(AlignError, match="align` section"):
        align(config=cfg.model_copy(update={"align": None}))

    # with a champion: the aligned version names it as its parent, from its registry entry
    from flows.finetune import finetune

    sft = finetune(config=cfg.model_copy(update={"align": None}))["model_version"]
    client = MlflowClient()
    client.set_registered_model_alias("tiny-align-only", "champion", sft)
    aligned = align(config=cfg)["align"]
    assert aligned["parent_version"] == sft and aligned["model_version"] == str(int(sft) + 1)
    version = client.get_model_version("tiny-align-only", aligned["model_version"])
    assert version.tags["loraflow.sft_parent_version"] == sft
    assert version.tags["loraflow.sft_parent_adapter_sha256"] == client.get_model_version(
        "tiny-align-only", sft).tags["loraflow.adapter_sha256"]
