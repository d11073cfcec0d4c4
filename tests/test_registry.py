from pathlib import Path

import pytest

# --- against a real MLflow registry (the embedded SQLite one of the test home) ---------------


@pytest.fixture(scope="module")
def packaged(tiny_model_dir, tmp_path_factory):
    """The tiny model merged with an adapter and packaged as a pyfunc model directory."""
    from tiny import make_adapter

    from loraflow.release.merge import merge_adapter
    from loraflow.release.registry import package_model

    tmp = tmp_path_factory.mktemp("packaged")
    adapter = make_adapter(tiny_model_dir, tmp / "adapter", template="chat")
    merge_adapter(tiny_model_dir, adapter, tmp / "merged", "fp32", ["Say hi."], 4)
    return package_model(tmp / "merged", adapter, tmp / "pyfunc")


@pytest.fixture
def mlflow_run(home):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("registry-tests") or client.get_experiment(
        # in the test home: without a location MLflow writes ./mlruns in the working directory
        client.create_experiment("registry-tests", (home / "mlartifacts").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    yield client, experiment.experiment_id, run.info.run_id
    client.set_terminated(run.info.run_id)


def register(client, experiment_id, run_id, packaged, name, metrics, mirroring="none"):
    from loraflow.release import registry

    model_id, _ = registry.log_packaged_model(client, experiment_id, run_id, packaged, "model")
    version = registry.register_version(
        client, name, f"models:/{model_id}", run_id, registry.metric_tags(metrics), model_id
    )
    registry.set_alias(client, name, registry.CHALLENGER, version, mirroring)
    return version


def test_a_registered_version_loads_by_alias_and_generates_text(packaged, mlflow_run):
    import mlflow.pyfunc
    import pandas as pd

    client, experiment_id, run_id = mlflow_run
    version = register(client, experiment_id, run_id, packaged, "tiny-pyfunc", {"exact_match": 1})
    loaded = mlflow.pyfunc.load_model("models:/tiny-pyfunc@challenger")
    answers = loaded.predict(
        pd.DataFrame({"instruction": ["Say hi.", "Count."], "input": ["", "1 2"]}),
        params={"max_new_tokens": 5},
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert any(answers), "greedy generation produced text"
    # what MLflow users pass by habit gives the same answers: a list of instructions, records,
    # a one-column DataFrame of instructions
    five = {"max_new_tokens": 5}
    assert loaded.predict(["Say hi."], params=five) == answers[:1]
    assert loaded.predict([{"instruction": "Count.", "input": "1 2"}], params=five) == answers[1:]
    assert loaded.predict(pd.DataFrame({"prompt": ["Say hi."]}), params=five) == answers[:1]
    with pytest.raises(Exception, match="holds no instruction"):
        loaded.predict([{"question": "Say hi."}], params=five)
    # the adapter travels beside the merged model, and the requirements are explicit
    mv = client.get_model_version("tiny-pyfunc", version)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-pyfunc/{version}"))
    assert (local / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "torchvision" not in requirements
    assert mv.tags["metric.exact_match"] == "1"


def test_a_version_is_not_created_from_an_unfinished_upload(packaged, mlflow_run):
    from loraflow.release.registry import RegistryError, register_version

    client, experiment_id, run_id = mlflow_run
    pending = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    with pytest.raises(RegistryError, match="not READY"):
        register_version(
            client, "tiny-pending", f"models:/{pending.model_id}", run_id, {}, pending.model_id
        )
    assert client.search_model_versions("name='tiny-pending'") == []


def test_promote_then_rollback_moves_champion_and_mirrors_stages(packaged, mlflow_run):
    from loraflow.release import registry

    client, experiment_id, run_id = mlflow_run
    name = "tiny-promote"
    v1 = register(
        client, experiment_id, run_id, packaged, name, {"exact_match": 0.5}, "staging-production"
    )
    assert client.get_model_version(name, v1).current_stage == "Staging"
    assert registry.promote(client, name, v1, "first", "staging-production") is None
    v2 = register(
        client, experiment_id, run_id, packaged, name, {"exact_match": 0.7}, "staging-production"
    )
    assert registry.promote(client, name, v2, "better", "staging-production") == v1
    assert registry.champion(client, name)[0] == v2
    assert client.get_model_version(name, v2).current_stage == "Production"
    assert client.get_model_version(name, v1).current_stage == "Archived"

    rows = registry.list_versions(client, name)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["aliases"] == ["challenger", "champion"]
    assert rows[1]["metrics"] == {"exact_match": 0.5}

    assert registry.rollback(client, name, "staging-production") == (v2, v1)
    assert registry.champion(client, name)[0] == v1
    assert client.get_model_version(name, v1).current_stage == "Production"
    with pytest.raises(registry.RegistryError, match="replaced no earlier champion"):
        registry.rollback(client, name, "none")


def test_the_champion_is_looked_up_for_comparison_and_as_the_align_stages_start(
    packaged, mlflow_run
):
    """What the champion evaluation and an align-only run read off the registry: the merged
    model's files (the loraflow.model_uri tag register_model sets), its hashes, its metrics
    and the prompt template its lineage recorded."""
    from loraflow.artifacts import MergedModel
    from loraflow.release import registry
    from tasks.tracking import package_path

    client, experiment_id, run_id = mlflow_run
    name = "tiny-champion-lookup"
    assert registry.champion_files(name) is None and registry.champion_to_align(name) is None
    model_id, location = registry.log_packaged_model(client, experiment_id, run_id, packaged,
                                                     "model")
    tags = registry.metric_tags({"exact_match": 0.5}) | {
        "loraflow.model_uri": f"{location}/{package_path(packaged, 'model')}",
        "loraflow.model_sha256": "m" * 64, "loraflow.adapter_sha256": "a" * 64}
    version = registry.register_version(client, name, f"models:/{model_id}", run_id, tags,
                                        model_id)
    registry.promote(client, name, version, "first", "none")

    champion = registry.champion_files(name)
    assert champion.version == version and champion.sha256 == "m" * 64
    candidate = MergedModel(uri="file:///x", sha256="m" * 64, model_id="m", dtype="float32",
                            device="cpu", note="")
    assert registry.rival(name, candidate) is None  # the champion is the candidate itself
    other = candidate.model_copy(update={"sha256": "n" * 64})
    assert registry.rival(name, other) == champion
    sft = registry.champion_to_align(name)
    assert sft.model == champion and sft.metrics == {"exact_match": 0.5}
    assert sft.parent.model_dump() == {"version": version, "adapter_sha256": "a" * 64,
                                       "model_sha256": "m" * 64}
    assert sft.template.kind == "chat"  # the adapter's lineage, copied onto the merged model


@pytest.mark.integration
def test_mlflow_models_serve_answers_over_http_on_loopback(packaged, mlflow_run, unused_port):
    """The documented serving command (docs/serving.md) on the registered tiny model."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    client, experiment_id, run_id = mlflow_run
    register(client, experiment_id, run_id, packaged, "tiny-serve", {"exact_match": 1})
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/tiny-serve@challenger",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(unused_port)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # as in an activated environment: the scoring server runs the venv's uvicorn
        env={**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}"},
    )
    base = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the scoring server did not come up"
                time.sleep(0.5)
        body = json.dumps({"inputs": [{"instruction": "Say hi.", "input": ""}],
                           "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str) and predictions[0]
        # a list of instruction strings, as MLflow users send it by habit: the same answer
        body = json.dumps({"inputs": ["Say hi."], "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["predictions"] == predictions
        # one string, not in a list: one prompt (it was answered once per character)
        body = json.dumps({"inputs": "Say hi.", "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["predictions"] == predictions
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stderr.close()
