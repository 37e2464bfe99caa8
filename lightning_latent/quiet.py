"""Known, harmless third-party warnings and notices, silenced in ONE place (each with why).

A default run prints no warning a user cannot act on. Warnings whose cause was ours are fixed at the
cause instead (see CHANGELOG.md): ``weights_only`` is passed to every ``trainer.save_checkpoint``;
:class:`~lightning_latent.callbacks.StepCheckpoint` saves every N steps under manual optimisation
without Lightning's lecture; the phase-end evaluation restores every module's train / eval mode.
Anything not listed here still shows (``tests/integration/test_console.py`` fails if one of these comes back or if
our package warns). :func:`install` is called by the CLI before Lightning starts.
"""
from __future__ import annotations

import logging
import warnings

#: (message regex, category, module regex, why): each passed to ``warnings.filterwarnings("ignore", ...)``.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree",
     "Lightning 2.6's own pytree helper uses a class that torch >= 2.10 deprecates; nothing in this "
     "project touches it and nothing the user does can change it (fixed upstream in later Lightning)."),
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning, r"",
     "intentional: LatentLM keeps the backbone's own modules in eval mode whenever base dropout is off "
     "(the default: rollouts and their replays must be deterministic), e.g. a pretrained backbone; "
     "every training step sets the modes its phase needs (module._enter_segment)."),
)

#: Lightning ``rank_zero_info`` lines that are advertisements, not information about the run.
KNOWN_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("💡 Tip: For seamless cloud logging", "an advertisement for a cloud product, printed by every Trainer"),
)


#: Loggers whose INFO lines are per-file chatter, raised to WARNING where we use them (unless the caller set
#: a level for them: a user who asks for the chatter keeps it).
CHATTY_LOGGERS: tuple[tuple[str, str], ...] = (
    ("tensorboard", ("TensorBoard's event reader logs 'No path found after <event file>' at INFO for every file "
                     "it reads; a study driver logs at INFO and reads hundreds (reporting.read_events)")),
)


def quiet_chatty_loggers() -> None:
    """:data:`CHATTY_LOGGERS` to WARNING, each unless its level was set (idempotent)."""
    for name, _why in CHATTY_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(prefix) for prefix, _ in KNOWN_LOG_LINES)


_FILTER = _DropKnownLines()


def install() -> None:
    """Register the filters (idempotent)."""
    for message, category, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
