"""lightning_latent/cli.py: the command line as a parser (no run): registered tasks, the links from the data
settings into the model, the callbacks it always adds, where the logs go. Whole CLI runs (subprocesses)
are in tests/integration/test_cli_runs.py."""
from __future__ import annotations

import pytest

import toy_task  # noqa: F401  (registers the toy task the CLI must accept)
from lightning_latent.cli import TRAINER_DEFAULTS, LatentCLI
from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.module import LatentReasoner

TINY = ["--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32", "--model.backbone.n_head", "2",
        "--data.val_limit", "2"]


def test_the_cli_accepts_a_registered_task(tmp_path):
    from lightning_latent.cli import LatentCLI

    def cli(task: str) -> LatentCLI:
        return LatentCLI(LatentReasoner, LatentDataModule, run=False, parser_kwargs={"default_env": False},
                         args=["--data.task", task, "--data.val_limit", "2", "--trainer.logger", "false",
                               "--trainer.default_root_dir", str(tmp_path),
                               "--model.backbone.n_layer", "1", "--model.backbone.n_embd", "32",
                               "--model.backbone.n_head", "2"])

    assert cli("toy").datamodule.task == "toy"
    with pytest.raises(ValueError, match="registered tasks: .*toy"):
        cli("nope")


def test_the_cli_links_data_settings_into_the_model_and_adds_its_callbacks(tmp_path):
    cli = LatentCLI(LatentReasoner, LatentDataModule, run=False, trainer_defaults=TRAINER_DEFAULTS,
                    parser_kwargs={"default_env": False},
                    args=[*TINY, "--data.seed", "3", "--data.task", "toy", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.enable_progress_bar", "false"])
    assert cli.model.seed == 3 and cli.model.hparams.task == "toy"  # data.seed / data.task linked
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"EnvironmentRecord", "PhaseSummary", "HParamsSummary", "StepCheckpoint"} <= kinds
    assert "ScheduleProgress" not in kinds  # refused by Lightning with the progress bar off
    ck = cli.trainer.checkpoint_callback
    assert ck.save_last is True and ck._every_n_train_steps == 100
    assert cli.trainer.logger.save_dir == str(tmp_path)  # --trainer.default_root_dir moves the default logs
    assert cli.trainer.max_epochs == -1 and cli.trainer.reload_dataloaders_every_n_epochs == 1


def test_main_destroys_the_process_group_of_a_finished_ddp_run(tmp_path, monkeypatch):
    """A gloo group left to interpreter finalisation can abort the process at exit (SIGABRT), which fails its
    torchrun agent and makes a multi-node run's other agents wait 300 s at their exit barrier. ``main`` ends the
    group once the run has finished (a one-process gloo group stands in for the run's)."""
    import torch.distributed as dist

    from lightning_latent import cli as cli_mod

    class Run:  # stands in for LatentCLI: the run initialises a process group, as DDP does
        def __init__(self, *a, **k):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(cli_mod, "LatentCLI", Run)
    monkeypatch.setattr(cli_mod.quiet, "install", lambda: None)
    monkeypatch.setattr(cli_mod.torch, "set_float32_matmul_precision", lambda p: None)
    try:
        assert isinstance(cli_mod.main([]), Run)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cli_mod.end_process_group()  # no group: nothing to do
