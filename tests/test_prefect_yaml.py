from pathlib import Path

import yaml

from loraflow.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_loads_and_its_parameters_validate():
    from flows.finetune import finetune

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert deployments["finetune"]["work_pool"]["name"] == "cpu"
    for deployment in deployments.values():
        path, name = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        assert name == finetune.fn.__name__
        params = finetune.validate_parameters(deployment.get("parameters", {}))
        assert isinstance(params["config"], PipelineConfig)
        for split in ("train", "validation", "test"):
            assert all((ROOT / src).is_file() for src in getattr(params["config"].data, split))
