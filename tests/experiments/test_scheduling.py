"""lightning_latent/experiments/scheduling.py: dependent jobs, the lowest priority first."""
from __future__ import annotations

import threading

import pytest

from lightning_latent.experiments.scheduling import run_by_priority


def study_like(seeds: int, arms: int, ran: list, fail: set = frozenset()):
    """A study's shape: each seed's start job returns that seed's cells (start test + arms) at (seed, 1)."""
    lock = threading.Lock()

    def job(name, follow=()):
        def fn():
            with lock:
                ran.append(name)
            if name in fail:
                raise RuntimeError(f"{name} failed")
            return list(follow)
        return fn

    def start(s):
        return ((s, 0), job(f"start{s}", [((s, 1), job(f"test{s}"))] + [((s, 1), job(f"arm{s}.{a}"))
                                                                       for a in range(arms)]))
    return [start(s) for s in range(seeds)]


def test_one_worker_finishes_a_seed_before_the_next_seeds_start():
    ran = []
    run_by_priority(study_like(3, 2, ran), workers=1)
    assert ran == ["start0", "test0", "arm0.0", "arm0.1", "start1", "test1", "arm1.0", "arm1.1",
                   "start2", "test2", "arm2.0", "arm2.1"]  # (a thread pool fed every start first: start0-2 first)


def test_two_workers_run_every_job_once():
    ran = []
    run_by_priority(study_like(4, 3, ran), workers=2)
    assert sorted(ran) == sorted([f"start{s}" for s in range(4)] + [f"test{s}" for s in range(4)]
                                 + [f"arm{s}.{a}" for s in range(4) for a in range(3)])


def test_a_failed_job_costs_its_dependants_only_and_is_raised_at_the_end():
    ran = []
    with pytest.raises(RuntimeError, match="start1 failed"):
        run_by_priority(study_like(3, 1, ran, fail={"start1"}), workers=2)
    assert "test1" not in ran and "arm1.0" not in ran  # never queued
    assert {"start0", "test0", "arm0.0", "start2", "test2", "arm2.0"} <= set(ran)  # the others went on
    with pytest.raises(RuntimeError, match="arm0.0 failed"):
        run_by_priority(study_like(2, 2, [], fail={"arm0.0"}), workers=1)


def test_nothing_to_run_and_a_bad_worker_count():
    run_by_priority([], workers=2)
    with pytest.raises(ValueError, match="workers 0"):
        run_by_priority([], workers=0)
