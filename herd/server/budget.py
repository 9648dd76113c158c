"""How much request input the server prepares at once (tokenizing, rendering chat templates, decoding images).

That work runs in worker threads and costs memory in proportion to its input: tokenizing 7.5 MB of text peaks
near a gigabyte. Six such requests at once would cost six times that, so each request holds a share of an
InputBudget while its input is prepared: its body's bytes (all of the budget when it holds images), waiting
first come, first served until its share fits. Requests of a few kilobytes go straight ahead: however many
run, each costs little.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager

SMALL = 64 << 10  # bytes of body below which a request skips the queue


class InputBudget:
    def __init__(self, capacity: int, small: int = SMALL):
        self.capacity, self.small = capacity, small
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, size: int):
        """Hold min(size, capacity) of the budget for the body of the `async with`."""
        if size <= self.small:
            yield
            return
        share = min(size, self.capacity)
        if self._waiting or self.used + share > self.capacity:
            turn = (share, asyncio.get_running_loop().create_future())
            self._waiting.append(turn)
            try:
                await turn[1]
            except asyncio.CancelledError:
                if turn[1].done() and not turn[1].cancelled():  # granted as it was cancelled: give it back
                    self._release(share)
                elif turn in self._waiting:
                    self._waiting.remove(turn)
                    self._grant()
                raise
        else:
            self.used += share
        try:
            yield
        finally:
            self._release(share)

    def _release(self, share: int) -> None:
        self.used -= share
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.capacity:
            share, future = self._waiting.popleft()
            if not future.cancelled():  # a cancelled waiter leaves the line itself
                self.used += share
                future.set_result(None)
