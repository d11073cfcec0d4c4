"""The whole flow on the tiny model: real Prefect (test server), real MLflow (SQLite registry),
real object storage (a local directory through the storage interface)."""

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from loraflow.base_model import ModelNotFoundError
from loraflow.config import PipelineConfig
from loraflow.data.records import DataError
from loraflow.hashing import sha256_file
from loraflow.release.exports import llama_cpp_version
from loraflow.release.storage import StoragePermanentError, StorageUnreachableError

pytestmark = pytest.mark.integration


def tiny_config(splits: dict[str, Path], model_dir: Path, name: str, **sections) -> PipelineConfig:
    raw = {
        "data": {k: v if isinstance(v, list) else str(v) for k, v in splits.items()},
        "model": {"base": str(model_dir)},
        "train": {"max_steps": 3, "micro_batch_size": 8, "learning_rate": 1e-2},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "merge": {"dtype": "fp32"},
        "registry": {"model_name": name},
    }
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    return PipelineConfig.model_validate(raw)


def states(summary) -> dict[str, str]:
    return {name: step["state"] for name, step in summary["tasks"].items()}


def test_pipeline_registers_pushes_and_reruns_fully_cached(
    prefect_server, home, small_data, tiny_model_dir
):
    from flows.finetune import finetune

    cfg = tiny_config(small_data, tiny_model_dir, "tiny-e2e")
    first = finetune(config=cfg)

    # the tiny base may already be prepared by an earlier flow test: the same bytes
    first_states = {k: v for k, v in states(first).items() if k != "prepare_base_model"}
    assert set(first_states.values()) == {"Completed"}, first_states
    assert first["model_version"] == "1" and "challenger" in first["aliases"]
    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny-e2e", "challenger")
    assert str(version.version) == "1" and version.run_id == first["run_id"]
    assert version.tags["loraflow.base_sha256"]
    assert float(version.tags["metric.exact_match"]) == first["metrics"]["tuned"]["exact_match"]
    assert client.get_run(first["run_id"]).info.status == "FINISHED"

    # pushed files match their manifest, which lists the merged model and the adapter
    # under the merged model's SHA-256: a folder no version names until the version is made
    root = home / "storage" / "tiny-e2e" / version.tags["loraflow.model_sha256"]
    assert first["storage_uri"] == root.as_uri() == version.tags["loraflow.storage_uri"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert {
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "adapter/adapter_model.safetensors",
        "adapter/loraflow.json",
    } <= set(manifest["files"])
    for key, digest in manifest["files"].items():
        assert sha256_file(root / key) == digest, key
    # the default export, checked through transformers' GGUF reader, pushed beside the model
    assert {"exports/gguf-f16/tiny-e2e-f16.gguf", "exports/gguf-f16/Modelfile"} <= set(
        manifest["files"])
    exports = {e["name"]: e for e in first["exports"]}
    export = exports["gguf-f16"]
    assert export["format"] == "gguf-f16" and export["agreement"] >= 0.95
    assert version.tags["loraflow.export.gguf-f16.agreement"] == f"{export['agreement']:.6g}"
    # llama.cpp answers the same file where the extra is installed; else the run says, once,
    # that it skipped it and how to install it
    if llama_cpp_version():
        in_llama_cpp = exports["gguf-f16/llama.cpp"]["agreement"]
        assert version.tags["loraflow.export.gguf-f16/llama.cpp.agreement"] == (
            f"{in_llama_cpp:.6g}") and not first["export_notes"]
    else:
        assert set(exports) == {"gguf-f16"}
        [note] = first["export_notes"]
        assert "llama.cpp check of the GGUF exports was skipped" in note
        assert "pip install 'loraflow[llamacpp]'" in note
    lineage = json.loads((root / "adapter" / "loraflow.json").read_text())
    assert lineage["lora"]["r"] == 8 and lineage["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert lineage["chat_template"].startswith("{% for message")
    assert lineage["template"] == {"kind": "chat", "jinja": None}
    assert lineage["tokenize"]["max_length"] == 512

    # the data-quality report: counts per rule and reason, quarantine, histogram, parquet
    run = client.get_run(first["run_id"])
    assert run.data.metrics["data.train.read"] == 24 and run.data.metrics["data.train.kept"] == 24
    assert run.data.metrics["tokens.train_too_long"] == 0
    logged = {
        f.path
        for folder in ("data", "data/quarantine", "data_quality", "tokenized")
        for f in client.list_artifacts(first["run_id"], folder)
    }
    assert {
        "data/train.jsonl",
        "data/report.json",
        "data/quarantine/train.jsonl",
        "data/quarantine/train.tsv",
        "data_quality/token_lengths.png",
        "tokenized/train.parquet",
    } <= logged

    # the summary on disk is the one returned
    written = json.loads((home / "last-run.json").read_text())
    assert written["run_id"] == first["run_id"]
    for key in ("tracking_uri", "model_name", "model_version", "aliases", "storage_uri"):
        assert written[key] == first[key]
    for side in ("base", "tuned"):
        assert 0 <= written["metrics"][side]["json_valid"] <= 1
        assert 0 <= written["metrics"][side]["exact_match"] <= 1

    # the merged model was scored in its serving dtype, checked against base + adapter
    params = run.data.params
    assert params["tuned.dtype"] == "fp32" and params["base.dtype"] == "fp32"
    assert run.data.metrics["merge.answers"] == 4
    assert run.data.metrics["merge.answers_differing"] == 0
    report = client.download_artifacts(first["run_id"], "report/report.html")
    assert "0 of 4 test answers differ between base + adapter" in Path(report).read_text()

    second = finetune(config=cfg)
    # register and promote read the registry every time (they create nothing new here)
    registry_steps = {"register_model", "promote_model"}
    assert {k: v for k, v in states(second).items() if k in registry_steps} == dict.fromkeys(
        registry_steps, "Completed"
    )
    rest = {k: v for k, v in states(second).items() if k not in registry_steps}
    assert set(rest.values()) == {"Cached"}, states(second)
    assert second["model_version"] == "1" and second["aliases"] == first["aliases"]
    assert second["run_id"] != first["run_id"]
    assert len(client.search_model_versions("name='tiny-e2e'")) == 1


def test_a_cached_rerun_reports_the_registry_as_it_is_now(
    prefect_server, home, small_data, tiny_model_dir
):
    from flows.finetune import finetune

    name = "tiny-moved-on"
    first = finetune(config=tiny_config(small_data, tiny_model_dir, name))
    assert first["model_version"] == "1" and "challenger" in first["aliases"]
    # another model registered since: challenger (and maybe champion) moved to v2
    other = finetune(config=tiny_config(small_data, tiny_model_dir, name,
                                        train={"learning_rate": 2e-2}))
    assert other["model_version"] == "2"

    again = finetune(config=tiny_config(small_data, tiny_model_dir, name))
    assert again["model_version"] == "1"
    aliases = {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}
    now = sorted(alias for alias, version in aliases.items() if version == "1")
    assert "challenger" not in again["aliases"] and again["aliases"] == now, (again, aliases)
    written = json.loads((home / "last-run.json").read_text())
    assert written["aliases"] == now and written["run_id"] == again["run_id"]
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 2


def test_one_changed_line_reruns_downstream_and_an_eval_change_keeps_training(
    prefect_server, small_data, tiny_model_dir
):
    from flows.finetune import finetune

    cfg = tiny_config(small_data, tiny_model_dir, "tiny-changes")
    finetune(config=cfg)

    lines = small_data["train"].read_text().splitlines()
    lines[0] = lines[0].replace("Extract", "Please extract", 1)
    small_data["train"].write_text("\n".join(lines) + "\n")
    after_data = states(finetune(config=cfg))
    assert after_data["prepare_base_model"] == "Cached"
    # the base model and the test split did not change: the base's evaluation is kept
    assert after_data["evaluate_base"] == "Cached", after_data
    for name in (
        "validate_data",
        "tokenize_data",
        "train_adapter",
        "merge_adapter",
        "register_model",
        "push_model",
        "promote_model",
    ):
        assert after_data[name] == "Completed", (name, after_data)

    after_eval = states(
        finetune(
            config=tiny_config(
                small_data, tiny_model_dir, "tiny-changes", eval={"max_new_tokens": 6}
            )
        )
    )
    for name in ("validate_data", "tokenize_data", "train_adapter"):
        assert after_eval[name] == "Cached", (name, after_eval)
    # the tuned score is the merged model's: the merge evaluates, so it re-runs
    assert after_eval["evaluate_base"] == after_eval["merge_adapter"] == "Completed"


def test_a_line_that_is_not_json_stops_the_run_before_anything_is_registered(
    prefect_server, small_data, tiny_model_dir
):
    from flows.finetune import finetune

    with small_data["train"].open("a") as f:
        f.write('{"instruction": "x", "input": "y", "output": \n')
    cfg = tiny_config(small_data, tiny_model_dir, "tiny-bad-data")
    # the default min_kept_fraction 0.9 would quarantine the line and go on
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"min_kept_fraction": 1.0})})
    with pytest.raises(DataError, match=r"train.jsonl:25: not JSON"):
        finetune(config=cfg)
    assert MlflowClient().search_model_versions("name='tiny-bad-data'") == []
    failed = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("loraflow").experiment_id],
        filter_string="attributes.status = 'FAILED'",
    )
    assert failed, "the pipeline's MLflow run is marked FAILED"


