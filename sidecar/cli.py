"""Command line: `sidecar run | check-config | demo | quota | --version`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import (
    ConfigError,
    SidecarConfig,
    describe_config,
    embedded_config,
    load_config,
)

CONFIG_ENV = "SIDECAR_CONFIG"
WORKER_ENV = "SIDECAR_WORKER"
ADMIN_URL_ENV = "SIDECAR_ADMIN_URL"
ADMIN_TOKEN_ENV = "SIDECAR_ADMIN_TOKEN"
DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"
ADMIN_TIMEOUT = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Reverse-proxy sidecar: idempotency, trace headers, quotas, circuit breaking.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve traffic")
    run.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV),
        help=f"YAML config file (default: ${CONFIG_ENV}; without either, the embedded default)",
    )

    check = commands.add_parser("check-config", help="validate a config and print its routes")
    check.add_argument("file")

    demo = commands.add_parser(
        "demo", help="start a built-in echo app with the sidecar in front of it"
    )
    demo.add_argument("--port", type=int, default=8000, help="sidecar port (default 8000)")
    demo.add_argument("--admin-port", type=int, default=9901, help="admin port (default 9901)")

    quota = commands.add_parser(
        "quota",
        help=f"read or change quota overrides (token: ${ADMIN_TOKEN_ENV})",
    )
    quota.add_argument(
        "--admin",
        default=os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL),
        help=f"admin listener URL (default: ${ADMIN_URL_ENV} or {DEFAULT_ADMIN_URL})",
    )
    actions = quota.add_subparsers(dest="action", required=True)
    get = actions.add_parser("get", help="print the organisation's usage and overrides")
    get.add_argument("org")
    set_ = actions.add_parser("set", help="override one limit for the organisation")
    set_.add_argument("org")
    set_.add_argument("limit")
    set_.add_argument("value", type=_non_negative, metavar="N")
    delete = actions.add_parser("delete", help="remove the organisation's override of a limit")
    delete.add_argument("org")
    delete.add_argument("limit")
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "run":
        return run(args.config)
    if args.command == "demo":
        from sidecar.demo import run_demo

        return run_event_loop(run_demo(args.port, args.admin_port))
    if args.command == "quota":
        return quota(args)
    return 2


def quota(args: argparse.Namespace) -> int:
    """Exit 0 done, 1 refused by the sidecar, 3 the admin listener cannot be reached."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    base = args.admin.rstrip("/")
    path = "/quotas/" + urllib.parse.quote(args.org, safe="")
    method, body = "GET", None
    if args.action in ("set", "delete"):
        path += "/" + urllib.parse.quote(args.limit, safe="")
        method = "PUT" if args.action == "set" else "DELETE"
    if args.action == "set":
        body = json.dumps({"limit": args.value}).encode()
    request = urllib.request.Request(base + path, data=body, method=method)
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        print(_refusal(exc.code, exc.read()), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cannot reach the admin listener at {base}: {reason}", file=sys.stderr)
        return 3
    try:
        print(json.dumps(json.loads(payload), indent=2, sort_keys=True))
    except ValueError:
        print(f"the admin listener at {base} did not answer JSON", file=sys.stderr)
        return 3
    return 0


def _refusal(status: int, body: bytes) -> str:
    import json

    try:
        problem = json.loads(body)
    except ValueError:
        return f"refused: HTTP {status}"
    if not isinstance(problem, dict):
        return f"refused: HTTP {status}"
    text = f"refused ({status}): {problem.get('title', 'error')}"
    if problem.get("detail"):
        text += f": {problem['detail']}"
    return text


def load_checked(path: str) -> SidecarConfig:
    """Load a config file, with the store's own checks of the state URL."""
    from sidecar.store import check_state_config

    return load_config(path, check_state=check_state_config)


def load_or_report(path: str | None) -> SidecarConfig | None:
    """The config (the embedded one without a path), or None after printing every error."""
    try:
        return load_checked(path) if path else embedded_config()
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
    return None


def check_config(path: str) -> int:
    config = load_or_report(path)
    if config is None:
        return 1
    print(describe_config(config))
    return 0


def run(path: str | None) -> int:
    config = load_or_report(path)
    if config is None:
        return 1
    workers = config.server.workers
    if workers > 1 and WORKER_ENV not in os.environ:
        from sidecar.workers import supervise

        return supervise(workers, path)
    return serve_one(config, path, reuse_port=workers > 1)


def serve_one(config: SidecarConfig, path: str | None, *, reuse_port: bool) -> int:
    from sidecar.app import serve

    return run_event_loop(serve(config, path, reuse_port=reuse_port))


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (about 10-20 % faster for a proxy), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
