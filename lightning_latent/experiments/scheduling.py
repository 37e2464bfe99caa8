"""Run dependent jobs on a few threads, the job of lowest priority first.

The study's cells depend on each other one way only: a seed's arms need that seed's start. A thread pool
fed all the starts first (the order before 2026-12-06) spends the first hours of a study on starts alone,
so a study stopped at a session's end has every start half built and no arm. Taking the lowest
``(seed, kind)`` first instead finishes whole seeds, one after another as far as the workers allow: a
stopped study has complete rows, and the first arms' learning curves come hours sooner. Every cell is
the same command line either way; only the order changes.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Iterable
from typing import Any

#: ``(priority, fn)``: ``fn()`` runs the job and returns the jobs it makes possible (or ``None``).
Job = tuple[tuple[Any, ...], Callable[[], "Iterable[Job] | None"]]


def run_by_priority(jobs: Iterable[Job], workers: int) -> None:
    """Run ``jobs`` on ``workers`` threads. A free thread takes the queued job of lowest priority (ties: the
    order queued); a finished job's follow-ups are queued at once. A failed job's follow-ups are never
    queued, the other jobs go on (a failed cell costs its dependants, not the study), and the first failure
    is raised once nothing runnable is left."""
    if workers < 1:
        raise ValueError(f"workers {workers} must be >= 1")
    heap: list = []
    order = itertools.count()
    cond = threading.Condition()
    running = 0
    errors: list[BaseException] = []

    def push(new: Iterable[Job]) -> None:
        for prio, fn in new:
            heapq.heappush(heap, (prio, next(order), fn))

    def work() -> None:
        nonlocal running
        while True:
            with cond:
                while not heap and running:
                    cond.wait()
                if not heap:  # nothing queued, nothing running that could queue more: done
                    cond.notify_all()
                    return
                _, _, fn = heapq.heappop(heap)
                running += 1
            follow: list[Job] = []
            err = None
            try:
                follow = list(fn() or ())
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others finish
                err = e
            with cond:
                running -= 1
                if err is not None:
                    errors.append(err)
                else:
                    push(follow)
                cond.notify_all()

    push(jobs)
    threads = [threading.Thread(target=work, name=f"job-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
