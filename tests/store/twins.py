"""Test-only scripts: the Lua in tests/store/scripts/ and their Python twins.

Each twin mirrors its Lua file line for line; the contract tests check both backends give
the same answers, which is what a policy's own twin must also guarantee.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar.store import MemoryKeyspace, Script, ScriptArg

SCRIPTS = Path(__file__).parent / "scripts"


def _script(
    name: str, twin: Callable[[MemoryKeyspace, Sequence[str], Sequence[ScriptArg]], object]
) -> Script:
    return Script(name=name, lua=(SCRIPTS / f"{name}.lua").read_text(), memory=twin)


def _text(arg: ScriptArg) -> bytes:
    """An argument as Lua sees it: Redis passes every ARGV as a string."""
    if isinstance(arg, bytes):
        return arg
    return (repr(arg) if isinstance(arg, float) else str(arg)).encode()


def incr_ttl(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    count = ks.incrby(keys[0], int(args[0]))
    if ks.pttl(keys[0]) == -1:
        ks.pexpire(keys[0], int(args[1]))
    return count


def cas(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    field, expected, new = str(args[0]), _text(args[1]), _text(args[2])
    current = ks.hget(keys[0], field)
    if (current or b"") != expected:
        return [0, current]
    ks.hset(keys[0], {field: new})
    return [1, new]


def get_many(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    return [ks.get(key) for key in keys]


def fail(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    raise ValueError(f"refused: {_text(args[0]).decode()}")


def spin(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    # The memory backend runs synchronously; spinning would only block the event loop.
    return 1


def shapes(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    return [7, "two", False, [3.7, b"four", -2.9], True, _text(args[0])]


def exists(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    return ks.pttl(keys[0]) != -2


def op(ks: MemoryKeyspace, keys: Sequence[str], args: Sequence[ScriptArg]) -> object:
    """Dispatch one command to the keyspace, answering what Redis would."""
    key, command, rest = keys[0], str(args[0]).upper(), [_text(arg) for arg in args[1:]]
    return _COMMANDS[command](ks, key, rest)


def _set(ks: MemoryKeyspace, key: str, rest: list[bytes]) -> object:
    if len(rest) == 3 and rest[1].upper() == b"PX":
        ks.set(key, rest[0], px=int(rest[2]))
    else:
        ks.set(key, rest[0])
    return b"OK"


def _hset(ks: MemoryKeyspace, key: str, rest: list[bytes]) -> object:
    mapping = {rest[i].decode(): rest[i + 1] for i in range(0, len(rest), 2)}
    existing = ks.hgetall(key)
    ks.hset(key, mapping)
    return sum(1 for field in mapping if field not in existing)


def _hgetall(ks: MemoryKeyspace, key: str, rest: list[bytes]) -> object:
    return [item for field, value in ks.hgetall(key).items() for item in (field, value)]


_COMMANDS: dict[str, Callable[[MemoryKeyspace, str, list[bytes]], object]] = {
    "GET": lambda ks, key, rest: ks.get(key),
    "SET": _set,
    "DEL": lambda ks, key, rest: int(ks.delete(key)),
    "INCRBY": lambda ks, key, rest: ks.incrby(key, int(rest[0])),
    "PEXPIRE": lambda ks, key, rest: int(ks.pexpire(key, int(rest[0]))),
    "PTTL": lambda ks, key, rest: ks.pttl(key),
    "HGET": lambda ks, key, rest: ks.hget(key, rest[0].decode()),
    "HSET": _hset,
    "HDEL": lambda ks, key, rest: ks.hdel(key, *(field.decode() for field in rest)),
    "HINCRBY": lambda ks, key, rest: ks.hincrby(key, rest[0].decode(), int(rest[1])),
    "HGETALL": _hgetall,
}

INCR_TTL = _script("incr_ttl", incr_ttl)
CAS = _script("cas", cas)
GET_MANY = _script("get_many", get_many)
FAIL = _script("fail", fail)
SPIN = _script("spin", spin)
SHAPES = _script("shapes", shapes)
OP = _script("op", op)
EXISTS = _script("exists", exists)
