"""Small asyncio helpers: background loops, and waits a second signal can cut short."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any


class Pause:
    """Gives the event loop its turn from a long piece of work; counts the time spent
    away, so the work's own cost is its wall time minus `away`."""

    __slots__ = ("away",)

    def __init__(self) -> None:
        self.away = 0.0

    async def __call__(self) -> None:
        left = time.perf_counter()
        await asyncio.sleep(0)
        self.away += time.perf_counter() - left


async def wait_or_hurry(
    future: asyncio.Future[Any], timeout: float, hurry: asyncio.Event | None = None
) -> bool:
    """Wait for `future` at most `timeout` seconds, or until `hurry` is set.

    Returns whether `future` is done; it is left running otherwise (the caller
    decides whether to cancel it).
    """
    if future.done():
        return True
    if timeout <= 0:
        return False
    waiters: set[asyncio.Future[Any]] = {future}
    hurried = asyncio.ensure_future(hurry.wait()) if hurry is not None else None
    if hurried is not None:
        waiters.add(hurried)
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if hurried is not None and not hurried.done():
            hurried.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hurried
    return future.done()


async def cancel_and_wait(future: asyncio.Future[Any]) -> None:
    """Cancel a future and wait until it has finished (its errors are dropped)."""
    if not future.done():
        future.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await future


class Background:
    """A component's background loops: started by name, stopped together.

    `start` runs a coroutine as a named task; `stop` cancels every task and waits
    for each to finish (their CancelledError and errors are dropped: a loop that
    failed has logged why already). Stopping twice, or before starting, is fine.
    """

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        return task

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_and_wait(task)
