"""Command line: `sidecar run | check-config | demo | --version` (argument parsing only)."""

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "run":
        return run(args.config)
    if args.command == "demo":
        from sidecar.demo import run_demo

        return run_event_loop(run_demo(args.port, args.admin_port))
    return 2


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
