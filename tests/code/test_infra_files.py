"""infra/ holds together: the compose file's services, variables and volumes, the Kubernetes work pool's
template and variables, and the manifests' names, images and sizes agree with each other.

Schema checks (the Compose specification, the Kubernetes API) use check-jsonschema and kubernetes-validate, both
in the `test` extra (their schemas ship inside the packages); without them those two tests skip.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from tiny_project import REPO_ROOT

INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text(encoding="utf-8"))


def _manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> resource, over every manifest under infra/k8s (kustomizations aside)."""
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _pod_specs(manifests: dict) -> list[dict]:
    return [m["spec"]["template"]["spec"] for m in manifests.values() if m["kind"] in ("Deployment", "Job")]


def test_compose_services_variables_and_volumes_agree():
    compose = _compose()
    services = compose["services"]
    text = (INFRA / "compose.yaml").read_text(encoding="utf-8")
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", text))
    used = set(re.findall(r"\$\{(\w+)", text))
    assert required and required <= set(example) and used <= set(example)  # .env.example names every variable
    for name, service in services.items():
        assert "image" in service, name
        for target in service.get("depends_on", {}):
            assert target in services, (name, target)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], (name, volume)
        if "build" in service:  # every project container is one of the two variants of infra/Dockerfile
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            assert service["build"]["dockerfile"] == "infra/Dockerfile"
            assert service["image"] == f"mtl-zh:{service['build']['args']['VARIANT']}"
    for path in re.findall(r"(?<!\.)\./([\w./-]+):/", text):  # infra/ files bind-mounted into a service
        assert (INFRA / path).exists(), path
    # the addresses the project's containers use are the servers' own ports
    env = services["prefect-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "4200" in services["prefect-server"]["command"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--port=5000" in services["mlflow"]["command"]
    assert "--allowed-hosts=mlflow:5000," in " ".join(services["mlflow"]["command"])  # MLflow checks Host
    # the GPU worker: the CUDA image, the GPUs of the host, a process pool of flows/deploy.py's deployments
    gpu = services["prefect-worker"]
    assert gpu["image"] == "mtl-zh:cuda" and gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    pool = gpu["command"][gpu["command"].index("--pool") + 1]
    assert gpu["command"][gpu["command"].index("--type") + 1] == "process"
    assert f"--pool {pool}" in " ".join(services["deploy"]["command"])


def test_work_pool_template_uses_every_variable_and_asks_for_gpus():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((K8S / "work-pool-template.json").read_text(encoding="utf-8"))
    placeholders = {p.name for p in find_placeholders(template["job_configuration"])}
    variables = set(template["variables"]["properties"])
    assert placeholders == variables  # every variable referenced, every placeholder declared
    job = template["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"  # the container prefect-kubernetes fills in
    assert container["args"] == "{{ command }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ secret_name }}"}}]
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    manifests = _manifests()
    assert ("PersistentVolumeClaim", defaults["models_claim"]) in manifests
    assert defaults["namespace"] == yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert defaults["image"].endswith("/mtl-zh:cuda")


def test_manifests_share_one_secret_one_image_and_a_consistent_multinode_job():
    manifests = _manifests()
    secrets = {ref["secretRef"]["name"] for spec in _pod_specs(manifests)
               for c in spec["containers"] for ref in c.get("envFrom", [])}
    assert secrets == {"mtl-zh-secrets"}
    example = (K8S / "secrets.env.example").read_text()
    assert all(key in example for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                                          "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"))
    images = {c["image"] for spec in _pod_specs(manifests) for c in [*spec["containers"],
                                                                     *spec.get("initContainers", [])]}
    assert images == {"mtl-zh:cpu", "mtl-zh:cuda"}  # mapped to the registry by each kustomization
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        assert k["images"][0]["name"] == "mtl-zh" and k["namespace"] == "mtl-zh"
        for resource in k["resources"]:
            assert (kustomization.parent / resource).is_file()
    claims = {v["persistentVolumeClaim"]["claimName"] for spec in _pod_specs(manifests)
              for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    assert all(("PersistentVolumeClaim", c) in manifests for c in claims)

    job = manifests[("Job", "mtl-train")]
    service = manifests[("Service", "mtl-train")]
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    command = trainer["args"][0]
    nodes = int(re.search(r"--nnodes=(\d+)", command).group(1))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    gpus = {e["name"]: e["value"] for e in trainer["env"]}["GPUS_PER_NODE"]
    assert int(gpus) == trainer["resources"]["limits"]["nvidia.com/gpu"]
    # the rendezvous endpoint is pod 0 under the headless Service the pods' subdomain names
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    port = service["spec"]["ports"][0]["port"]
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{service['metadata']['name']}:{port}" in command


def test_compose_file_follows_the_compose_specification():
    pytest.importorskip("check_jsonschema")
    import subprocess
    import sys

    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
               str(INFRA / "compose.yaml")]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifests_follow_the_kubernetes_schemas():
    validate = pytest.importorskip("kubernetes_validate")
    for resource in _manifests().values():
        validate.validate(resource, "1.32.0", strict=True)
