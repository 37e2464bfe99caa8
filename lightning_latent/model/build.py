"""Build the base causal LM and its tokenizer: from the hub, a local folder, or from scratch.

Three ways in, one way out (a model whose vocabulary holds the Coconut tokens, and its tokenizer):

- ``name_or_path`` set: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (hub id or folder);
- ``name_or_path`` unset: a small GPT-2 from scratch with a word-level tokenizer built on the spot over
  the task's vocabulary (:func:`~lightning_latent.data.tasks.word_vocabulary`; the synthetic
  vocabulary unless the task brings its own) and saved with every checkpoint;
- :func:`load_weights` then applies ``init_from`` weights: one of our ``.ckpt`` files, a state dict
  saved by the reference Coconut code (``.pt``, keys ``base_causallm.*``), or an HF folder / hub id.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from ..data.layout import CurriculumConfig, Layout, add_latent_tokens
from ..data.synthetic import SyntheticConfig
from ..data.tasks import word_vocabulary
from ..data.tokenizer import build_word_tokenizer
from .latent_lm import LatentLM, max_positions

log = logging.getLogger("lightning_latent")


@dataclass
class ModelConfig:
    """The base LM. Without ``name_or_path``: GPT-2 from scratch at these sizes (the embedded default)."""

    name_or_path: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.0  # the base model's own dropout; used only in supervised phases
    attn_implementation: str = "sdpa"
    # Recompute each latent pass in backward (torch.utils.checkpoint) instead of keeping its activations:
    # less memory as thoughts grow, about one more forward of the latent window in time. Same gradients.
    checkpoint_latents: bool = False

    def __post_init__(self) -> None:
        for k in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(self, k) < 1:
                raise ValueError(f"backbone.{k}={getattr(self, k)} must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"backbone.n_embd={self.n_embd} must be divisible by backbone.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"backbone.dropout={self.dropout} must be in [0, 1)")


def build_tokenizer(cfg: ModelConfig, synthetic: SyntheticConfig | None = None, task: str | None = None):
    """The run's tokenizer: ``cfg.tokenizer`` / ``cfg.name_or_path`` (hub id or folder) when set, else a
    word-level tokenizer over ``task``'s vocabulary from the registry (``task`` None: the synthetic
    task's, which was the only choice before tasks could bring their own; ``synthetic`` None:
    ``SyntheticConfig()``)."""
    name = cfg.tokenizer or cfg.name_or_path
    if name is None:
        return build_word_tokenizer(word_vocabulary(task, synthetic))
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ValueError(f"cannot load tokenizer {name!r} (hub id or local folder): {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, tokenizer):
    """The base LM with Coconut tokens added (embeddings initialised from an existing token)."""
    if cfg.name_or_path is None:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config._attn_implementation = cfg.attn_implementation
        lm = GPT2LMHeadModel(config)
    else:
        try:
            lm = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, attn_implementation=cfg.attn_implementation)
        except OSError as err:
            raise ValueError(f"cannot load model {cfg.name_or_path!r} (hub id or local folder): {err}") from err
    ids = add_latent_tokens(tokenizer, lm)
    return lm, ids


# -- tokenizer files travel inside checkpoints -------------------------------------------------------
def tokenizer_to_bytes(tokenizer) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(os.listdir(d)):
                tar.add(os.path.join(d, f), arcname=f)
        return buf.getvalue()


def tokenizer_from_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(d, filter="data")
        return AutoTokenizer.from_pretrained(d)


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with a clear message for missing or unreadable files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling error means the same thing to the user
        raise ValueError(f"checkpoint {str(p)!r} is unreadable or corrupt: {type(err).__name__}: {err}") from err


def init_state_dict(path: str) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """Weights (keys of the base LM, e.g. ``transformer.h.0...``) and tokenizer bytes from ``path``.

    Accepts one of our Lightning checkpoints (``.ckpt``), a reference Coconut state dict (``.pt`` with
    ``base_causallm.*`` keys) or an HF model folder / hub id.
    """
    p = Path(path)
    if not p.exists() and (p.suffix in (".ckpt", ".pt", ".pth", ".bin") or str(path).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"init_from={path!r}: checkpoint {str(p)!r} does not exist")
    if p.is_file():
        ck = read_checkpoint(p)
        if "state_dict" in ck:  # ours
            sd = {k[len("model.lm."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.lm.")}
            if not sd:
                raise ValueError(f"checkpoint {path!r} holds no latent LM weights (keys model.lm.*)")
            return sd, ck.get("tokenizer")
        sd = {k[len("base_causallm."):]: v for k, v in ck.items() if k.startswith("base_causallm.")}
        if not sd:
            raise ValueError(f"{path!r} is neither a lightning-latent checkpoint nor a reference Coconut state dict "
                             "(no 'state_dict' and no 'base_causallm.*' keys)")
        return sd, None
    try:
        lm = AutoModelForCausalLM.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"init_from={path!r}: not a file, and not loadable as an HF model: {err}") from err
    return lm.state_dict(), None


def load_weights(lm, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``sd`` into ``lm``; a shape mismatch names the first bad key and both shapes."""
    own = lm.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"init_from={source!r}: weight {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (another model size or vocabulary?)")
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]
    if missing or unexpected:
        raise ValueError(f"init_from={source!r}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    lm.tie_weights()


def build_latent_model(cfg: ModelConfig, curriculum: CurriculumConfig, max_length: int,
                       synthetic: SyntheticConfig | None = None, task: str | None = None,
                       init_from: str | None = None) -> tuple[object, Layout, LatentLM]:
    """(tokenizer, layout, latent LM) of a run: the base LM with the Coconut tokens, ``init_from``'s
    weights (and tokenizer, when the file carries one) applied, and ``max_length`` checked against the
    model's learned positions."""
    init_sd, tok_bytes = init_state_dict(init_from) if init_from is not None else (None, None)
    tokenizer = tokenizer_from_bytes(tok_bytes) if tok_bytes else build_tokenizer(cfg, synthetic, task)
    lm, _ = build_model(cfg, tokenizer)
    if init_sd is not None:
        load_weights(lm, init_sd, init_from)
    layout = Layout(tokenizer, curriculum, max_length)
    limit = max_positions(lm)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the model's {limit} learned positions "
                         f"(n_positions): set --model.max_length {limit} or less")
    model = LatentLM(lm, layout.latent_id, layout.start_id, layout.end_id,
                     feedback=curriculum.mode != "pause_as_thought", checkpoint_latents=cfg.checkpoint_latents)
    return tokenizer, layout, model
