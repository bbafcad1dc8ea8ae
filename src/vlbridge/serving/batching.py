"""Dynamic batching: concurrent requests gathered into one model call, in one worker thread.

Requests arrive on the event loop and :meth:`DynamicBatcher.submit` a job: a *kind* (which batched function runs
it), a *key* (jobs batch together only with equal keys: the same generation settings, say) and a payload. The
worker thread takes the oldest job, then waits at most ``max_wait_ms`` for more jobs of the same kind and key, up
to ``max_batch_size``, and runs them in one call. Jobs with other keys keep their place for the next round. The
model is only ever touched by this thread, so the event loop stays free to accept, parse and answer requests.

``max_batch_size=1`` turns batching off (one call per request), which is what the load benchmark compares against.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

BatchFunction = Callable[[Hashable, Sequence[Any]], Sequence[Any]]  # (key, payloads) -> one result per payload


@dataclass
class _Job:
    kind: str
    key: Hashable
    payload: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatchStats:
    """What the worker has done: ``calls`` batched calls over ``items`` jobs (``items / calls`` per call)."""

    calls: int = 0
    items: int = 0
    largest: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "items": self.items,
            "largest": self.largest,
            "busy_s": round(self.busy_seconds, 3),
        }


class DynamicBatcher:
    """One worker thread running batched functions over gathered jobs.

    A batch that fails is run again job by job, so a bad request fails alone and the others still succeed.

    Args:
        functions: ``{kind: function(key, payloads) -> results}``, one result per payload, in order.
        max_batch_size: Jobs per call at most; 1 disables batching.
        max_wait_ms: After the first job of a batch, how long to wait for more.
    """

    def __init__(self, functions: dict[str, BatchFunction], *, max_batch_size: int = 16, max_wait_ms: float = 10.0):
        self.functions = dict(functions)
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vlbridge-model-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------ clients
    def submit(self, kind: str, key: Hashable, payload: Any) -> concurrent.futures.Future:
        """Queue one job; its future resolves to the job's result (or raises the batch's exception)."""
        if kind not in self.functions:
            raise KeyError(kind)
        job = _Job(kind, key, payload)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    async def run(self, kind: str, key: Hashable, payload: Any, *, timeout: float | None = None) -> Any:
        """Submit a job and await its result from the event loop; a timeout cancels it if it has not started.

        Raises:
            TimeoutError: The result did not come within ``timeout`` seconds.
        """
        future = self.submit(kind, key, payload)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout)

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------------ worker
    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                batch.extend(self._pop_matching(first, self.max_batch_size - len(batch)))
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(timeout=remaining)
            return batch

    def _pop_matching(self, first: _Job, limit: int) -> list[_Job]:
        """Remove and return up to ``limit`` queued jobs of ``first``'s kind and key (others keep their order)."""
        taken, kept = [], collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if len(taken) < limit and job.kind == first.kind and job.key == first.key:
                taken.append(job)
            else:
                kept.append(job)
        self._queue = kept
        return taken

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # timed-out jobs drop out
            if not live:
                continue
            self.stats.calls += 1  # counted before the results are delivered, so a caller that has one sees it
            self.stats.items += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            start = time.perf_counter()
            try:
                self._run(live)
            finally:
                self.stats.busy_seconds += time.perf_counter() - start

    def _run(self, jobs: list[_Job]) -> None:
        """One call for the whole batch; if it fails, each job alone, so one bad request fails only itself."""
        try:
            results = self.functions[jobs[0].kind](jobs[0].key, [job.payload for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"batched {jobs[0].kind!r} returned {len(results)} results for {len(jobs)}")
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._run([job])
                return
            jobs[0].future.set_exception(exc)
        else:
            for job, result in zip(jobs, results):
                job.future.set_result(result)