def test_a_missing_base_model_is_a_clear_error(prefect_server, small_data, tmp_path):
    from flows.finetune import finetune

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        finetune(config=tiny_config(small_data, tmp_path / "no-model", "tiny-no-model"))
    assert MlflowClient().search_model_versions("name='tiny-no-model'") == []


def test_push_to_s3_then_a_missing_bucket_fails_at_once_and_leaves_no_version(
    prefect_server, small_data, tiny_model_dir, s3_env
):
    from flows.finetune import finetune

    good = tiny_config(small_data, tiny_model_dir, "tiny-s3",
                       storage={"root": "s3://models/loraflow", "endpoint_url": s3_env})
    summary = finetune(config=good)
    v1 = MlflowClient().get_model_version("tiny-s3", summary["model_version"])
    assert summary["storage_uri"] == ("s3://models/loraflow/tiny-s3/"
                                      f"{v1.tags['loraflow.model_sha256']}")

    bad = tiny_config(small_data, tiny_model_dir, "tiny-s3-missing-bucket",
                      storage={"root": "s3://no-such-bucket/x", "endpoint_url": s3_env})
    start = time.perf_counter()
    with pytest.raises(StoragePermanentError, match="bucket 'no-such-bucket' does not exist"):
        finetune(config=bad)
    assert time.perf_counter() - start < 60  # no retry storm on a permanent error
    assert MlflowClient().search_model_versions("name='tiny-s3-missing-bucket'") == []


