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
