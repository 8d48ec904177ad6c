"""The Kubernetes manifests of deploy/kubernetes, read against the code they deploy.

No cluster runs here. Every manifest is validated offline against the Kubernetes JSON schemas
(kubernetes-validate, strict: an unknown field fails), KEDA's resources field by field against
KEDA's documented API, and every number that must agree with the worker (probe paths, the
metrics port, setting names, the grace period, the image's user) against the settings, the
operations server and the Dockerfile. The kustomization is rendered here (its resources, its
namespace, its images); where kubectl is installed, ``kubectl kustomize`` renders it too and the
two must agree.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.ops_server import OpsServer
from app.settings import SECRET_SETTINGS, Settings, load_settings
from tests.unit.test_container_files import NOT_SETTINGS, dockerfile, env_of, final_stage

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
DEVELOPMENT = ROOT / "deploy" / "kubernetes-development"
KUBERNETES_VERSION = "1.31"
"""The Kubernetes release the manifests target and are validated against."""
KEDA_API = "keda.sh/v1alpha1"
"""KEDA 2.16's API group and version of ScaledObject and TriggerAuthentication."""
KEDA_SCALED_OBJECT_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
"""The fields of a ScaledObject's spec in KEDA 2.16
(keda.sh/docs/2.16/reference/scaledobject-spec)."""
KEDA_RABBITMQ_METADATA = {
    "host",
    "hostFromEnv",
    "protocol",
    "mode",
    "value",
    "activationValue",
    "queueName",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "pageSize",
    "operation",
    "timeout",
    "unsafeSsl",
}
"""The rabbitmq trigger's metadata parameters in KEDA 2.16
(keda.sh/docs/2.16/scalers/rabbitmq-queue)."""
SETTINGS = dict(Settings.model_fields)
SECONDS_PER_STEP_512 = 0.1
"""Assumed, not measured (no GPU was lent): 10 it/s for SD 1.5 fp16 at 512x512 on an
A10G/L4-class card. docs/kubernetes.md states the same figure."""
STEP_COST_AT_1024 = 5
"""A 1024x1024 step against a 512x512 one: 4 times the latent, plus attention's quadratic part."""
S3_BACKOFF_CAP_SECONDS = 20
"""boto3's standard retry mode waits at most 20 s before a retry."""
NAMESPACED = {"ConfigMap", "Deployment", "PodDisruptionBudget", "NetworkPolicy", "Secret"}


