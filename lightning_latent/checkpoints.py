"""Reading our checkpoints back as a module, including checkpoints written under older names.

Lightning's ``--ckpt_path`` resumes a run with the command line's settings; :func:`load_module` instead
rebuilds a module from the settings saved in the file (for scripts: the study's diversity curve,
notebooks). The module's own ``on_save_checkpoint`` / ``on_load_checkpoint`` say what a file holds.
"""
from __future__ import annotations

from .model.build import read_checkpoint
from .module import LatentReasoner


def upgrade_hparams(hp: dict) -> dict:
    """Hyperparameters of an older checkpoint -> today's names (``model`` -> ``backbone``)."""
    if "model" in hp and "backbone" not in hp:
        hp = {("backbone" if k == "model" else k): v for k, v in hp.items()}
    return hp


def load_module(path: str, **overrides) -> LatentReasoner:
    """A module rebuilt from one of our checkpoints: its own settings (``overrides`` replace some), its
    weights, its place in the schedule."""
    ck = read_checkpoint(path)
    if "schedule_state" not in ck:
        raise ValueError(f"{path!r} is not a lightning-latent checkpoint (no schedule_state)")
    hp = upgrade_hparams({k: v for k, v in ck.get("hyper_parameters", {}).items() if not k.startswith("_")})
    hp["init_from"] = None
    hp.update(overrides)
    module = LatentReasoner(**hp)
    module.load_state_dict(ck["state_dict"])
    module.on_load_checkpoint(ck)
    return module
