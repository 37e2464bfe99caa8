"""lightning_latent/progress.py: the schedule-aware progress display: how it names segments and what time it
estimates is left (the console of a whole run: tests/integration/test_console.py)."""
from __future__ import annotations

import pytest

from lightning_latent.progress import ScheduleProgress, fmt_seconds


def test_progress_arithmetic():
    from lightning_latent.schedule import Phase, flatten

    class M:
        segments = flatten([Phase("cot", 10), Phase("coconut", 5, stages=[1, 2]), Phase("grpo", 4, name="rl")], 1,
                           {"sft": 8, "grpo": 2}, {"sft": 1e-4, "grpo": 1e-5})
        total_steps = 24
        step_count = 12

        @property
        def segment(self):
            from lightning_latent.schedule import locate

            return locate(self.segments, self.step_count)

    m, bar = M(), ScheduleProgress(mode="plain", every=5)
    assert bar.describe(m, m.segments[1]) == "coconut · stage 1 (1/2)"
    assert bar.describe(m, m.segments[3]) == "rl · grpo stage 2"
    assert bar.time_left(m) == (None, None)  # nothing measured yet
    bar._kind_time = {"cot": [10.0, 10], "coconut": [2.0, 2]}  # 1 s per step; grpo unmeasured: the mean
    phase_left, run_left = bar.time_left(m)
    assert phase_left == pytest.approx(8.0) and run_left == pytest.approx(12.0)
    assert fmt_seconds(3725) == "1:02:05" and fmt_seconds(None) == "?"
    with pytest.raises(ValueError):
        ScheduleProgress(every=0)
