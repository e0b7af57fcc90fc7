"""Batching: requests queue up; one worker thread owns the engine and runs them in batches.

A batch is up to max_batch jobs of one bucket (kind and history-length class), taken oldest first:
the worker starts it when it is full, when its oldest job has waited max_wait, or when the scheduler
is closing or flushing. Jobs arriving while a batch runs wait for the next one, so with max_wait 0 (the
server's default) a batch starts as soon as the engine is free, with whatever queued meanwhile (continuous
batching): on the H200 a 2 ms wait was 2 ms of every lone request's latency (serve_load_dlrm-v3_h200_2026-12-04_run70). The queue holds at most max_queue
jobs; beyond that submit raises QueueFull with a Retry-After estimate. close() stops admission and the
worker finishes every queued job before it exits (graceful shutdown).

If a batch of several jobs fails, each job is run again alone, so one bad request fails alone.

run_now runs one job on the calling thread (the event loop's) when the worker is idle and nothing is
queued: a lone request then skips the two thread hand-offs (to the worker and back to the loop), which
cost 0.25 ms on the H200 host (serve_load_dlrm-v3_h200_2026-12-04_run81_packed). The engine is still
used by one thread at a time: the worker takes no batch while a job runs inline, and run_now declines
while the worker runs one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hstu_opt.serve.runners.base import QueueFull, Unavailable

class SchedulerClosed(Unavailable):
    """The scheduler no longer admits work (the server is shutting down)."""


@dataclass
class Job:
    bucket: Hashable  # jobs of one bucket can share a batch
    payload: Any
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    started: float = 0.0  # when its batch began


# execute(bucket, jobs) -> one result per job, in order (runs on the worker thread)
Execute = Callable[[Hashable, list[Job]], list[Any]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_wait_s: float = 0.002
    max_queue: int = 1024
    inline_lone: bool | None = False  # a lone request runs on the caller's thread (Scheduler.run_now; runners
    # decide; None: the runner's rule, e.g. runners.native.inline_rule)


class Scheduler:
    def __init__(self, execute: Execute, policy: BatchPolicy, on_batch: Callable[[Hashable, int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        self.execute, self.policy = execute, policy
        self._on_batch = on_batch or (lambda bucket, size: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: list[Job] = []  # oldest first
        self._cond = threading.Condition()
        self._closing = False
        self._flushing = False
        self._busy = False  # a batch runs (on the worker, or inline through run_now)
        self._batch_s = 0.0  # running mean of batch durations, for Retry-After
        self._thread = threading.Thread(target=self._work, name="hstu-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, bucket: Hashable, payload: Any) -> Future:
        job = Job(bucket, payload)
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._queue) >= self.policy.max_queue:
                raise QueueFull(self.retry_after_s())
            self._queue.append(job)
            self._on_depth(len(self._queue))
            self._cond.notify()
        return job.future

    def run_now(self, bucket: Hashable, payload: Any) -> Future | None:
        """Run one job on the calling thread if the worker is idle and nothing is queued; returns its
        finished future (result or exception set), or None when it must queue instead (submit)."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if self._queue or self._busy:
                return None
            self._busy = True
        job = Job(bucket, payload)
        try:
            self._run_batch([job])
        finally:
            with self._cond:
                self._busy = False
                if self._queue:  # (only then is the worker waiting on busy; waking it idle costs a GIL hand-off)
                    self._cond.notify_all()
        return job.future

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil(len(self._queue) / self.policy.max_batch)
        return max(1, math.ceil(batches * self._batch_s))

    def flush(self) -> None:
        """From now on run every batch at once, without waiting for it to fill (shutdown drain)."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop admitting jobs; the worker finishes the queued ones, then exits."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread --------------------------------------------------------------------
    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _run_batch(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        for job in batch:
            job.started = t0
        self._on_batch(batch[0].bucket, len(batch))
        self._run(batch)
        took = time.perf_counter() - t0
        self._batch_s = 0.9 * self._batch_s + 0.1 * took if self._batch_s else took

    def _next_batch(self) -> list[Job] | None:
        """The next batch (marking the engine busy), or None once closing with nothing queued."""
        with self._cond:
            while not self._queue or self._busy:  # (busy: a job runs inline; wait for it)
                if self._closing and not self._queue:
                    return None
                self._cond.wait()
            head = self._queue[0]
            deadline = head.enqueued + self.policy.max_wait_s
            while not (self._closing or self._flushing) and self._count(head.bucket) < self.policy.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [j for j in self._queue if j.bucket == head.bucket][: self.policy.max_batch]
            taken = {id(j) for j in batch}
            self._queue = [j for j in self._queue if id(j) not in taken]
            self._on_depth(len(self._queue))
            self._busy = True
            return batch

    def _count(self, bucket: Hashable) -> int:
        return sum(j.bucket == bucket for j in self._queue)

    def _run(self, batch: list[Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.execute(live[0].bucket, live)
        except Exception as exc:
            if len(live) > 1:  # find the job that fails: each alone
                for job in live:
                    self._run_alone(job)
                return
            live[0].future.set_exception(exc)
            return
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _run_alone(self, job: Job) -> None:
        try:
            job.future.set_result(self.execute(job.bucket, [job])[0])
        except Exception as exc:
            job.future.set_exception(exc)
