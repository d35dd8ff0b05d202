# syntax=docker/dockerfile:1
#
# The sidecar image: `docker build -t sidecar .` from the repository root. What it must give
# deploy/k8s/base/deployment.yaml (numeric user 10001, ports 8000 and 9901, SIDECAR_CONFIG,
# a read-only root filesystem) is checked by tests/deploy/test_dockerfile.py, with hadolint.

# One base for both stages, pinned to a patch release. The same one twice because the venv
# built in the first stage is copied into the second: its bin/python is a symlink to
# /usr/local/bin/python3.11 and its compiled extensions (uvloop, httptools, hiredis, orjson,
# cryptography) are only valid on that exact Python build and Debian release. A bump is a
# one-line change here; append @sha256:<digest> to make the base byte-for-byte reproducible.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# --- build: wheels from pyproject.toml, then a self-contained venv ----------------------
FROM ${PYTHON_IMAGE} AS build
# No pip cache in the layers, and no "a new pip is available" lookup (a network round trip).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build reads: pyproject.toml, its `readme` (README.md) and the
# package. .dockerignore keeps everything else (tests, bench, .venv, .git, caches) out of the
# build context, so an edit there does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# A wheel of the sidecar and of each dependency, as resolved from pyproject.toml (the build
# backend, setuptools, is fetched into an isolated build environment as [build-system] says).
# Every dependency publishes cp311 manylinux wheels for amd64 and arm64; a source-only release
# would fail here, since the slim image has no compiler, not later at run time.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .
# The runtime environment: a venv without pip (nothing at run time installs anything),
# filled from exactly those wheels (--no-index: no second resolution, nothing fetched).
# --no-compile, then compileall: the bytecode is written here, once, because the running
# container cannot write it (read-only root filesystem, PYTHONDONTWRITEBYTECODE), and
# unchecked-hash .pyc files stay valid whatever mtimes COPY or a reproducible build
# (SOURCE_DATE_EPOCH) gives the sources; the image is immutable, so they never go stale.
RUN python -m venv --without-pip /opt/sidecar \
    && pip --python /opt/sidecar/bin/python install --no-cache-dir --no-index --no-compile \
        --find-links /wheels /wheels/sidecar-*.whl \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/sidecar/lib

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# Source URL and commit are only known to the build (CI passes
# --build-arg SOURCE_URL=... --build-arg REVISION="$(git rev-parse HEAD)"); the version is
# sidecar.__version__ and the licence pyproject.toml's (the test checks both).
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="A reverse-proxy sidecar: idempotency, trace headers, quotas and circuit breaking in front of any HTTP app" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"

# The official image ships its standard library without .pyc files, so on a read-only root
# filesystem every process start (each of server.workers, each `kubectl exec ... sidecar
# quota`) would compile the ~200 stdlib modules the sidecar imports again, about half a
# second of CPU. Compiled once here instead (about 13 MB); the parts nothing imports are
# skipped.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/(site-packages|test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/' \
        /usr/local/lib/python3.11

# The user and group the pod's securityContext names (runAsUser/runAsGroup 10001), given
# numerically below so `runAsNonRoot: true` can verify it without reading /etc/passwd. The
# passwd entry still exists for libraries that look the user up. No home directory: nothing
# writes one (the root filesystem is read-only anyway). --no-log-init: a high UID would
# otherwise make useradd write a sparse, huge /var/log/faillog and lastlog into the layer.
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
        --shell /usr/sbin/nologin sidecar

# Owned by root and not writable by 10001: the code cannot be changed by the process even
# where the root filesystem is writable (docker run without --read-only).
COPY --from=build /opt/sidecar /opt/sidecar

# PATH: `sidecar` (and the venv's python, which server.workers > 1 re-executes) first.
# PYTHONDONTWRITEBYTECODE: no attempt to write __pycache__ on a read-only filesystem (all is
# precompiled above). PYTHONUNBUFFERED: the supervisor's and startup messages reach the log
# at once, not at exit. PYTHONFAULTHANDLER: a crash in a C extension dumps every thread's
# Python traceback to stderr instead of dying silently.
# SIDECAR_CONFIG: `sidecar run` reads its config from here (the ConfigMap is mounted as the
# directory /etc/sidecar). `docker run -e SIDECAR_CONFIG= ...` serves the embedded default.
# The only file the sidecar writes is with server.workers > 1: the Prometheus multiprocess
# directory, made with tempfile.mkdtemp, so in /tmp (TMPDIR) — the pod mounts an emptyDir
# there; with docker run --read-only, add --tmpfs /tmp.
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

USER 10001:10001

# proxy (server.listen) and admin: /live, /ready, /health, /metrics (server.admin_listen).
EXPOSE 8000 9901

# No HEALTHCHECK: Kubernetes ignores it (the Deployment's startup, liveness and readiness
# probes call /live and /ready on the admin port), and one here would start a Python process
# in the container every interval, counted against its memory limit. Under plain Docker, pass
# --health-cmd if wanted.
#
# Exec form, so `sidecar` is PID 1 and gets SIGTERM itself: it drains on it (server.drain,
# then server.shutdown_grace), reloads on SIGHUP, and with several workers its supervisor
# forwards signals and reaps the workers, so no init process is needed. The deployment's
# `args` replace CMD only.
ENTRYPOINT ["sidecar"]
CMD ["run"]
