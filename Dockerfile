# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# The sidecar runs as an unprivileged user on a read-only root filesystem (see deploy/k8s).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml
EXPOSE 8000 9901
ENTRYPOINT ["sidecar"]
CMD ["run"]
