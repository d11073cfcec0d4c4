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


def test_the_pipeline_sits_on_the_cpu_pool_and_every_step_that_loads_the_model_on_gpu():
    found = deployments()
    assert set(found) == {"finetune", "align", "sweep", "train", "evaluate", "merge"}
    for name in ("finetune", "align", "sweep"):
        assert found[name]["work_pool"]["name"] == "cpu", name
    for name in ("train", "evaluate", "merge"):
        assert found[name]["work_pool"]["name"] == "gpu", name
    for deployment in found.values():  # the shared env reaches every job
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        # heartbeats for the automation that marks a dead machine's runs Crashed; retries
        # that ride out a Prefect server restart (docs/reliability.md)
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert int(env["PREFECT_CLIENT_MAX_RETRIES"]) >= 7


def test_the_automation_that_crashes_silent_runs_watches_only_runs_that_heartbeat_often():
    """A run is declared dead after `within` seconds without a heartbeat. Runs of our
    deployments heartbeat every 30 s (the job env); every other flow run at Prefect's default,
    180 s, which is longer than the window: an in-process `loraflow run` against the stack was
    marked Crashed at +92 s while it trained. So the automation watches only runs tagged
    loraflow, and every deployment carries that tag."""
    import yaml
    from prefect.events.schemas.automations import AutomationCore
    from prefect.settings.models.flows import FlowsSettings

    spec = yaml.safe_load((ROOT / "infra" / "automations.yaml").read_text())
    (automation,) = [AutomationCore.model_validate(a) for a in spec["automations"]]
    assert automation.name == "crash-zombie-flow-runs"
    trigger = automation.trigger
    assert trigger.posture == "Proactive"
    within = trigger.within.total_seconds()
    for deployment in deployments().values():
        frequency = int(deployment["work_pool"]["job_variables"]["env"][
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])  # fmt: skip
        assert within >= 4 * frequency, deployment["name"]  # four missed heartbeats
        assert "loraflow" in deployment["tags"], deployment["name"]
    default = FlowsSettings.model_fields["heartbeat_frequency"].default
    assert default is None or default > within  # so untagged runs must stay out of it:
    related = trigger.match_related
    related = related if isinstance(related, list) else [related]
    assert [getattr(r, "root", r) for r in related] == [
        {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.loraflow"}
    ]
    assert automation.actions[0].type == "change-flow-run-state"
    assert "crash-zombie-flow-runs" in (ROOT / "infra" / "deploy.sh").read_text()


@pytest.mark.parametrize("name", ["finetune", "align", "sweep", "train", "evaluate", "merge"])
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
    elif name == "sweep":  # a search whose pruner has validation losses to compare
        cfg = check_pipeline_params(flow.validate_parameters(params))
        assert cfg.sweep is not None and cfg.sweep.pruner and cfg.train.eval_every > 0
    elif name == "train":  # the pipeline supplies the references; the deployment the GPUs
        assert params == {"gpus_per_node": None}  # null: 1 if the worker sees a GPU, else 0
    else:  # everything comes from the pipeline
        assert params == {}


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


def pipeline_refs(tiny_model_dir) -> dict:
    """The references the pipeline hands its gpu-pool deployments, as they would come."""
    from loraflow.artifacts import Adapter, Champion, HeldoutSplit, TokenizedData
    from loraflow.base_model import BaseModelRef
    from loraflow.config import TrainConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeReport, TokenizeSettings

    return {
        "tokens": TokenizedData(
            uri="file:///x", sha256="0" * 64, template=PromptTemplate(), data_sha256="2" * 64,
            tokenizer_sha256="3" * 64,
            report=TokenizeReport(**dict.fromkeys(
                ("counts", "too_long", "truncated", "completion_truncated_away", "tokens",
                 "label_tokens", "rows"), {}), settings=TokenizeSettings(max_length=512)),
        ),
        "base": BaseModelRef(name="tiny", path=tiny_model_dir, sha256="1" * 64,
                             source=str(tiny_model_dir)),
        "adapter": Adapter(uri="file:///a", sha256="4" * 64, result={}, trained=TrainConfig()),
        "test": HeldoutSplit(uri="file:///d", sha256="5" * 64),
        "champion": Champion(uri="file:///c", sha256="6" * 64, version="1"),
        "template": PromptTemplate(),
    }


def test_train_deployment_accepts_what_the_pipeline_sends_and_keeps_its_own_gpu_count(
    tiny_model_dir,
):
    import inspect

    from loraflow.artifacts import TrainRequest
    from loraflow.config import LaunchConfig, LoraSettings, TrainConfig
    from tasks.deployments import parameters
    from tasks.model import train_adapter

    deployment = deployments()["train"]
    flow = load_flow(deployment)
    refs = pipeline_refs(tiny_model_dir)
    request = TrainRequest(tokens=refs["tokens"], base=refs["base"], lora=LoraSettings(),
                           train=TrainConfig(), launch=LaunchConfig())
    sent = parameters(request, "r")
    # the pipeline's task sends its request and run id, which the flow hands the same task...
    assert set(sent) == {"request", "run_id"}
    assert set(sent) <= set(inspect.signature(train_adapter.fn).parameters)
    # ...and not gpus_per_node: the deployment's own value is not overwritten
    assert set(inspect.signature(flow.fn).parameters) == set(sent) | {"gpus_per_node"}
    assert "gpus_per_node" not in sent and sent["request"]["launch"]["gpus_per_node"] is None
    server_accepts(flow, deployment["parameters"] | sent)
    params = flow.validate_parameters(deployment["parameters"] | sent)
    assert params["request"] == request and params["gpus_per_node"] is None


def test_evaluate_and_merge_deployments_accept_what_the_pipeline_sends(tiny_model_dir):
    import inspect

    from loraflow.artifacts import EvaluateRequest, MergeRequest
    from loraflow.config import EvalConfig, MergeConfig
    from tasks.deployments import parameters
    from tasks.model import evaluate_model, merge_adapter

    refs = pipeline_refs(tiny_model_dir)
    common = {"test": refs["test"], "template": refs["template"], "cfg": EvalConfig()}
    evaluate = load_flow(deployments()["evaluate"])
    assert set(inspect.signature(evaluate.fn).parameters) == {"request", "run_id"}
    for model, label in ((refs["base"], "base"), (refs["champion"], "champion")):
        request = EvaluateRequest(model=model, **common)
        sent = parameters(request, "r")
        assert set(sent) <= set(inspect.signature(evaluate_model.fn).parameters)
        server_accepts(evaluate, sent)
        assert evaluate.validate_parameters(sent)["request"].label == label
    request = MergeRequest(base=refs["base"], adapter=refs["adapter"], test=refs["test"],
                           template=refs["template"], eval_cfg=EvalConfig(), cfg=MergeConfig())
    sent = parameters(request, "r")
    merge = load_flow(deployments()["merge"])
    assert set(inspect.signature(merge_adapter.fn).parameters) >= set(sent)
    assert set(inspect.signature(merge.fn).parameters) == set(sent)
    server_accepts(merge, sent)
    assert isinstance(merge.validate_parameters(sent)["request"].cfg, MergeConfig)


def test_the_gpu_count_is_one_setting_honoured_wherever_it_is_set(monkeypatch):
    import flows.train as train_flow
    from flows.train import GpuCountError, resolve_gpus

    monkeypatch.setattr(train_flow, "visible_gpus", lambda: 0)
    assert resolve_gpus(None, None) == 0  # a CPU worker with nothing set trains on CPU
    assert resolve_gpus(None, 0) == 0  # the deployment's knob (the docs' CPU profile)
    assert resolve_gpus(0, None) == 0  # the pipeline's config
    with pytest.raises(GpuCountError, match="sees 0 CUDA device"):
        resolve_gpus(None, 1)  # asked for a GPU this worker does not have: refused, not ignored
    with pytest.raises(GpuCountError, match=r"launch.gpus_per_node=2 .* gpus_per_node=0"):
        resolve_gpus(2, 0)
    monkeypatch.setattr(train_flow, "visible_gpus", lambda: 4)
    assert resolve_gpus(None, None) == 1
    assert resolve_gpus(None, 4) == resolve_gpus(4, 4) == 4


def test_train_flow_refuses_gpu_counts_it_cannot_honour():
    import torch

    from flows.train import GpuCountError, check_gpus

    check_gpus(0)
    with pytest.raises(GpuCountError, match="gpus_per_node=-1"):
        check_gpus(-1)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(GpuCountError, match=f"sees {visible} CUDA device.*gpus_per_node=0"):
        check_gpus(visible + 1)


def test_a_failed_child_run_is_quoted_and_a_worker_is_suggested_only_when_none_took_it():
    from types import SimpleNamespace

    from prefect.states import Completed, Failed, Scheduled

    from tasks.deployments import RemoteStepError, check_completed

    def run(state):
        return SimpleNamespace(name="brave-fox", id="1234", state=state)

    check_completed(run(Completed()), "train/train")
    error = "Flow run encountered an exception: GpuCountError: gpus_per_node=1 but this worker"
    with pytest.raises(RemoteStepError) as failed:
        check_completed(run(Failed(message=error)), "train/train")
    assert error in str(failed.value) and "brave-fox" in str(failed.value)
    assert "worker" not in str(failed.value).replace("this worker", "")
    with pytest.raises(RemoteStepError, match="no worker took it.*infra/worker.sh gpu"):
        check_completed(run(Scheduled()), "merge/merge")


def test_the_deployed_trigger_accepts_the_watched_location_only(tmp_path, monkeypatch):
    """prefect.yaml's allowed_data_prefixes as `prefect deploy` fills it in from
    $WATCH_LOCATION; the pipeline refuses an event's file elsewhere before any work."""
    from prefect.utilities.templating import apply_values

    from flows.finetune import finetune
    from loraflow.data.watch import DataLocationError

    inbox = tmp_path / "incoming"
    monkeypatch.setenv("WATCH_LOCATION", str(inbox))
    params = apply_values(deployments()["finetune"]["parameters"], {}, remove_notset=False)
    assert params["allowed_data_prefixes"] == [str(inbox)]
    flow = load_flow(deployments()["finetune"])
    server_accepts(flow, params)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(DataLocationError, match=f"not under any location .*\\({inbox}\\)"):
        finetune.fn(
            config=PipelineConfig(),
            data_uri=str(outside),
            allowed_data_prefixes=params["allowed_data_prefixes"],
        )
    with pytest.raises(DataLocationError, match=f"not under any location .*\\({inbox}\\)"):
        finetune.fn(data_uri=f"{inbox}/../elsewhere.jsonl", allowed_data_prefixes=[str(inbox)])
