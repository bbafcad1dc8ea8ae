"""The dynamic batcher alone: gathering, keys, failures and timeouts (no HTTP, no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vlbridge.serving.batching import DynamicBatcher


def make(max_batch_size: int = 8, max_wait_ms: float = 50.0, delay: float = 0.0):
    calls: list[tuple[object, list]] = []

    def double(key, payloads):
        calls.append((key, list(payloads)))
        time.sleep(delay)
        if any(p == "bad" for p in payloads):
            raise ValueError("bad payload")
        return [p * 2 for p in payloads]

    return DynamicBatcher({"double": double}, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms), calls


def test_concurrent_jobs_are_gathered_into_one_call():
    batcher, calls = make()
    futures = [batcher.submit("double", "k", i) for i in range(5)]
    assert [f.result(timeout=5) for f in futures] == [0, 2, 4, 6, 8]
    assert len(calls) == 1 and batcher.stats.largest == 5
    batcher.close()


def test_batches_are_bounded_and_keys_never_mix():
    batcher, calls = make(max_batch_size=3)
    futures = [batcher.submit("double", "a" if i % 2 else "b", i) for i in range(10)]
    assert [f.result(timeout=5) for f in futures] == [2 * i for i in range(10)]
    assert all(len(payloads) <= 3 for _, payloads in calls)
    for key, payloads in calls:
        assert {("a" if p % 2 else "b") for p in payloads} == {key}
    batcher.close()


def test_batch_size_one_turns_batching_off():
    batcher, calls = make(max_batch_size=1)
    futures = [batcher.submit("double", "k", i) for i in range(4)]
    assert [f.result(timeout=5) for f in futures] == [0, 2, 4, 6]
    assert len(calls) == 4
    batcher.close()


def test_a_bad_job_fails_alone():
    batcher, _ = make()
    futures = [batcher.submit("double", "k", p) for p in (1, "bad", 3)]
    assert futures[0].result(timeout=5) == 2 and futures[2].result(timeout=5) == 6
    with pytest.raises(ValueError, match="bad payload"):
        futures[1].result(timeout=5)
    assert batcher.submit("double", "k", 4).result(timeout=5) == 8  # the worker lives on
    batcher.close()


def test_timeout_and_the_event_loop_stays_free():
    batcher, _ = make(max_batch_size=1, max_wait_ms=0, delay=0.3)

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(TimeoutError):
            await batcher.run("double", "k", 1, timeout=0.05)
        result = await batcher.run("double", "k", 2, timeout=5)
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(scenario())
    assert result == 4 and ticks > 10  # the loop ran while the worker slept
    assert threading.active_count() >= 1
    batcher.close()