def test_an_unreachable_store_stops_the_run_before_training_and_registers_nothing(
    prefect_server, small_data, tiny_model_dir, monkeypatch, unused_port
):
    """The pipeline asks the configured store first (issue 16): no GPU time is spent on a run
    that could not push. A store that goes away during a push is retried with backoff and the
    version removed: tests/test_servers.py, against a real S3 server stopped mid-push."""
    from flows.finetune import finetune

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    closed = f"http://127.0.0.1:{unused_port}"  # nothing listens there
    cfg = tiny_config(small_data, tiny_model_dir, "tiny-unreachable",
                      storage={"root": "s3://models/x", "endpoint_url": closed})
    with pytest.raises(StorageUnreachableError, match=f"{closed} cannot be reached"):
        finetune(config=cfg)
    assert MlflowClient().search_model_versions("name='tiny-unreachable'") == []


JINJA_TEXT = "{{ bos_token }}JINJA-MARK {{ instruction }}\n{{ input }}\nAnswer: "


def test_a_jinja_template_is_what_the_merge_check_generate_and_the_served_model_render(
    prefect_server, small_data, tiny_model_dir, tmp_path, monkeypatch
):
    """The template's text, not its kind, travels from tokenization to every later render."""
    import mlflow.pyfunc
    import pandas as pd

    from flows.finetune import finetune
    from loraflow.base_model import load_model, load_tokenizer
    from loraflow.data import prompts
    from loraflow.data.prompts import PromptTemplate
    from loraflow.evaluation.generation import Decoding, Prompt, generate
    from loraflow.release.inference import generate_answers, recorded_template, resolve_model

    jinja_file = tmp_path / "prompt.jinja"
    jinja_file.write_text(JINJA_TEXT, encoding="utf-8")
    template = PromptTemplate(kind="jinja", jinja=JINJA_TEXT)
    rendered: list[str] = []

    def spy(*args, **kwargs):
        rendered.append(render(*args, **kwargs))
        return rendered[-1]

    render = prompts.render_prompt  # what every answer's prompt goes through (generation)
    monkeypatch.setattr(prompts, "render_prompt", spy)
    cfg = tiny_config(small_data, tiny_model_dir, "tiny-jinja",
                      data={"template": "jinja", "jinja_template": str(jinja_file)},
                      export={"formats": ["vllm"]})
    finetune(config=cfg)
    # base, base + adapter and the merged model (the merge's check) answered the test split
    instruction = json.loads(small_data["test"].read_text().splitlines()[0])["instruction"]
    assert len(rendered) >= 3 * 4 and all("JINJA-MARK " in text for text in rendered)
    assert sum(f"JINJA-MARK {instruction}" in text for text in rendered) >= 3

    model_dir = resolve_model("models:/tiny-jinja@challenger")
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    assert recorded_template(model_dir, tokenizer) == template
    prompt = Prompt(instruction="Extract the order.", input="2 mugs to Oslo")
    expected = generate(model, tokenizer, template, [prompt], Decoding(max_new_tokens=8), 1)
    wrong = generate(model, tokenizer, PromptTemplate(kind="chat"), [prompt],
                     Decoding(max_new_tokens=8), 1)
    assert expected != wrong  # the tiny model answers differently under another layout
    assert generate_answers(model_dir, [prompt], Decoding(max_new_tokens=8)) == expected

    served = mlflow.pyfunc.load_model("models:/tiny-jinja@challenger")
    frame = pd.DataFrame({"instruction": [prompt.instruction], "input": [prompt.input]})
    assert served.predict(frame, params={"max_new_tokens": 8}) == expected


