"""Shared state for policies: `open_store(config)` gives a Redis or in-process store.

See docs/state-store.md for how scripts, keys, timeouts and URLs work.
"""

from sidecar.store.base import (
    MemoryKeyspace,
    MemoryScript,
    Script,
    ScriptArg,
    ScriptCall,
    ScriptResult,
    StateStore,
    StoreError,
)
from sidecar.store.factory import SUPPORTED_SCHEMES, check_state_config, open_store
from sidecar.store.memory import MemoryStore
from sidecar.store.observe import StoreObserver

__all__ = [
    "SUPPORTED_SCHEMES",
    "MemoryKeyspace",
    "MemoryScript",
    "MemoryStore",
    "Script",
    "ScriptArg",
    "ScriptCall",
    "ScriptResult",
    "StateStore",
    "StoreError",
    "StoreObserver",
    "check_state_config",
    "open_store",
]
