"""prefect.yaml: every deployment loads its flow, and every parameter set it can start a run
with (defaults, each schedule's, each trigger's after rendering an event) validates."""

import fnmatch
from pathlib import Path

import pytest
import yaml

from loraflow.config import PipelineConfig
from loraflow.data.watch import DATA_LANDED, FEEDBACK_LANDED

ROOT = Path(__file__).resolve().parents[1]


def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def load_flow(deployment: dict):
    from prefect.flows import load_flow_from_entrypoint

    path, _, _ = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), deployment["entrypoint"]
    return load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))


def server_accepts(flow, params: dict) -> None:
    """The check the Prefect server makes (enforce_parameter_schema): the JSON schema of the
    flow's signature, stricter than pydantic (a string is no list there)."""
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow).model_dump_for_openapi()
    validate_values_conform_to_schema(params, schema, ignore_required=True)


def check_pipeline_params(params: dict) -> PipelineConfig:
    cfg = params["config"]
    assert isinstance(cfg, PipelineConfig)
    for split in ("train", "validation", "test"):
        assert all((ROOT / src).is_file() for src in getattr(cfg.data, split)), split
    return cfg


def test_pipeline_and_train_deployments_sit_on_their_pools():
    found = deployments()
    assert set(found) == {"finetune", "align", "train"}
    assert found["finetune"]["work_pool"]["name"] == "cpu"
    assert found["align"]["work_pool"]["name"] == "cpu"
    assert found["train"]["work_pool"]["name"] == "gpu"
    for deployment in found.values():  # the shared env reaches every job
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


@pytest.mark.parametrize("name", ["finetune", "align", "train"])
def test_deployment_loads_and_its_default_parameters_validate(name):
    deployment = deployments()[name]
    flow = load_flow(deployment)
    assert flow.name == name
    params = deployment.get("parameters", {})
    server_accepts(flow, params)
    if name == "finetune":
        check_pipeline_params(flow.validate_parameters(params))
        assert params["skip_trained_data"] is True
    elif name == "align":
        cfg = check_pipeline_params(flow.validate_parameters(params))
        assert cfg.align is not None
        for split in ("train", "validation", "test"):
            assert all((ROOT / src).is_file() for src in getattr(cfg.align, split)), split
    else:  # the pipeline supplies the references; the deployment the machines it runs on
        assert params == {"gpus_per_node": 1, "nodes": 1}


def test_schedule_is_a_valid_cron_with_parameters_that_validate():
    from prefect.client.schemas.schedules import CronSchedule

    flow = load_flow(deployments()["finetune"])
    (schedule,) = deployments()["finetune"]["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    server_accepts(flow, schedule["parameters"])
    check_pipeline_params(flow.validate_parameters(schedule["parameters"]))


def test_data_trigger_starts_the_pipeline_on_the_landed_file(small_data):
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    deployment = deployments()["finetune"]
    (raw,) = deployment["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    assert trigger.expect == {DATA_LANDED}
    # the resource id `loraflow watch` emits (loraflow.data.<sha256>) matches
    assert fnmatch.fnmatch("loraflow.data." + "ab" * 32, raw["match"]["prefect.resource.id"])
    # the parameters the server starts the run with: deployment defaults, then the trigger's
    # (templates rendered from the event the watcher emits)
    rendered = {
        k: v.replace("{{ event.payload.uri }}", str(small_data["train"]))
        if isinstance(v, str)
        else v
        for k, v in trigger.parameters.items()
    }
    flow = load_flow(deployment)
    server_accepts(flow, deployment["parameters"] | rendered)
    params = flow.validate_parameters(deployment["parameters"] | rendered)
    check_pipeline_params(params)
    assert params["data_uri"] == str(small_data["train"]) and params["skip_trained_data"]


def test_feedback_trigger_starts_an_align_only_run_on_the_landed_file(tmp_path):
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    deployment = deployments()["align"]
    (raw,) = deployment["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    assert trigger.expect == {FEEDBACK_LANDED}
    # `loraflow watch --feedback` emits loraflow.feedback.<sha256>; data events do not match
    assert fnmatch.fnmatch("loraflow.feedback." + "ab" * 32, raw["match"]["prefect.resource.id"])
    assert not fnmatch.fnmatch("loraflow.data." + "ab" * 32, raw["match"]["prefect.resource.id"])
    landed = tmp_path / "feedback.jsonl"
    rendered = {k: v.replace("{{ event.payload.uri }}", str(landed)) if isinstance(v, str)
                else v for k, v in trigger.parameters.items()}
    flow = load_flow(deployment)
    server_accepts(flow, deployment["parameters"] | rendered)
    params = flow.validate_parameters(deployment["parameters"] | rendered)
    assert params["feedback_uri"] == str(landed) and params["config"].align is not None


def test_train_deployment_accepts_what_the_pipeline_sends(tiny_model_dir):
    import inspect

    from loraflow.artifacts import TokenizedData
    from loraflow.base_model import BaseModelRef
    from loraflow.config import LoraSettings, TrainConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeReport, TokenizeSettings
    from tasks.deployments import train_on_gpu_pool

    deployment = deployments()["train"]
    flow = load_flow(deployment)
    sent = {
        "tokens": TokenizedData(
            uri="file:///x", sha256="0" * 64, template=PromptTemplate(), data_sha256="2" * 64,
            tokenizer_sha256="3" * 64,
            report=TokenizeReport(**dict.fromkeys(
                ("counts", "too_long", "truncated", "completion_truncated_away", "tokens",
                 "label_tokens", "rows"), {}), settings=TokenizeSettings(max_length=512)),
        ).model_dump(mode="json"),
        "base": BaseModelRef(name="tiny", path=tiny_model_dir, sha256="1" * 64).model_dump(
            mode="json"
        ),
        "base_source": str(tiny_model_dir),
        "lora": LoraSettings().model_dump(mode="json"),
        "train": TrainConfig().model_dump(mode="json"),
        "run_id": "r",
    }
    # the pipeline's task sends exactly these names (run_id included)
    assert set(inspect.signature(train_on_gpu_pool.fn).parameters) == set(sent)
    server_accepts(flow, deployment["parameters"] | sent)
    params = flow.validate_parameters(deployment["parameters"] | sent)
    assert isinstance(params["train"], TrainConfig) and params["gpus_per_node"] == 1


def test_train_flow_refuses_gpu_counts_it_cannot_honour():
    import torch

    from flows.train import GpuCountError, check_gpus

    check_gpus(0)
    with pytest.raises(GpuCountError, match="gpus_per_node=-1"):
        check_gpus(-1)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(GpuCountError, match=f"sees {visible} CUDA device.*gpus_per_node=0"):
        check_gpus(visible + 1)
