"""docs/kubernetes.md works as written: every command in its ```sh blocks is one this test
runs or checks, and an unknown command fails it.

- Run: `kubectl create namespace` and `kubectl create secret generic` (client-side dry run,
  so the Secret's name and keys are those the Deployment reads); `sidecar check-config`
  on the ConfigMap's config; `curl` of the admin port and the `sidecar quota` command given
  to `kubectl exec`, against a real `sidecar run` with the ConfigMap's own config (only its
  addresses moved to loopback) in front of a loopback app, on a real redis-server that
  requires the password from the environment, as overlays/redis-local's does.
- Checked: `kubectl apply -k DIR` (DIR builds with `kubectl kustomize`; its output is
  validated by test_manifests.py), `kubectl rollout status` and `port-forward` (the
  Deployment and the port exist), `docker build` (the tag is the image the Deployment runs;
  the Dockerfile is checked by test_dockerfile.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from tests.deploy.test_manifests import (
    BUILDS,
    COMMAND_TIMEOUT,
    K8S,
    ROOT,
    SECRET_VALUES,
    built,
    configmap_config_text,
    container,
    kubectl,
    named_ports,
    pod_spec,
    secret_refs,
    sidecar_in,
)
from tests.redis_fixture import RedisServer, redis_executable
from tests.support import SidecarProcess, free_port, run_app

DOC = ROOT / "docs" / "kubernetes.md"
SH_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
NAMESPACE = r"(?:-n (?P<namespace>[a-z0-9-]+) )?"
ADMIN_URL = "http://127.0.0.1:9901"

# What each command of the walkthrough is, by its shape.
KINDS: dict[str, re.Pattern[str]] = {
    "docker-build": re.compile(r"docker build -t (?P<image>\S+) \.$"),
    "create-namespace": re.compile(r"kubectl create namespace (?P<name>[a-z0-9-]+)$"),
    "create-secret": re.compile(rf"kubectl {NAMESPACE}create secret generic (?P<name>\S+) .+$"),
    "check-config": re.compile(r"(?P<env>(?:[A-Z_]+=\S+ )*)sidecar check-config (?P<file>\S+)$"),
    "apply": re.compile(rf"kubectl {NAMESPACE}apply -k (?P<directory>\S+)$"),
    "rollout-status": re.compile(rf"kubectl {NAMESPACE}rollout status deployment/(?P<name>\S+)$"),
    "port-forward": re.compile(
        rf"kubectl {NAMESPACE}port-forward deployment/(?P<name>\S+) (?P<local>\d+):(?P<remote>\d+)$"
    ),
    "curl-admin": re.compile(rf"curl -s {re.escape(ADMIN_URL)}(?P<path>/\S*)$"),
    "exec-sidecar": re.compile(
        rf"kubectl {NAMESPACE}exec deployment/(?P<name>\S+) -c (?P<container>\S+)"
        r" -- (?P<command>sidecar .+)$"
    ),
}


def commands() -> list[str]:
    """The commands of every ```sh block (indented ones too), continuation lines joined."""
    found = []
    for match in SH_BLOCK.finditer(DOC.read_text()):
        indent = len(match.group(1))
        text = "\n".join(line[indent:] for line in match.group(2).splitlines())
        for command in text.replace("\\\n", " ").splitlines():
            command = " ".join(command.split())
            if command and not command.startswith("#"):
                found.append(command)
    return found


def kind_of(command: str) -> str | None:
    kinds = [kind for kind, pattern in KINDS.items() if pattern.fullmatch(command)]
    assert len(kinds) <= 1, f"{command!r} matches {kinds}"
    return kinds[0] if kinds else None


def of_kind(kind: str) -> list[re.Match[str]]:
    matches = [KINDS[kind].fullmatch(command) for command in commands()]
    return [match for match in matches if match is not None]


def test_every_command_is_one_the_tests_run_or_check() -> None:
    found = commands()
    assert len(found) >= 10, found
    unknown = [command for command in found if kind_of(command) is None]
    assert unknown == [], "commands in docs/kubernetes.md no test runs or checks"


def test_an_unknown_command_is_caught() -> None:
    assert kind_of("kubectl -n shop delete pod --all") is None
    assert kind_of("curl -s http://127.0.0.1:9901/health | jq") is None


def test_every_kind_of_command_is_in_the_walkthrough() -> None:
    """Each checker below has something to check (none passes on an empty list)."""
    assert {kind_of(command) for command in commands()} == set(KINDS)


def test_every_namespace_is_the_one_created() -> None:
    created = {match["name"] for match in of_kind("create-namespace")}
    used = {
        match["namespace"]
        for kind in KINDS
        for match in of_kind(kind)
        if "namespace" in match.groupdict() and match["namespace"]
    }
    assert len(created) == 1
    assert used == created


# --- Run ---------------------------------------------------------------------------------


def shell(command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


def dry_run(command: str) -> dict[str, Any]:
    """A `kubectl create` command with a client-side dry run: no cluster needed."""
    kubectl()  # on PATH, or a clear failure
    document: dict[str, Any] = yaml.safe_load(shell(f"{command} --dry-run=client -o yaml"))
    return document


def test_the_namespace_command_makes_a_namespace() -> None:
    for match in of_kind("create-namespace"):
        namespace = dry_run(match.group(0))
        assert (namespace["kind"], namespace["metadata"]["name"]) == ("Namespace", match["name"])


def test_the_secret_command_makes_the_secret_the_deployment_reads() -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH (the walkthrough's secret command uses it)")
    (match,) = of_kind("create-secret")
    secret = dry_run(match.group(0))
    assert secret["kind"] == "Secret"
    refs = secret_refs(sidecar_in("base"))
    assert {secret_name for secret_name, _, _ in refs.values()} == {secret["metadata"]["name"]}
    assert set(secret["data"]) == {key for _, key, _ in refs.values()} == set(SECRET_VALUES)
    values = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert len(values["JWT_SECRET"]) >= 32, "HS256 needs a 32-byte key"
    assert all(values.values())
    # Fresh random values each time, never a value written in the doc.
    assert dry_run(match.group(0))["data"] != secret["data"]


def test_the_check_config_command_passes_on_the_configmaps_config(tmp_path: Path) -> None:
    (match,) = of_kind("check-config")
    (tmp_path / match["file"]).write_text(configmap_config_text())
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VALUES}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    output = shell(match.group(0), cwd=tmp_path, env=env)
    assert "orders-create" in output


# --- Checked -----------------------------------------------------------------------------


def test_the_applied_directories_are_the_validated_builds() -> None:
    for match in of_kind("apply"):
        directory = (ROOT / match["directory"]).resolve()
        assert directory.is_relative_to(K8S), match.group(0)
        assert directory.relative_to(K8S).as_posix() in BUILDS, match.group(0)
        assert built(directory.relative_to(K8S).as_posix()), match.group(0)


def test_the_deployment_the_commands_name_exists() -> None:
    for kind in ("rollout-status", "port-forward", "exec-sidecar"):
        for match in of_kind(kind):
            assert pod_spec("base", match["name"]), match.group(0)
    for match in of_kind("exec-sidecar"):
        container(pod_spec("base", match["name"]), match["container"])


def test_the_port_forward_reaches_the_admin_port() -> None:
    (match,) = of_kind("port-forward")
    assert int(match["remote"]) == named_ports(sidecar_in("base"))["sidecar-admin"]
    assert f"127.0.0.1:{match['local']}" in ADMIN_URL


def test_the_image_built_is_the_image_the_deployment_runs() -> None:
    (match,) = of_kind("docker-build")
    assert match["image"] == sidecar_in("base")["image"]
    assert (ROOT / "Dockerfile").is_file()


# --- Run against a real sidecar ------------------------------------------------------------


def local_config(redis_port: int, app_url: str, port: int, admin_port: int) -> str:
    """The ConfigMap's config with only its addresses moved onto loopback."""
    config = yaml.safe_load(configmap_config_text())
    config["server"]["listen"] = f"127.0.0.1:{port}"
    config["server"]["admin_listen"] = f"127.0.0.1:{admin_port}"
    config["upstream"]["url"] = app_url
    redis_url = config["state"]["url"]
    assert "@redis:6379/" in redis_url, redis_url
    config["state"]["url"] = redis_url.replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
    return yaml.safe_dump(config, sort_keys=False)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SidecarProcess]:
    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value)  # the Secret, as the Deployment's env gives it
    redis = RedisServer(redis_executable(), ("--requirepass", SECRET_VALUES["REDIS_PASSWORD"]))
    redis.start()
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    process: SidecarProcess | None = None
    try:
        async with run_app(app) as app_url:
            config_path = tmp_path / "sidecar.yaml"
            port, admin_port = free_port(), free_port()
            config_path.write_text(local_config(redis.port, app_url, port, admin_port))
            process = SidecarProcess(str(config_path), port, admin_port)
            await process.start(ready_path="/ready")
            yield process
    finally:
        if process is not None:
            await process.stop()
        redis.cleanup()


async def run_command(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(COMMAND_TIMEOUT):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


def on(sidecar: SidecarProcess) -> Callable[[str], str]:
    return lambda text: text.replace(ADMIN_URL, sidecar.admin_url)


async def test_the_admin_commands_work_on_a_sidecar_running_the_configmaps_config(
    sidecar: SidecarProcess,
) -> None:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for match in of_kind("curl-admin"):
        code, output = await run_command(shlex.split(on(sidecar)(match.group(0))), env)
        assert code == 0, output
        health = orjson.loads(output)
        assert health["state"]["status"] == "up", health  # Redis, with the Secret's password
        assert health["upstream"]["status"] == "up", health
        assert health["status"] == "ready", health
    # `kubectl exec` runs the command in the sidecar container, whose env holds the token
    # and whose admin port is on its own loopback.
    env["SIDECAR_ADMIN_URL"] = sidecar.admin_url
    for match in of_kind("exec-sidecar"):
        argv = shlex.split(match["command"])
        code, output = await run_command(argv, env)
        assert code == 0, output
        if argv[1:3] == ["quota", "set"]:
            org, limit, value = argv[3:6]
            code, output = await run_command(["sidecar", "quota", "get", org], env)
            assert code == 0, output
            assert orjson.loads(output)["overrides"] == {limit: int(value)}
