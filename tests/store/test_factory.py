"""open_store: picking the backend from the URL, without touching the network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config.model import StateConfig
from sidecar.store import MemoryStore, ScriptCall, open_store
from sidecar.store.observe import batch_label
from tests.store.twins import GET_MANY, INCR_TTL

ROOT = Path(__file__).resolve().parents[2]


async def test_memory_url() -> None:
    store = open_store(StateConfig(url="memory://"))
    assert isinstance(store, MemoryStore)
    assert store.backend == "memory"
    await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "rediss://user:pw@redis.invalid:6380/2?ssl_cert_reqs=required",
        "unix:///nonexistent/redis.sock?db=1",
        "redis+sentinel://:pw@sentinel-a.invalid:26379,sentinel-b.invalid/mymaster/0",
        "REDIS://127.0.0.1:1",
    ],
)
async def test_redis_urls_open_without_io(url: str) -> None:
    # Every host here is unreachable or unresolvable: opening must still succeed.
    store = open_store(StateConfig(url=url))
    assert store.backend == "redis"
    await store.close()


@pytest.mark.parametrize("url", ["http://localhost", "redis-cluster://h:1", "memcached://h"])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store(StateConfig(url=url))


@pytest.mark.parametrize("prefix", ["{tenant}:", "a}b"])
def test_prefix_with_braces_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        open_store(StateConfig(key_prefix=prefix))


def test_batch_label() -> None:
    one = ScriptCall(INCR_TTL, ("k",))
    two = ScriptCall(GET_MANY, ("k",))
    assert batch_label([one]) == "incr_ttl"
    assert batch_label([one, two, one]) == "incr_ttl+get_many"
    assert batch_label([two] * 200) == "get_many"


def test_memory_store_does_not_load_redis() -> None:
    code = (
        "import sys; from sidecar.store import open_store; "
        "from sidecar.config.model import StateConfig; open_store(StateConfig()); "
        "assert 'redis' not in sys.modules, 'redis imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_only_the_redis_backend_imports_redis() -> None:
    # The Redis backend is redis.py and its lean transport, resp.py.
    backend = {ROOT / "sidecar" / "store" / "redis.py", ROOT / "sidecar" / "store" / "resp.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "sidecar").rglob("*.py")
        if path not in backend
        and any(
            line.lstrip().startswith(("import redis", "from redis"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []


def test_unknown_url_option_fails_at_open_without_leaking_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported option") as caught:
        open_store(StateConfig(url="redis://:hunter2@127.0.0.1:1/0?no_such_option=1"))
    assert "hunter2" not in str(caught.value)


def test_bad_url_value_fails_at_open() -> None:
    with pytest.raises(ValueError):
        open_store(StateConfig(url="redis://127.0.0.1:1/0?db=notanumber"))
