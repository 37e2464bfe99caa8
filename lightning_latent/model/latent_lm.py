"""The Coconut latent recurrence over any Hugging Face causal LM, KV-cached and batched.

A continuous thought is the last-layer hidden state (after the final norm) at the previous position;
every ``<|latent|>`` slot gets that vector as its input embedding instead of a token embedding.

One forward runs in three kinds of pass over a shared ``DynamicCache``:

1. the prefix, every column before the first latent slot of any row, in one pass;
2. the latent window, one column per pass: a row whose column is a latent slot takes the hidden
   state of its previous column, any other row takes its token embedding;
3. the rest of the sequence in one pass.

So a latent step computes one new position per row and never recomputes the prefix, and the whole
batch (many prompts x K rollouts) goes through each pass together. Gradients flow through every
thought and through the cache; nothing is detached.

With ``checkpoint_latents`` (gradients on, at least one thought) every pass runs under
``torch.utils.checkpoint``. A plain latent pass keeps, for backward, the full-length K/V that the
cache's concatenation made for it (O(steps x length) memory per layer), and the prefix and last passes
keep all their activations until the end of backward. A checkpointed pass is a pure function of its
input columns and the K/V chunks of the earlier passes (shared, not copied); it keeps only its own new
K/V columns and recomputes the rest in backward, one pass at a time. transformers' own gradient
checkpointing cannot do this: it turns the cache off.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel

from .perturb import POST_LATENT_STEP, Perturber, answer_uniforms, only_factors


@dataclass
class LatentOutput:
    logits: Tensor | None  # [N, T, V] (or the columns from ``logits_from`` on)
    hidden: Tensor  # [N, T, D] last-layer hidden states, after the final norm
    final_thought: Tensor | None  # [N, D] hidden state at each row's last latent slot (zeros if none)
    cache: DynamicCache | None = None


def max_positions(lm: nn.Module) -> int | None:
    """The number of learned absolute positions (GPT-2's ``n_positions``), past which the position
    embedding lookup fails; None for rotary / relative models, which have no hard limit."""
    n = getattr(getattr(lm, "config", None), "n_positions", None)
    return int(n) if isinstance(n, int) else None


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that restart at 0 after left padding (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_layers(cache: DynamicCache) -> list:
    """The per-layer K/V stores of a cache; the checkpointed window supports plain (full) layers only."""
    layers = list(cache.layers)
    for lay in layers:
        if getattr(lay, "is_sliding", False) or not hasattr(lay, "keys"):
            raise NotImplementedError(
                f"model.checkpoint_latents supports full-attention KV caches only, not {type(lay).__name__}")
    return layers


def _unperturbed_if(cond: bool):
    """Without a perturber, no Perturber's hooks may act (one left active by the caller included)."""
    return only_factors(None) if cond else contextlib.nullcontext()


def _cache_from_chunks(config, chunks) -> DynamicCache:
    """A fresh cache holding, per layer, the concatenation of that layer's K and V chunks."""
    cache = DynamicCache(config=config)
    for i, (ks, vs) in enumerate(chunks):
        # ``update`` on an empty layer copies its argument: skip our own ``cat`` for a single chunk
        cache.update(ks[0] if len(ks) == 1 else torch.cat(ks, -2), vs[0] if len(vs) == 1 else torch.cat(vs, -2), i)
    return cache


class LatentLM(nn.Module):
    """Coconut wrapper: ``lm`` is any HF causal LM with ``base_model`` and an output embedding.

    ``feedback=False`` treats latent slots as ordinary (pause) tokens: the ``pause_as_thought`` baseline.
    """

    def __init__(self, lm: PreTrainedModel, latent_id: int, start_id: int, end_id: int, feedback: bool = True,
                 checkpoint_latents: bool = False):
        super().__init__()
        self.lm = lm
        self.latent_id, self.start_id, self.end_id = int(latent_id), int(start_id), int(end_id)
        self.feedback = feedback
        self.checkpoint_latents = checkpoint_latents
        # The base model's name for the KV-cache argument: ``cache`` (transformers >= 5.2x) or
        # ``past_key_values`` (earlier 5.x). Read from the signature because a wrong name is not an error:
        # ``forward(**kwargs)`` swallows it and the model silently runs WITHOUT the cache.
        params = inspect.signature(self.base.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Positions (rows x new columns, padding included) the base model has run, every pass counted
        # (checkpointed recomputation too): the compute an arm spends (callbacks.ComputeMeter).
        self.positions_run = 0

    # The base model's own dropout is never used by rollouts or replays (it would break replay), and
    # Lightning restores submodule modes on its own: the mode of ``lm`` is set explicitly by the caller
    # through :meth:`set_base_dropout`, never implicitly by ``.train()``.
    def train(self, mode: bool = True) -> "LatentLM":
        super().train(mode)
        self.lm.train(mode and getattr(self, "_base_dropout", False))
        return self

    def set_base_dropout(self, on: bool) -> None:
        """Use the base model's own dropout modules (supervised phases only) or keep them off."""
        self._base_dropout = on
        self.lm.train(on and self.training)

    @property
    def base(self) -> nn.Module:
        return self.lm.base_model

    def _run(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache) -> Tensor:
        before = cache.get_seq_length()
        self.positions_run += embeds.shape[0] * embeds.shape[1]
        out = self.base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self.cache_kwarg: cache})
        if cache.get_seq_length() != before + embeds.shape[1]:
            # Every pass must extend the shared cache; otherwise later passes cannot see earlier columns
            # and every result would be silently wrong (seen with a transformers that renamed the argument).
            raise RuntimeError(
                f"the base model {type(self.base).__name__} did not extend the KV cache passed as "
                f"{self.cache_kwarg!r} (length {before} -> {cache.get_seq_length()}, expected "
                f"{before + embeds.shape[1]}); this transformers version's cache argument is not supported")
        return out.last_hidden_state

    def _checkpointed_pass(self, inp: Tensor, attention_mask: Tensor, position_ids: Tensor,
                           chunks: list[tuple[list[Tensor], list[Tensor]]],
                           pert: Perturber | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One pass under ``torch.utils.checkpoint``, as a pure function of ``inp`` and the K/V chunks.

        The perturber's per-pass factors are captured now and used again during the recomputation in
        backward, which runs after the caller's ``perturber.rows`` has ended (or inside another's). Returns the hidden states
        and each layer's new K/V columns (copied, so they do not keep the full-length tensors alive).
        """
        past = [(tuple(ks), tuple(vs)) for ks, vs in chunks]  # a snapshot: the lists grow after this pass
        factors = dict(pert._factors) if pert is not None else {}
        n_new = inp.shape[1]

        def pure(x: Tensor) -> tuple[Tensor, ...]:
            cache = _cache_from_chunks(self.lm.config, past)
            with only_factors(pert, factors):
                h = self._run(x, attention_mask, position_ids, cache)
            new = []
            for lay in _cache_layers(cache):
                new += [lay.keys[:, :, -n_new:].clone(), lay.values[:, :, -n_new:].clone()]
            return (h, *new)

        h, *kv = checkpoint(pure, inp, use_reentrant=False)
        return h, [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        perturber: Perturber | None = None,
        answer_from: int | Tensor | None = None,
        logits_from: int = 0,
        return_cache: bool = False,
    ) -> LatentOutput:
        """Run the recurrence. ``answer_from``: first answer column, one for every row (an int: rollouts and
        replays, whose prompts end in one column) or one per row (an [N] tensor: a supervised batch, whose
        language part starts where each row's head ends). Scope ``latent`` leaves the answer unperturbed, and
        latent ids from there on are ordinary tokens, as in :func:`generate`."""
        n, t = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        embeds = self.lm.get_input_embeddings()(input_ids)
        d = embeds.shape[-1]
        pert = perturber if (perturber is not None and perturber.enabled) else None
        is_lat = (input_ids == self.latent_id) if self.feedback else torch.zeros_like(input_ids, dtype=torch.bool)
        if isinstance(answer_from, Tensor):
            is_lat &= torch.arange(t, device=dev)[None, :] < answer_from.to(dev)[:, None]
        elif answer_from is not None:
            # Answer columns are never thoughts: ``generate`` embeds a sampled ``<|latent|>`` id as an
            # ordinary token, so the replay of that answer must too (else the log-probs differ).
            is_lat[:, answer_from:] = False
        cache = DynamicCache(config=self.lm.config)

        ordinal = is_lat.long().cumsum(-1)  # latent ordinal (1-based) at and after each latent slot
        cols = is_lat.any(0).nonzero().flatten()
        if len(cols):
            w0, w1 = int(cols.min()), int(cols.max()) + 1
            if w0 == 0:
                raise ValueError("a <|latent|> slot in column 0 has no previous hidden state to feed back: "
                                 "every row needs at least one token before its first thought")
        else:
            w0 = w1 = t
        zeros = torch.zeros(n, dtype=torch.long, device=dev)

        def step_at(col: int) -> Tensor:
            if col >= t:
                return zeros
            o = ordinal[:, col]
            return torch.where(is_lat[:, col], o, torch.where(o > 0, torch.full_like(o, POST_LATENT_STEP), o))

        def prepare(c0: int, c1: int, step: Tensor, inp: Tensor) -> Tensor:
            if pert is not None:
                af = None if answer_from is None else answer_from - c0
                pert.begin_pass(step, c1 - c0, af, d, dev, inp.dtype)
                inp = pert.embed(inp)
            return inp

        # Checkpointed passes (see the module doc): only with a latent column, hence at least two passes;
        # a single pass's backward needs all of its activations at once anyway. ``chunks`` holds every earlier pass's K/V.
        ckpt = self.checkpoint_latents and torch.is_grad_enabled() and w1 > w0
        chunks: list[tuple[list[Tensor], list[Tensor]]] = []

        def run_pass(c0: int, c1: int, step: Tensor, inp: Tensor) -> Tensor:
            inp = prepare(c0, c1, step, inp)
            if not ckpt:
                with _unperturbed_if(pert is None):
                    return self._run(inp, attention_mask[:, :c1], position_ids[:, c0:c1], cache)
            h, new_kv = self._checkpointed_pass(inp, attention_mask[:, :c1], position_ids[:, c0:c1], chunks, pert)
            if not chunks:
                chunks.extend(([k], [v]) for k, v in new_kv)
            else:
                for (ks, vs), (k, v) in zip(chunks, new_kv):
                    ks.append(k)
                    vs.append(v)
            return h

        hiddens: list[Tensor] = []
        final_thought = None
        if w0 > 0:
            hiddens.append(run_pass(0, w0, zeros, embeds[:, :w0]))
        if w1 > w0:
            final_thought = torch.zeros(n, d, dtype=embeds.dtype, device=dev)
        for col in range(w0, w1):
            prev = hiddens[-1][:, -1]  # hidden state of column col-1, every row
            lat = is_lat[:, col]
            step = step_at(col)
            fed = prev if pert is None else pert.thought(prev, step)
            inp = torch.where(lat[:, None], fed, embeds[:, col])[:, None]
            h = run_pass(col, col + 1, step, inp)
            hiddens.append(h)
            final_thought = torch.where(lat[:, None], h[:, 0], final_thought)
        if w1 < t:
            # after the window every row is past its latents (POST) or has none (step 0)
            step = torch.where(ordinal[:, -1] > 0, torch.full_like(zeros, POST_LATENT_STEP), zeros)
            hiddens.append(run_pass(w1, t, step, embeds[:, w1:]))
        if ckpt and return_cache:
            cache = _cache_from_chunks(self.lm.config, chunks)
        hidden = torch.cat(hiddens, 1) if len(hiddens) > 1 else hiddens[0]
        # ``.contiguous()``: torch's matmul folds a 3-D input into one GEMM or runs it batched depending on
        # whether the weight requires grad, and on some CPUs (MKL on Intel AVX-512) the two round
        # differently. A slice from ``logits_from`` is not contiguous, so the frozen GRPO reference (no grad)
        # scored the same rows as the policy a few 1e-6 apart at equal weights: a KL gradient from nothing,
        # which Adam scales to lr-sized steps (the ``none`` arm drifted). A contiguous input takes one path.
        logits = self.lm.get_output_embeddings()(hidden[:, logits_from:].contiguous()) if logits_from < t else None
        return LatentOutput(logits, hidden, final_thought, cache if return_cache else None)


@dataclass
class Generation:
    tokens: Tensor  # [N, L] generated ids, pad after each row's EOS
    logprobs: Tensor  # [N, L] log-prob of each generated token under the sampling distribution
    mask: Tensor  # [N, L] 1 on generated tokens (EOS included), 0 after
    final_thought: Tensor | None  # [N, D]


@torch.no_grad()
def generate(
    model: LatentLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    seeds: Tensor | None = None,
    perturber: Perturber | None = None,
) -> Generation:
    """Batched latent prompt + KV-cached answer decoding, per-row EOS.

    Prompts must be left-padded (every row ends at the last column). ``temperature == 0`` is greedy;
    otherwise row n samples with uniforms drawn from its own ``seeds[n]``, so its answer does not
    depend on which rows share the batch. The perturber (if given) must already be active for
    ``seeds`` (``with perturber.rows(seeds)``).
    """
    n, tp = input_ids.shape
    dev = input_ids.device
    limit = max_positions(model.lm)
    if limit is not None and tp + max_new_tokens > limit:
        raise ValueError(f"a prompt of {tp} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{limit} learned positions: shorten the prompts or lower max_new_tokens")
    if temperature > 0 and seeds is None:
        raise ValueError("sampling (temperature > 0) needs one seed per row")
    pos = positions_from_mask(attention_mask)
    out = model(input_ids, attention_mask, pos, perturber=perturber, logits_from=tp - 1, return_cache=True)
    cache = out.cache
    logits = out.logits[:, -1].float()
    pert = perturber if (perturber is not None and perturber.enabled) else None
    has_lat = (input_ids == model.latent_id).any(1) & torch.tensor(model.feedback, device=dev)
    step = torch.where(has_lat, POST_LATENT_STEP, 0).long()
    next_pos = pos[:, -1] + 1
    mask_all = attention_mask
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    toks, lps, msk = [], [], []
    emb = model.lm.get_input_embeddings()
    for t in range(max_new_tokens):
        logp_all = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
        if temperature > 0:
            probs = logp_all.exp()
            cdf = probs.cumsum(-1)
            u = answer_uniforms(seeds.to(dev), t).to(cdf.dtype) * cdf[:, -1]
            tok = torch.searchsorted(cdf, u[:, None]).clamp(max=logits.shape[-1] - 1)[:, 0]
        else:
            tok = logits.argmax(-1)
        lp = logp_all.gather(1, tok[:, None])[:, 0]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        lps.append(torch.where(done, torch.zeros_like(lp), lp))
        msk.append((~done).long())
        done = done | (tok == eos_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask_all = torch.cat([mask_all, torch.ones(n, 1, dtype=mask_all.dtype, device=dev)], 1)
        x = emb(tok)[:, None]
        if pert is not None:
            pert.begin_pass(step, 1, 0, x.shape[-1], dev, x.dtype)
            x = pert.embed(x)
        with _unperturbed_if(pert is None):
            h = model._run(x, mask_all, next_pos[:, None], cache)
        logits = model.lm.get_output_embeddings()(h[:, -1]).float()
        next_pos = next_pos + 1
    return Generation(torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(msk, 1), out.final_thought)
