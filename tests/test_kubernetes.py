"""infra/kubernetes/ checked without a cluster (none runs here): every manifest validates
against Kubernetes' own schemas (kubernetes-validate, strict: an unknown or misspelt field
fails), the gpu pool's job as Prefect's kubernetes worker renders it, the pods of the KubeRay
RayCluster, and credentials that come only from the Secret."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values
from test_constraints import pins

from loraflow.engine.ray_job import RayClusterError, check_fits, machine_share

KUBE = Path(__file__).resolve().parents[1] / "infra" / "kubernetes"
VERSION = "1.33.0"  # the oldest Kubernetes release still supported upstream in 2026
CREDENTIAL = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN", re.I)


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBE / name).read_text()) if doc]


def validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, VERSION, strict=True)


def pod_template(spec: dict) -> dict:
    """A pod template embedded in another resource, as the core PodTemplate kind."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
            "template": spec}


def rendered_job(template: dict, **values) -> dict:
    """The Job the worker submits: the template's variables at their defaults (and `values`),
    then what the worker itself adds (the command as args, the flow run's environment)."""
    defaults = {name: v["default"] for name, v in template["variables"]["properties"].items()
                if v.get("default") is not None}
    job = apply_values(template["job_configuration"], defaults | values)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = container["args"].split()
    container["env"] = [{"name": "PREFECT__FLOW_RUN_ID", "value": "0000"}]
    return job


def test_the_home_volume_and_the_settings_validate():
    kinds = []
    for resource in manifests("home.yaml"):
        validate(resource)
        kinds.append(resource["kind"])
    assert kinds == ["PersistentVolumeClaim", "ConfigMap"]
    claim, settings = manifests("home.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every Ray node mounts it
    assert settings["data"]["LORAFLOW_HOME"] == "/var/loraflow"


def test_the_gpu_pool_job_validates_as_the_worker_renders_it():
    template = json.loads((KUBE / "gpu-job-template.json").read_text())
    named = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    assert named <= set(template["variables"]["properties"])  # a typo would render as nothing
    job = rendered_job(template, name="train-1", labels={"loraflow": "train"},
                       command="prefect flow-run execute")
    validate(job)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "loraflow:cuda" and job["spec"]["backoffLimit"] == 0
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in spec["volumes"]}
    assert claims[mounts["/var/loraflow"]] == "loraflow-home"
    four = rendered_job(template, name="train-2", command="x", gpus=4, memory="256Gi")
    validate(four)
    assert four["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "nvidia.com/gpu"] == 4


def test_the_ray_cluster_validates_and_fits_the_ray_backend():
    (cluster,) = manifests("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == pins()["ray"]  # the nodes run the pinned ray
    head, workers = cluster["spec"]["headGroupSpec"], cluster["spec"]["workerGroupSpecs"]
    for group in (head, *workers):
        validate(pod_template(group["template"]))
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for container in group["template"]["spec"]["containers"]:
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/var/loraflow"}
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training worker on the head
    (gpu,) = workers
    replicas = gpu["replicas"]
    assert replicas == gpu["minReplicas"] == gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    # the Ray nodes these pods become hold launch.nodes=replicas x gpus_per_node=gpus, no more
    nodes = [{"NodeManagerAddress": "head", "Resources": {"CPU": 0.0}}] + [
        {"NodeManagerAddress": f"gpu-{i}",
         "Resources": {"CPU": float(container["resources"]["requests"]["cpu"]),
                       "GPU": float(gpus)}} for i in range(replicas)]
    check_fits(nodes, machine_share(gpus), replicas, "loraflow-ray-head-svc:6379")
    with pytest.raises(RayClusterError):
        check_fits(nodes, machine_share(gpus), replicas + 1, "loraflow-ray-head-svc:6379")


def test_credentials_come_only_from_the_secret():
    template = json.loads((KUBE / "gpu-job-template.json").read_text())
    (cluster,) = manifests("raycluster.yaml")
    settings = manifests("home.yaml")[1]["data"]
    assert not [key for key in settings if CREDENTIAL.search(key)]
    pods = [rendered_job(template, name="x", command="x")["spec"]["template"]["spec"],
            cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"])]
    for pod in pods:
        for container in pod["containers"]:
            secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            assert secrets == ["loraflow-credentials"]
            assert not [e for e in container.get("env", []) if CREDENTIAL.search(e["name"])]
    assert "kind: Secret" not in "".join(p.read_text() for p in KUBE.iterdir())
