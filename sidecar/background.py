"""Work that must finish even when the request that started it is gone.

An idempotency record's completion write, say, must land although the client hung up:
such tasks are tracked here (so they are neither garbage-collected nor forgotten) and
given time to finish at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return self.track(asyncio.create_task(work))

    def track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for what is running, including tasks those tasks start
        meanwhile (a finishing request spawns its store write), then cancel the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        still_running = set(self._tasks)
        for task in still_running:
            task.cancel()
        for task in still_running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
