"""Small asyncio helpers the layers share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``done`` every ``interval`` seconds until it holds (True) or ``timeout`` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done() and loop.time() < deadline:
        await asyncio.sleep(interval)
    return done()
