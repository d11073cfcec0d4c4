"""Evaluation inside the flow: per-set metrics and scored answers logged to the run, the
current champion answering the same prompts, and the HTML report; real Prefect and MLflow."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.test_pipeline import states, tiny_config

pytestmark = pytest.mark.integration
# Sorts after test_pipeline.py, whose first run expects a cold task cache; its own data config
# and eval settings keep its cache keys apart from that module's runs.


def own_config(*args, **sections):
    cfg = tiny_config(*args, **sections)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"max_length": 500}),
        "eval": cfg.eval.model_copy(update={"side_by_side": 5}),
    })


def local(uri: str) -> Path:
    assert uri.startswith("file://"), uri  # the embedded default keeps artifacts on disk
    return Path(uri.removeprefix("file://"))


def test_the_flow_logs_scored_answers_and_a_report_and_compares_the_champion(
    prefect_server, small_data, tiny_model_dir
):
    from flows.finetune import finetune

    first = finetune(config=own_config(small_data, tiny_model_dir, "tiny-report"))
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    for label in ("base", "tuned"):
        for metric in ("exact_match", "test.exact_match", "test.fuzzy", "test.loss"):
            assert f"{label}.{metric}" in run.data.metrics, (label, metric)
    assert "champion" not in first["metrics"]  # no champion yet
    artifacts = local(run.info.artifact_uri)
    answers = (artifacts / "eval/tuned/test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in answers]
    assert len(rows) == 4 and {"answer", "expected", "scores"} <= rows[0].keys()
    table = json.loads((artifacts / "eval/side_by_side.json").read_text())
    assert {"base_answer", "tuned_answer", "tuned_fuzzy"} <= set(table["columns"])

    page = local(first["report_uri"]).read_text()
    # the gate's intervals, loss curves, metric bars, fuzzy
    assert page.count("data:image/png;base64,") == 4 and "<h2>Decision: " in page
    assert "<th>base</th>\n<th>tuned</th>\n</tr>" in page
    assert (artifacts / "report" / "loss_curves.png").is_file()

    # make v1 the champion, then train differently: the champion answers the same prompts
    client.set_registered_model_alias("tiny-report", "champion", "1")
    changed = own_config(small_data, tiny_model_dir, "tiny-report",
                         train={"max_steps": 4, "micro_batch_size": 8, "learning_rate": 1e-2})
    second = finetune(config=changed)
    assert states(second)["evaluate_champion"] == "Completed"
    assert set(second["metrics"]) == {"base", "tuned", "champion"}
    assert second["metrics"]["champion"]["examples"] == 4
    assert client.get_run(second["run_id"]).data.params["eval.champion_version"] == "1"
    page = local(second["report_uri"]).read_text()
    assert "<th>tuned</th>\n<th>champion</th>" in page

    third = finetune(config=changed)  # same champion, same config: nothing runs again
    registry_steps = ("register_model", "promote_model")  # they read the registry each run
    assert {k: v for k, v in states(third).items() if k not in registry_steps} == {
        k: "Cached" for k in states(third) if k not in registry_steps}, states(third)
