"""lightning_latent/experiments/reporting.py: reading a run's TensorBoard events back."""
from __future__ import annotations

import logging

from torch.utils.tensorboard import SummaryWriter

from lightning_latent.experiments.reporting import read_events, scalars


def test_read_events_keeps_tensorboards_per_file_info_lines_out_of_a_drivers_log(tmp_path, caplog):
    """A study driver logs at INFO and reads hundreds of event files; TensorBoard's reader would add a
    "No path found after <file>" line for each. They stay out; the scalars still come back whole."""
    tb = logging.getLogger("tensorboard")
    tb.setLevel(logging.NOTSET)  # as in a fresh process
    try:
        with SummaryWriter(str(tmp_path)) as w:
            for step in range(3):
                w.add_scalar("val/pass@1", 0.1 * step, step)
        with caplog.at_level(logging.INFO):  # the root logger at INFO, as the driver configures it
            acc = read_events(tmp_path)
        assert not [r for r in caplog.records if r.name.startswith("tensorboard")], caplog.text
        assert scalars(acc)["val/pass@1"]["value"].round(3).tolist() == [0.0, 0.1, 0.2]
    finally:
        tb.setLevel(logging.NOTSET)


def test_read_events_leaves_a_level_the_caller_set(tmp_path, caplog):
    """A user who wants TensorBoard's reader chatter (its level set to INFO) keeps it."""
    tb = logging.getLogger("tensorboard")
    tb.setLevel(logging.INFO)
    try:
        with SummaryWriter(str(tmp_path)) as w:
            w.add_scalar("x", 1.0, 0)
        with caplog.at_level(logging.INFO):
            read_events(tmp_path)
        assert any(r.name.startswith("tensorboard") for r in caplog.records)
    finally:
        tb.setLevel(logging.NOTSET)


def test_attempt_scalars_replace_a_killed_attempts_steps_with_the_resumed_ones(tmp_path):
    """A run killed after step 5, its last checkpoint at step 3, resumed into the same directory: the second
    events file logs steps 3.. again. The curve is the first attempt's steps 0-2 then the resumed attempt's
    (no step twice: a sum over it counts each step once), per tag from that tag's first resumed step;
    a tag only the first attempt logged stays whole. One file: exactly :func:`scalars`."""
    import time

    from lightning_latent.experiments.reporting import attempt_scalars

    with SummaryWriter(str(tmp_path), filename_suffix=".a") as w:
        for step in range(6):
            w.add_scalar("grpo/reward_mean", step, step)
            w.add_scalar("perf/rollouts", 8, step)
        w.add_scalar("val/pass@1", 0.5, 3)
        w.add_scalar("phase/only_first", 1.0, 0)
    assert attempt_scalars(tmp_path)["grpo/reward_mean"]["value"].tolist() == scalars(tmp_path)[
        "grpo/reward_mean"]["value"].tolist() == [0, 1, 2, 3, 4, 5]
    time.sleep(0.01)
    with SummaryWriter(str(tmp_path), filename_suffix=".b") as w:
        for step in range(3, 8):
            w.add_scalar("grpo/reward_mean", 10 + step, step)
            w.add_scalar("perf/rollouts", 8, step)
        w.add_scalar("val/pass@1", 0.75, 6)
    assert scalars(tmp_path)["grpo/reward_mean"]["step"].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 6, 7]  # the problem
    got = attempt_scalars(tmp_path)
    assert got["grpo/reward_mean"]["step"].tolist() == list(range(8))
    assert got["grpo/reward_mean"]["value"].tolist() == [0, 1, 2, 13, 14, 15, 16, 17]
    assert got["perf/rollouts"]["value"].sum() == 8 * 8
    # the first attempt's validation at step 3 is older than the resumed one's first (step 6): kept
    assert list(zip(got["val/pass@1"]["step"], got["val/pass@1"]["value"])) == [(3, 0.5), (6, 0.75)]
    assert got["phase/only_first"]["value"].tolist() == [1.0]
    assert set(attempt_scalars(tmp_path, ["perf/rollouts"])) == {"perf/rollouts"}