SERVE_WITHOUT_LORAFLOW = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # the serving libraries; -S: no .pth, so no editable loraflow
assert importlib.util.find_spec("loraflow") is None, "loraflow must not be importable here"
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
frame = pd.DataFrame({"instruction": ["Extract the order."], "input": ["2 mugs to Oslo"]})
print(json.dumps(model.predict(frame, params={"max_new_tokens": 8})))
"""

GUIDE_RELOAD = """
import json, sys
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
config = PeftConfig.from_pretrained(sys.argv[1])
base_model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
model = PeftModel.from_pretrained(base_model, sys.argv[1])
print(json.dumps({"base": config.base_model_name_or_path,
                  "lora": sum("lora_B" in n for n, _ in model.named_parameters())}))
"""


def test_the_registered_model_serves_without_loraflow_and_the_adapter_reloads_elsewhere(
    prefect_server, home, small_data, tiny_model_dir, tmp_path, monkeypatch
):
    """The pyfunc package carries all the code it runs; the pushed adapter names its base as
    configured (here a relative path), so the guide's reload code works on another machine."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    import mlflow

    from flows.finetune import finetune

    trained_in, elsewhere = tmp_path / "trained", tmp_path / "elsewhere"
    for where in (trained_in, elsewhere):
        shutil.copytree(tiny_model_dir, where / "models" / "tiny")
    monkeypatch.chdir(trained_in)
    # train settings of its own: an adapter cached from another test names that test's source
    cfg = tiny_config(small_data, Path("models/tiny"), "tiny-portable", train={"seed": 12})
    summary = finetune(config=cfg)

    package = mlflow.artifacts.download_artifacts("models:/tiny-portable@challenger",
                                                  dst_path=str(tmp_path / "package"))
    served = subprocess.run(
        [sys.executable, "-I", "-S", "-c", SERVE_WITHOUT_LORAFLOW,
         sysconfig.get_paths()["purelib"], package],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    assert len(json.loads(served.stdout.strip().splitlines()[-1])) == 1

    adapter = Path(summary["storage_uri"].removeprefix("file://")) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/tiny"  # as configured, not a local path
    lineage = json.loads((adapter / "loraflow.json").read_text())
    assert lineage["base_source"] == "models/tiny"
    assert Path(lineage["base_path"]).is_absolute() and lineage["base_sha256"]  # the local copy
    reloaded = subprocess.run([sys.executable, "-I", "-c", GUIDE_RELOAD, str(adapter)],
                              capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    assert json.loads(reloaded.stdout.strip().splitlines()[-1]) == {"base": "models/tiny",
                                                                    "lora": 4}


def test_a_run_on_data_in_every_format_trains_and_a_misnamed_file_stops_it_first(
    prefect_server, small_data, tiny_model_dir, tmp_path
):
    """Each split mixes formats, so one flow run reads all eight; then a run given files that
    are not what their names say (UTF-16, gzip named .jsonl, empty, ...) stops at validation,
    naming each with its fix, before anything trains."""
    from dataformats import write_records
    from test_formats import BROKEN

    from flows.finetune import finetune

    records = {
        split: [json.loads(x) for x in path.read_text().splitlines()]
        for split, path in small_data.items()
    }
    layout = {  # split -> formats, the split's records shared among them in order
        "train": ["jsonl.gz", "jsonl.zst", "parquet", "csv"],
        "validation": ["datasets", "tsv"],
        "test": ["json", "jsonl"],
    }
    data = {}
    for split, fmts in layout.items():
        share = len(records[split]) // len(fmts)
        data[split] = [
            str(write_records(tmp_path / split, f"part{i}", fmt,
                              records[split][i * share : (i + 1) * share]))
            for i, fmt in enumerate(fmts)
        ]  # fmt: skip
    # a seed of its own: the cleaned examples equal small_data's, and every task is cached on
    # content, so the same settings would reuse another test's adapter
    summary = finetune(config=tiny_config(data, tiny_model_dir, "tiny-formats",
                                          train={"seed": 21}))
    # the base answering the same cleaned test split is cached by design (keyed on it)
    ran = {k: v for k, v in states(summary).items()
           if k not in ("prepare_base_model", "evaluate_base")}
    assert set(ran.values()) == {"Completed"} and "train_adapter" in ran, ran
    assert summary["model_version"] == "1"
    metrics = MlflowClient().get_run(summary["run_id"]).data.metrics
    for split, n in (("train", 24), ("validation", 8), ("test", 4)):
        assert metrics[f"data.{split}.read"] == n and metrics[f"data.{split}.kept"] == n

    for name, (raw, _) in BROKEN.items():
        (tmp_path / name).write_bytes(raw)
    broken = dict(small_data, train=[str(tmp_path / name) for name in sorted(BROKEN)])
    with pytest.raises(DataError) as caught:
        finetune(config=tiny_config(broken, tiny_model_dir, "tiny-broken-files"))
    problems = [x for x in str(caught.value).splitlines() if x.startswith("  - train: ")]
    assert len(problems) == len(BROKEN) and all(" Fix: " in p for p in problems)
    assert MlflowClient().search_model_versions("name='tiny-broken-files'") == []
