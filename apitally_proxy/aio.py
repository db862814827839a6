"""Small asyncio helpers shared by the drain and the final sync."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
