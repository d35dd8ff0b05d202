"""deploy/k8s builds and validates with the real tools, and says what the sidecar needs.

- `kubectl kustomize` builds the base, each overlay and the monitoring directory; every
  object of the output validates with `kubernetes-validate --strict` against the
  Kubernetes version it is for (the CRDs, PodMonitor and PrometheusRule, against the
  prometheus-operator's published schemas in tests/deploy/schemas/).
- Every pod meets Pod Security "restricted" (plus a read-only root filesystem), with
  resource requests and a memory limit.
- The sidecar: a native sidecar in the base, an ordinary container in plain-container; its
  ports are those of the ConfigMap's config (listen, admin_listen); the probes (startup on
  /ready without the app check, readiness on /ready, liveness on /live) on the named admin
  port; the Service, the NetworkPolicy, the PodDisruptionBudget, the scrape annotations and
  the PodMonitor all point at what exists.
- terminationGracePeriodSeconds covers the pod's stop as computed from the ConfigMap's own
  config (drain, shutdown_grace, span export), loaded by the project's loader; the config
  passes `sidecar check-config` with the Secret's variables set; every ${VAR} of it comes
  from the container's env.
- The app listens on loopback only, where the config's upstream.url points.
- redis-local: appendonly yes, noeviction, the Service the config's state.url names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from sidecar.admin import READY_EXCLUDABLE
from sidecar.config import load_config
from sidecar.config.model import SidecarConfig
from tests.deploy.test_dockerfile import security_setting

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "tests" / "deploy" / "schemas"
# Each kustomization and the Kubernetes version its output is validated for: the base
# needs native sidecars (1.29) and the preStop sleep action (1.30); plain-container is
# for clusters without native sidecars.
BUILDS = {
    "base": "1.30.0",
    "overlays/redis-local": "1.30.0",
    "overlays/plain-container": "1.28.0",
    "monitoring": "1.30.0",
}
CRD_SCHEMAS = {"PodMonitor": "podmonitor.json", "PrometheusRule": "prometheusrule.json"}
SIDECAR = "sidecar"
APP = "app"
# The variables the Secret orders-sidecar holds, with values that pass the config's checks.
SECRET_VALUES = {
    "REDIS_PASSWORD": "redis-password",
    "JWT_SECRET": "0123456789abcdef0123456789abcdef",
    "SIDECAR_ADMIN_TOKEN": "admin-token",
    "SIDECAR_LOG_HASH_KEY": "log-hash-key",
}
# Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
COMMAND_TIMEOUT = 120


def kubectl() -> str:
    executable = shutil.which("kubectl")
    if executable is None:
        pytest.fail("kubectl is not on PATH (Debian package kubectl; scripts/test installs it)")
    return executable


def run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


@cache
def built_text(directory: str) -> str:
    result = run(kubectl(), "kustomize", str(K8S / directory))
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return result.stdout


def built(directory: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(built_text(directory)) if d]


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(directory: str, name: str = "orders") -> dict[str, Any]:
    spec: dict[str, Any] = only(built(directory), "Deployment", name)["spec"]["template"]["spec"]
    return spec


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers") or []
    yield from pod.get("containers") or []


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(pod) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r}"
    return matches[0]


def kubernetes_validate(
    text: str, version: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "objects.yaml"
    path.write_text(text)
    executable = Path(sys.executable).with_name("kubernetes-validate")
    return run(str(executable), "--strict", "--quiet", "-k", version, str(path))


@cache
def configmap_config_text() -> str:
    configmap = only(built("base"), "ConfigMap", "orders-sidecar")
    text: str = configmap["data"][config_file_name()]
    return text


def config_file_name() -> str:
    env = {e["name"]: e.get("value") for e in sidecar_in("base").get("env") or []}
    return os.path.basename(env["SIDECAR_CONFIG"])


def sidecar_in(directory: str) -> dict[str, Any]:
    return container(pod_spec(directory), SIDECAR)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> SidecarConfig:
    path = tmp_path_factory.mktemp("configmap") / config_file_name()
    path.write_text(configmap_config_text())
    return load_config(path, env=SECRET_VALUES)


# --- Built and validated ------------------------------------------------------------------


@pytest.mark.parametrize("directory", sorted(BUILDS))
def test_the_build_validates_against_the_kubernetes_schemas(directory: str, tmp_path: Path) -> None:
    documents = built(directory)
    assert documents, f"{directory} builds to nothing"
    core = [d for d in documents if d["kind"] not in CRD_SCHEMAS]
    result = kubernetes_validate(yaml.safe_dump_all(core), BUILDS[directory], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for document in documents:
        if document["kind"] in CRD_SCHEMAS:
            errors = crd_errors(document)
            assert errors == [], f"{document['kind']} {document['metadata']['name']}"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused where it lists the known ones, as the API
    server prunes (or, with kubectl's strict field validation, refuses) them: the published
    CRD schemas say nothing of unlisted properties, so a misspelt optional field passes."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in tightened
        and "additionalProperties" not in tightened
        and not tightened.get("x-kubernetes-preserve-unknown-fields")
    ):
        tightened["additionalProperties"] = False
    return tightened


def crd_errors(document: dict[str, Any]) -> list[str]:
    schema = strict(yaml.safe_load((SCHEMAS / CRD_SCHEMAS[document["kind"]]).read_text()))
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_a_misspelt_crd_field_is_caught() -> None:
    monitor = only(built("monitoring"), "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["prot"] = endpoint.pop("port")
    assert crd_errors(monitor), "a misspelt optional field passed the CRD schema"
    rule = only(built("monitoring"), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["recrod"] = "x"
    assert crd_errors(rule)


def test_the_schema_validation_can_fail(tmp_path: Path) -> None:
    deployment = only(built("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolcy"] = "Always"
    result = kubernetes_validate(yaml.safe_dump(deployment), BUILDS["base"], tmp_path)
    assert result.returncode != 0, "a misspelt field passed strict validation"


def test_every_manifest_file_is_part_of_a_build() -> None:
    used: set[Path] = set()
    for directory in BUILDS:
        kustomization = yaml.safe_load((K8S / directory / "kustomization.yaml").read_text())
        used |= {(K8S / directory / r).resolve() for r in kustomization.get("resources", [])}
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - used == set(), "manifests no kustomization includes"


# --- Pod Security "restricted" --------------------------------------------------------------


@pytest.mark.parametrize("directory", ["base", "overlays/redis-local", "overlays/plain-container"])
def test_every_pod_meets_pod_security_restricted(directory: str) -> None:
    for deployment in (d for d in built(directory) if d["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), f"{name}: {field}"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: API token mounted"
        for volume in pod.get("volumes") or []:
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']} is {kinds}"
        for box in all_containers(pod):
            where = f"{name}/{box['name']}"
            assert security_setting(pod, box, "runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert security_setting(pod, box, "runAsUser") not in (None, 0), f"{where}: runAsUser"
            seccomp = security_setting(pod, box, "seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp {seccomp}"
            context = box.get("securityContext") or {}
            assert context.get("allowPrivilegeEscalation") is False, where
            assert not context.get("privileged"), where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert not box.get("ports") or all("hostPort" not in p for p in box["ports"]), where


@pytest.mark.parametrize("directory", ["base", "overlays/redis-local"])
def test_every_container_has_requests_and_a_memory_limit(directory: str) -> None:
    for deployment in (d for d in built(directory) if d["kind"] == "Deployment"):
        for box in all_containers(deployment["spec"]["template"]["spec"]):
            if box["name"] == APP:
                continue  # the example app's figures are the app's own business
            resources = box.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests") or {}), box["name"]
            assert "memory" in (resources.get("limits") or {}), box["name"]


def test_the_sidecar_resources_fit_the_benchmark() -> None:
    """The limits leave room over what bench/ measured (docs/kubernetes.md#sizing)."""
    resources = sidecar_in("base")["resources"]
    assert memory_mib(resources["requests"]["memory"]) >= 80  # peak RSS 58-64 MiB on Redis
    assert memory_mib(resources["limits"]["memory"]) >= 2 * memory_mib(
        resources["requests"]["memory"]
    )
    # One worker process uses one core at most: a CPU limit below it throttles the loop.
    assert cpu_cores(resources["limits"]["cpu"]) >= 1


def memory_mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# --- The sidecar in the pod -------------------------------------------------------------------


def test_the_base_runs_a_native_sidecar_and_plain_container_an_ordinary_one() -> None:
    base = pod_spec("base")
    assert [c["name"] for c in base["initContainers"]] == [SIDECAR]
    assert base["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in base["containers"]] == [APP]
    plain = pod_spec("overlays/plain-container")
    assert not plain.get("initContainers")
    assert sorted(c["name"] for c in plain["containers"]) == [APP, SIDECAR]
    assert "restartPolicy" not in container(plain, SIDECAR)
    # Apart from where it sits, it is the same container.
    moved = dict(base["initContainers"][0])
    del moved["restartPolicy"]
    assert container(plain, SIDECAR) == moved


def named_ports(box: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in box.get("ports") or []}


@pytest.mark.parametrize("directory", ["base", "overlays/plain-container"])
def test_the_sidecar_ports_are_the_configs(directory: str, config: SidecarConfig) -> None:
    ports = named_ports(sidecar_in(directory))
    assert ports == {
        "proxy": config.server.listen.port,
        "sidecar-admin": config.server.admin_listen.port,
    }


@pytest.mark.parametrize("directory", ["base", "overlays/plain-container"])
def test_the_probes_use_the_admin_port(directory: str) -> None:
    sidecar = sidecar_in(directory)
    probes = {
        kind: sidecar[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")
    }
    for kind, probe in probes.items():
        assert probe["port"] == "sidecar-admin", kind
    assert probes["readiness"]["path"] == "/ready"
    assert probes["liveness"]["path"] == "/live"
    # The kubelet starts the app only once a native sidecar's startup probe passes: a probe
    # that waited for the app would never pass.
    startup = urlsplit(probes["startup"]["path"])
    assert startup.path == "/ready"
    assert parse_qs(startup.query) == {"exclude": ["upstream"]}
    assert set(parse_qs(startup.query)["exclude"]) <= READY_EXCLUDABLE
    # Liveness must not restart a sidecar that is merely waiting: it starts after startup.
    assert (
        sidecar["livenessProbe"]["failureThreshold"] * sidecar["livenessProbe"]["periodSeconds"]
        >= 10
    )


def test_the_app_listens_on_loopback_where_the_config_points(config: SidecarConfig) -> None:
    for directory in ("base", "overlays/plain-container"):
        app = container(pod_spec(directory), APP)
        assert not app.get("ports"), "the app exposes a port besides the sidecar"
        args = app["args"]
        bind = args[args.index("--bind") + 1]
        assert bind == f"127.0.0.1:{config.upstream.port}"
    assert config.upstream.host == "127.0.0.1"


def test_the_config_is_a_directory_mount_of_the_configmap() -> None:
    pod = pod_spec("base")
    sidecar = container(pod, SIDECAR)
    config_dir = os.path.dirname(
        next(e["value"] for e in sidecar["env"] if e["name"] == "SIDECAR_CONFIG")
    )
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == config_dir)
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "orders-sidecar"


def secret_refs(box: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    return {
        e["name"]: (
            e["valueFrom"]["secretKeyRef"]["name"],
            e["valueFrom"]["secretKeyRef"]["key"],
            bool(e["valueFrom"]["secretKeyRef"].get("optional")),
        )
        for e in box.get("env") or []
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }


def test_the_secrets_come_from_one_secret_through_env_vars() -> None:
    refs = secret_refs(sidecar_in("base"))
    assert {name for name, (secret, _, _) in refs.items() if secret == "orders-sidecar"} == set(
        SECRET_VALUES
    )
    assert all(key == name for name, (_, key, _) in refs.items())
    assert [name for name, (_, _, optional) in refs.items() if optional] == ["SIDECAR_LOG_HASH_KEY"]
    # No Secret is shipped: each operator makes their own (docs/kubernetes.md).
    for directory in BUILDS:
        assert all(d["kind"] != "Secret" for d in built(directory)), directory


def test_every_variable_of_the_config_comes_from_the_containers_env() -> None:
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", configmap_config_text()))
    provided = {e["name"] for e in sidecar_in("base")["env"]}
    assert referenced, "the config names no ${VAR} (the secrets are in it?)"
    assert referenced <= provided, f"not in the sidecar's env: {referenced - provided}"


def test_the_configmap_config_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / config_file_name()
    path.write_text(configmap_config_text())
    executable = Path(sys.executable).with_name("sidecar")
    env = {**os.environ, **SECRET_VALUES}
    result = subprocess.run(
        [str(executable), "check-config", str(path)],
        env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "orders-create" in result.stdout
    # Without the Secret's variables the same config is refused, naming one.
    del env["JWT_SECRET"]
    refused = subprocess.run(
        [str(executable), "check-config", str(path)],
        env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "JWT_SECRET" in refused.stdout + refused.stderr


# --- Stopping ---------------------------------------------------------------------------------


def pre_stop_seconds(box: dict[str, Any]) -> int:
    pre_stop = (box.get("lifecycle") or {}).get("preStop")
    if pre_stop is None:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def app_stop_seconds(app: dict[str, Any]) -> int:
    """The example app's own graceful stop (gunicorn's --graceful-timeout)."""
    args = app["args"]
    return int(args[args.index("--graceful-timeout") + 1])


def sidecar_stop_seconds(config: SidecarConfig) -> float:
    """After SIGTERM, at most: drain, shutdown_grace, 1 s, and the span export's timeout
    when export is on (configuration.md, server.shutdown_grace)."""
    export = config.tracing.export
    extra = export.timeout if export.endpoint is not None else 0.0
    return config.server.drain + config.server.shutdown_grace + 1 + extra


def test_the_grace_period_covers_a_native_sidecar_pods_stop(config: SidecarConfig) -> None:
    """Native: the app stops first (its preStop, then its own stop), the sidecar after it."""
    pod = pod_spec("base")
    app, sidecar = container(pod, APP), container(pod, SIDECAR)
    needed = (
        pre_stop_seconds(app)
        + app_stop_seconds(app)
        + pre_stop_seconds(sidecar)
        + sidecar_stop_seconds(config)
    )
    assert pod["terminationGracePeriodSeconds"] >= needed
    # The app keeps serving while its endpoint is removed from every load balancer.
    assert pre_stop_seconds(app) >= 5


def test_the_grace_period_covers_a_plain_container_pods_stop(config: SidecarConfig) -> None:
    """Plain: both stop at once; the sidecar's drain keeps it serving, and the app must
    still accept what it forwards until the sidecar's listener has closed."""
    pod = pod_spec("overlays/plain-container")
    app, sidecar = container(pod, APP), container(pod, SIDECAR)
    sidecar_needs = pre_stop_seconds(sidecar) + sidecar_stop_seconds(config)
    app_needs = pre_stop_seconds(app) + app_stop_seconds(app)
    assert pod["terminationGracePeriodSeconds"] >= max(sidecar_needs, app_needs)
    assert pre_stop_seconds(app) >= pre_stop_seconds(sidecar) + config.server.drain + 1
    assert config.server.drain >= 5, "drain is the sidecar's wait for endpoint removal"


def test_a_shorter_grace_period_is_caught(config: SidecarConfig) -> None:
    """The sum above is not vacuous: the config's own numbers exceed the default 30 s."""
    pod = pod_spec("base")
    app = container(pod, APP)
    assert pre_stop_seconds(app) + app_stop_seconds(app) + sidecar_stop_seconds(config) > 30


# --- What points at the sidecar ------------------------------------------------------------


def test_the_service_targets_the_proxy_port(config: SidecarConfig) -> None:
    documents = built("base")
    service = only(documents, "Service", "orders")
    pod_labels = only(documents, "Deployment", "orders")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # By number: before Kubernetes 1.32 a Service does not resolve a port name declared on
    # an init container (kubernetes/kubernetes#127958), so a named targetPort pointing at a
    # native sidecar gets no endpoints.
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [config.server.listen.port]


def test_the_quotas_fallback_share_is_the_deployments_replicas(config: SidecarConfig) -> None:
    """With Redis down each pod allows limit / quotas.replicas: the count must be the pods'."""
    replicas = only(built("base"), "Deployment", "orders")["spec"]["replicas"]
    shares = {r.name: r.quotas.replicas for r in config.routes if r.quotas is not None}
    assert shares, "no route has quotas"
    assert set(shares.values()) == {replicas}, shares


def test_the_pod_disruption_budget_covers_the_pods() -> None:
    documents = built("base")
    budget = only(documents, "PodDisruptionBudget", "orders")
    deployment = only(documents, "Deployment", "orders")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_the_network_policy_admits_the_proxy_port_and_monitoring_to_the_admin_port(
    config: SidecarConfig,
) -> None:
    documents = built("base")
    policy = only(documents, "NetworkPolicy", "orders")["spec"]
    labels = only(documents, "Deployment", "orders")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    rules = {
        tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policy["ingress"]
    }
    # By number: some CNIs do not map names declared on init containers
    # (projectcalico/calico#8881), and would drop the traffic.
    proxy, admin = (config.server.listen.port,), (config.server.admin_listen.port,)
    assert set(rules) == {proxy, admin}, "only the sidecar's two ports"
    assert rules[proxy] is None, "the proxy port from anywhere"
    assert rules[admin] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_prometheus_finds_the_admin_port(config: SidecarConfig) -> None:
    annotations = only(built("base"), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.server.admin_listen.port
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = only(built("monitoring"), "PodMonitor")
    labels = only(built("base"), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("sidecar-admin", "/metrics")]


# --- redis-local ---------------------------------------------------------------------------------


def test_redis_local_keeps_what_it_is_given(config: SidecarConfig) -> None:
    documents = built("overlays/redis-local")
    redis = container(pod_spec("overlays/redis-local", "redis"), "redis")
    args = redis["args"]
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert option["--appendonly"] == "yes"
    assert option["--maxmemory-policy"] == "noeviction"
    assert option["--requirepass"] == "$(REDIS_PASSWORD)"
    assert secret_refs(redis)["REDIS_PASSWORD"] == ("orders-sidecar", "REDIS_PASSWORD", False)
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", redis["image"]), "pin Redis by version"
    # Ready on PONG (not while it loads its AOF), the password from the env, not argv.
    assert "redis-cli ping" in " ".join(redis["readinessProbe"]["exec"]["command"])
    assert secret_refs(redis)["REDISCLI_AUTH"] == ("orders-sidecar", "REDIS_PASSWORD", False)
    state = urlsplit(config.state.url)
    service = only(documents, "Service", state.hostname)
    assert [p["port"] for p in service["spec"]["ports"]] == [state.port]
    # Only the orders pods reach it.
    policy = only(documents, "NetworkPolicy", "redis")["spec"]
    assert policy["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "orders"}}}
    ]
