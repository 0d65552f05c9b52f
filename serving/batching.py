"""Adaptive batching inside the service process.

Concurrent requests queue their preprocessed images; each forward pass takes everything that
queued while the previous one ran (up to ``max_batch`` images), optionally waiting up to
``max_wait_ms`` for more. An idle service answers a lone request at once; under load, batches
grow by themselves, so throughput rises without a latency floor.
Done in process rather than through a batchable BentoML API because that route re-sends every
pixel array as JSON over a loopback HTTP hop.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]


class MicroBatcher:
    def __init__(self, max_batch: int = 64, max_wait_ms: float = 0.0):
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000
        self._queue: deque[tuple[np.ndarray, Fn, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # recent forward-pass sizes, for observation

    async def __call__(self, items: np.ndarray, fn: Fn) -> np.ndarray:
        """``fn(items)`` (row-wise), computed in one call with whatever else is queued for the same
        ``fn``; requests for another ``fn`` (a model swapped in meanwhile) are never mixed in."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((items, fn, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            deadline = time.monotonic() + self.max_wait_s
            while sum(len(i) for i, _, _ in self._queue) < self.max_batch and time.monotonic() < deadline:
                await asyncio.sleep(min(0.001, max(0.0, deadline - time.monotonic())))
            fn = self._queue[0][1]
            batch, size = [], 0
            # == not "is": each attribute access makes a new bound method of the same model.
            while self._queue and self._queue[0][1] == fn and (not batch or size + len(self._queue[0][0]) <= self.max_batch):
                items, _, future = self._queue.popleft()
                batch.append((items, future))
                size += len(items)
            self.batch_sizes = (self.batch_sizes + [size])[-1000:]
            try:
                # The forward pass runs in a thread so the event loop keeps accepting requests.
                results = await asyncio.to_thread(fn, np.concatenate([items for items, _ in batch]))
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in batch:
                if not future.done():
                    future.set_result(results[start : start + len(items)])
                start += len(items)
