"""The state store interface every policy talks to.

Policies never see Redis. They run *scripts*: a named operation with a Lua body (in
`sidecar/store/lua/NAME.lua`, run by EVALSHA on Redis) and a Python twin with the same
semantics (run atomically on the in-process memory backend). Several calls can be sent
together with `execute`, which costs one round trip on Redis (one pipeline), so the
policies of a chain can batch their admission work without knowing about each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol, TypeAlias

# Values a script receives as ARGV and may return (Redis' Lua reply types, as Python sees them).
ScriptArg: TypeAlias = str | int | float | bytes
ScriptResult: TypeAlias = object


class MemoryKeyspace(Protocol):
    """What a script's Python twin may do to the memory backend's data (all synchronous).

    Keys passed in are already prefixed. Expiry is in milliseconds of the store's own clock,
    mirroring Redis' PX/PEXPIRE so the Lua and Python versions read alike; `unix_us` is the
    store's wall clock in microseconds, as Redis' TIME gives it to a script.
    """

    def now_ms(self) -> int: ...
    def unix_us(self) -> int: ...
    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes, px: int | None = None) -> None: ...
    def delete(self, key: str) -> bool: ...
    def incrby(self, key: str, amount: int) -> int: ...
    def pexpire(self, key: str, px: int) -> bool: ...
    def pttl(self, key: str) -> int: ...
    def hget(self, key: str, field: str) -> bytes | None: ...
    def hgetall(self, key: str) -> dict[str, bytes]: ...
    def hset(self, key: str, mapping: dict[str, bytes]) -> None: ...
    def hdel(self, key: str, *fields: str) -> int: ...
    def hincrby(self, key: str, field: str, amount: int) -> int: ...


MemoryScript: TypeAlias = Callable[[MemoryKeyspace, Sequence[str], Sequence[ScriptArg]], object]


@dataclass(frozen=True, slots=True)
class Script:
    """One atomic store operation: a Lua file for Redis and its Python twin for memory."""

    name: str
    lua: str
    memory: MemoryScript

    @classmethod
    def from_package(cls, name: str, memory: MemoryScript) -> Script:
        """Load `sidecar/store/lua/<name>.lua` shipped as package data."""
        source = resources.files("sidecar.store").joinpath("lua", f"{name}.lua").read_text()
        return cls(name=name, lua=source, memory=memory)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A script with its keys (unprefixed; the store adds `key_prefix`) and arguments."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[ScriptArg, ...] = ()


class StoreError(Exception):
    """The store could not answer: `kind` is "timeout", "unavailable" or "script"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class StateStore(Protocol):
    """Shared state for policies; `redis://...` across replicas or `memory://` in-process."""

    @property
    def backend(self) -> str:
        """ "redis" or "memory", for /health and metrics labels."""
        ...

    async def execute(self, calls: Sequence[ScriptCall]) -> list[ScriptResult]:
        """Run the calls in order, atomically each, in one round trip; results in order.

        Raises StoreError (never a Redis exception) when the store fails or exceeds the
        per-call timeout. A script that raises fails the whole call with kind "script".
        """
        ...

    async def ping(self) -> float:
        """Round-trip time in seconds; raises StoreError when unreachable."""
        ...

    async def close(self) -> None: ...
