"""The lean HTTP/1.1 client the forwarder sends requests to the app with (llhttp parsing,
exact request bytes, no retries of its own). See docs/architecture.md for why."""

from sidecar.http1.connection import AppConnection, AppResponse
from sidecar.http1.pool import AppPool

__all__ = ["AppConnection", "AppPool", "AppResponse"]