# --- rendering --------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    (document,) = load_documents(directory / "kustomization.yaml")
    return document


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` applies, for the features the base uses: its resources (files),
    its namespace on every namespaced object, its image names and tags."""
    spec = kustomization(directory)
    assert set(spec) <= {"apiVersion", "kind", "namespace", "resources", "images"}, set(spec)
    documents = []
    for resource in spec["resources"]:
        path = directory / resource
        assert path.is_file(), f"{resource} is listed but not a file of {directory}"
        documents += load_documents(path)
    images = {image["name"]: image for image in spec.get("images", [])}
    for document in documents:
        if document["kind"] != "Namespace" and "namespace" in spec:
            document["metadata"]["namespace"] = spec["namespace"]
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                image = images[container["image"]]
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return documents


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [document for document in documents if document["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one(documents, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (found,) = pod["containers"]
    return found


@pytest.fixture(scope="module")
def config(documents: list[dict[str, Any]]) -> dict[str, str]:
    return one(documents, "ConfigMap")["data"]


@pytest.fixture(scope="module")
def secret_example() -> dict[str, Any]:
    (document,) = load_documents(BASE / "secret.example.yaml")
    return document


@pytest.fixture(scope="module")
def configured(config: dict[str, str]) -> Settings:
    """The settings the worker reads from the ConfigMap (defaults for the rest)."""
    return load_settings(**{name.lower(): value for name, value in config.items()})


def image_env() -> dict[str, str]:
    return env_of(final_stage(dockerfile()))


# --- the kustomization --------------------------------------------------------------------------


def test_the_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    listed = set(kustomization(BASE)["resources"])
    files = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    assert "secretGenerator" not in kustomization(BASE)


def test_rendering_sets_the_namespace_and_the_image(documents: list[dict[str, Any]]) -> None:
    spec = kustomization(BASE)
    namespace = one(documents, "Namespace")["metadata"]["name"]
    assert namespace == spec["namespace"]
    for document in documents:
        if document["kind"] in NAMESPACED:
            assert document["metadata"]["namespace"] == namespace, document["kind"]
    (image,) = spec["images"]
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_renders_what_this_test_renders(documents: list[dict[str, Any]]) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    by_kubectl = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered)}
    by_test = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert by_kubectl == by_test


# --- Kubernetes' schemas ------------------------------------------------------------------------


def core_documents() -> list[dict[str, Any]]:
    return [d for d in render(BASE) if not d["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("document", core_documents(), ids=lambda d: d["kind"])
def test_every_manifest_follows_the_kubernetes_schema(document: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == "1.31"


def test_the_schema_check_can_fail(deployment: dict[str, Any]) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 600
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_secret_example_follows_the_kubernetes_schema(secret_example: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(secret_example, KUBERNETES_VERSION, strict=True)


# --- KEDA ---------------------------------------------------------------------------------------


def test_the_scaled_object_follows_kedas_api(
    documents: list[dict[str, Any]], deployment: dict[str, Any], configured: Settings
) -> None:
    scaled = one(documents, "ScaledObject")
    assert scaled["apiVersion"] == KEDA_API
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SCALED_OBJECT_FIELDS, set(spec) - KEDA_SCALED_OBJECT_FIELDS
    assert spec["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    for field in ("pollingInterval", "cooldownPeriod", "maxReplicaCount"):
        assert isinstance(spec[field], int) and spec[field] > 0, field
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert 0 < spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_RABBITMQ_METADATA, set(metadata) - KEDA_RABBITMQ_METADATA
    assert "host" not in metadata, "the broker's URL holds a password: TriggerAuthentication"
    assert metadata["mode"] in {"QueueLength", "MessageRate"}
    assert metadata["protocol"] in {"amqp", "http", "auto"}
    for field in ("value", "activationValue"):
        assert isinstance(metadata[field], str) and float(metadata[field]) >= 0, field
    assert float(metadata["value"]) > 0
    assert metadata["queueName"] == configured.rabbitmq_queue == SETTINGS["rabbitmq_queue"].default
    (authentication,) = [d for d in documents if d["kind"] == "TriggerAuthentication"]
    assert authentication["apiVersion"] == KEDA_API
    assert trigger["authenticationRef"] == {"name": authentication["metadata"]["name"]}


def test_kedas_broker_url_is_a_key_of_the_secret(
    documents: list[dict[str, Any]], secret_example: dict[str, Any]
) -> None:
    (reference,) = one(documents, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert reference["parameter"] == "host"
    assert reference["name"] == secret_example["metadata"]["name"]
    url = secret_example["stringData"][reference["key"]]
    protocol = one(documents, "ScaledObject")["spec"]["triggers"][0]["metadata"]["protocol"]
    schemes = {"http": ("http://", "https://"), "amqp": ("amqp://", "amqps://")}[protocol]
    assert url.startswith(schemes), f"{url} does not suit protocol {protocol}"
    assert re.search(r"://[^/]+/[^/]+$", url), "KEDA needs the vhost at the end of the URL"


def test_kedas_numbers_follow_the_prefetch_and_the_batch(
    documents: list[dict[str, Any]], configured: Settings
) -> None:
    spec = one(documents, "ScaledObject")["spec"]
    metadata = spec["triggers"][0]["metadata"]
    prefetch = configured.max_concurrent_generations
    assert prefetch == configured.max_batch_size + configured.pipeline_lookahead
    assert metadata["mode"] == "QueueLength"
    # Over AMQP the length leaves out the jobs the workers hold; jobs per replica only makes
    # sense when it counts them (docs/kubernetes.md, "Scale").
    assert metadata["protocol"] == "http" and metadata.get("excludeUnacknowledged") != "true"
    assert int(metadata["value"]) == 2 * prefetch
    assert metadata["activationValue"] == "0", "the first job wakes a worker"
    assert spec["cooldownPeriod"] > spec["pollingInterval"]


def test_the_docs_state_the_numbers_the_manifests_use(
    documents: list[dict[str, Any]], pod: dict[str, Any]
) -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    spec = one(documents, "ScaledObject")["spec"]
    metadata = spec["triggers"][0]["metadata"]
    stated = {
        f"value: \"{metadata['value']}\"",
        f"minReplicaCount: {spec['minReplicaCount']}",
        f"maxReplicaCount: {spec['maxReplicaCount']}",
        f"cooldownPeriod: {spec['cooldownPeriod']}",
        f"pollingInterval: {spec['pollingInterval']}",
        f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}",
        f"{round(1 / SECONDS_PER_STEP_512)} it/s",
    }
    missing = [phrase for phrase in stated if f"`{phrase}`" not in text and phrase not in text]
    assert not missing, missing
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}" in operations


# --- the manifests against the code -------------------------------------------------------------


def test_the_probes_ask_the_paths_the_ops_server_serves(container: dict[str, Any]) -> None:
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    with OpsServer(registry=CollectorRegistry(), host="127.0.0.1", port=0) as server:
        for path in {*paths.values(), "/metrics"}:
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                assert response.status == 200, path
        with pytest.raises(urllib.error.HTTPError, match="404"):
            with urllib.request.urlopen(server.url + "/livez", timeout=5):
                pass


def test_one_port_for_the_probes_the_scrape_and_the_network_policy(
    documents: list[dict[str, Any]], container: dict[str, Any], configured: Settings
) -> None:
    (port,) = container["ports"]
    number = port["containerPort"]
    assert number == configured.metrics_port == SETTINGS["metrics_port"].default
    assert str(number) == image_env()["METRICS_PORT"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == number, probe
    annotations = one(documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(number)
    assert annotations["prometheus.io/path"] == "/metrics"
    (ingress,) = one(documents, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": number}]


def test_every_variable_is_a_setting_or_one_the_image_documents(
    config: dict[str, str], container: dict[str, Any]
) -> None:
    names = [*config, *(entry["name"] for entry in container["env"])]
    for name in names:
        assert name.lower() in SETTINGS or name in NOT_SETTINGS, f"{name} is not a setting"
    assert not set(config) & SECRET_SETTINGS, "a secret setting in the ConfigMap"
    assert set(config) & set(image_env()) <= {"METRICS_PORT"}, "the image sets these already"
    assert container["envFrom"] == [{"configMapRef": {"name": "stylelicense-worker"}}]


def test_secrets_come_from_the_secret_and_nothing_else_holds_one(
    documents: list[dict[str, Any]], container: dict[str, Any], secret_example: dict[str, Any]
) -> None:
    assert not [d for d in documents if d["kind"] == "Secret"], "a Secret would be applied"
    from_secret = {}
    for entry in container["env"]:
        if "valueFrom" in entry:
            reference = entry["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret_example["metadata"]["name"]
            from_secret[entry["name"]] = reference
        else:
            assert entry["name"] not in SECRET_SETTINGS, f"{entry['name']} is written in plain"
    assert set(from_secret) == SECRET_SETTINGS
    for required in ("RABBITMQ_PASS", "INTERNAL_API_TOKEN"):
        assert not from_secret[required].get("optional", False), required
    keys = set(secret_example["stringData"])
    used = {reference["key"] for reference in from_secret.values()}
    (keda,) = one(documents, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert keys == used | {keda["key"]}, "a key of the Secret that nothing reads, or one missing"
    for value in secret_example["stringData"].values():
        assert "change-me" in value, "the example holds placeholders only"


def test_the_configured_settings_load(configured: Settings, config: dict[str, str]) -> None:
    assert configured.rabbitmq_port == int(config["RABBITMQ_PORT"])
    assert configured.max_concurrent_generations == int(config["MAX_CONCURRENT_GENERATIONS"])


def test_the_grace_period_outlasts_the_longest_batch_and_its_webhooks(
    pod: dict[str, Any], configured: Settings
) -> None:
    size_cost = STEP_COST_AT_1024 * (configured.max_image_size / 1024) ** 2
    batch = configured.max_batch_size * configured.max_steps * SECONDS_PER_STEP_512 * size_cost
    uploads = (configured.s3_max_attempts - 1) * S3_BACKOFF_CAP_SECONDS
    longest = batch + configured.webhook_retry_budget_seconds + uploads
    assert math.isclose(longest, 390)  # the sum in deployment.yaml's comment
    assert pod["terminationGracePeriodSeconds"] >= longest


def test_the_startup_probe_waits_as_long_as_the_worker(
    container: dict[str, Any], configured: Settings
) -> None:
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= configured.health_startup_grace_seconds
    assert container["readinessProbe"]["timeoutSeconds"] > configured.readiness_timeout_seconds
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"], probe


def test_the_pod_is_locked_down_and_runs_as_the_images_user(
    deployment: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    user = [i.args for i in final_stage(dockerfile()) if i.keyword == "USER"][-1]
    uid, _, gid = user.partition(":")
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid or uid))
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"


def gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) / (1024 if unit == "Mi" else 1)


def test_every_folder_the_worker_writes_is_a_volume_that_fits(
    pod: dict[str, Any], container: dict[str, Any], configured: Settings
) -> None:
    env = image_env()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    for folder in (env["HF_HOME"], env["LORA_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"], "/tmp"):
        (volume,) = [
            volume
            for path, volume in mounts.items()
            if PurePosixPath(folder).is_relative_to(path) and "emptyDir" in volume
        ]
        if folder == env["LORA_CACHE_DIR"]:
            assert configured.lora_cache_max_bytes < gibibytes(volume["emptyDir"]["sizeLimit"]) * (
                1024**3
            ), "the LoRA cache would outgrow its volume, and the kubelet evict the pod"
    scratch = [v["emptyDir"]["sizeLimit"] for v in volumes.values() if "emptyDir" in v]
    requested = gibibytes(container["resources"]["requests"]["ephemeral-storage"])
    assert sum(gibibytes(limit) for limit in scratch) <= requested


def test_the_c2pa_files_come_from_an_optional_secret_volume(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].endswith("/c2pa")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["optional"] is True
    files = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert {env["C2PA_SIGNING_KEY_FILE"], env["C2PA_CERTIFICATE_FILE"]} == files


def test_the_development_overlay_leaves_the_c2pa_files_out() -> None:
    spec = kustomization(DEVELOPMENT)
    assert spec["resources"] == ["../kubernetes"]
    (patch,) = spec["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "stylelicense-worker"}
    (worker,) = yaml.safe_load(patch["patch"])["spec"]["template"]["spec"]["containers"]
    assert worker == {
        "name": "worker",
        "env": [
            {"name": "C2PA_SIGNING_KEY_FILE", "$patch": "delete"},
            {"name": "C2PA_CERTIFICATE_FILE", "$patch": "delete"},
        ],
    }
    if shutil.which("kubectl") is not None:
        rendered = subprocess.run(
            ["kubectl", "kustomize", str(DEVELOPMENT)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        deployment = one(list(yaml.safe_load_all(rendered)), "Deployment")
        names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "RABBITMQ_PASS" in names and not {n for n in names if n.startswith("C2PA_")}


def test_the_network_policy_opens_only_what_the_worker_uses(
    documents: list[dict[str, Any]], configured: Settings
) -> None:
    policy = one(documents, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    (source,) = ingress["from"]
    assert set(source) == {"namespaceSelector", "podSelector"}, "Prometheus' pods, nothing else"
    ports = {
        (port["protocol"], port["port"]): rule["to"]
        for rule in policy["egress"]
        for port in rule["ports"]
    }
    assert {("UDP", 53), ("TCP", 53), ("TCP", configured.rabbitmq_port), ("TCP", 443)} <= set(ports)
    assert set(ports) <= {("UDP", 53), ("TCP", 53), ("TCP", 5672), ("TCP", 8000)} | {
        ("TCP", 9000),
        ("TCP", 443),
    }
    for (_, number), targets in ports.items():
        blocks = [target["ipBlock"] for target in targets if "ipBlock" in target]
        if number != 443:
            assert not blocks, f"port {number} is in the cluster: chosen by labels"
        for block in blocks:
            assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block["except"])


def test_one_set_of_labels_selects_the_pods_everywhere(documents: list[dict[str, Any]]) -> None:
    deployment = one(documents, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(documents, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= labels.items(), selector
    assert one(documents, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
