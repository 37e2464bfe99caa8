"""Shared fixtures: tiny GPT-2 models, the synthetic word tokenizer with the Coconut tokens, layouts, the
paths of the data shipped in ``tests/fixtures`` and a trained tiny CoT start.

``tests/`` is on ``sys.path`` for every test (this file's folder), so the tests under ``tests/integration``
and ``tests/experiments`` import these helpers (``from conftest import ...``) and the helper modules
(``faults``, ``toy_task``, ``toy_arm``, ``golden``, ``cot_start``) as the top-level ones do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_latent.data.layout import CurriculumConfig, Layout, add_latent_tokens
from lightning_latent.data.synthetic import SyntheticConfig, synthetic_record, synthetic_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.latent_lm import LatentLM

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent  # the repository root (experiments/, docs/, benchmarks/, notebooks/)
FIXTURES = TESTS / "fixtures"
# Outputs of the reference Coconut implementation (provenance in the folder's README.md); part of the repository.
FIXTURE_DIR = FIXTURES / "coconut_reference"
# Real data, cut to a few hundred rows and part of the repository (sources, licences and cuts in each
# folder's README.md): GSM8K train.jsonl (300 rows) / test.jsonl (100), ProsQA valid.json / test.json (100 each).
GSM8K = FIXTURES / "gsm8k"
PROSQA = FIXTURES / "prosqa"

torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine


def tiny_gpt2(vocab_size: int, seed: int = 0, dtype=torch.float32, n_layer: int = 2, n_embd: int = 32,
              n_head: int = 2, n_positions: int = 128, init_range: float = 0.2) -> GPT2LMHeadModel:
    """A random tiny GPT-2 (all dropout 0, eval mode). A large init range makes logits and hidden
    states far from uniform so that differences between implementations are visible."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     initializer_range=init_range, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    cfg._attn_implementation = "eager"
    lm = GPT2LMHeadModel(cfg).to(dtype)
    lm.eval()
    return lm


@pytest.fixture(scope="session")
def word_tokenizer():
    """The synthetic task's word-level tokenizer with the three Coconut tokens added."""
    tok = build_word_tokenizer(synthetic_vocabulary(SyntheticConfig()))
    lm = tiny_gpt2(len(tok))
    add_latent_tokens(tok, lm)
    return tok


@pytest.fixture()
def make_latent_lm(word_tokenizer):
    """Factory: a tiny GPT-2 LatentLM over the word tokenizer (vocabulary incl. Coconut tokens)."""

    def make(seed: int = 0, dtype=torch.float32, feedback: bool = True, **kw) -> LatentLM:
        tok = word_tokenizer
        lm = tiny_gpt2(len(tok), seed=seed, dtype=dtype, **kw)
        lay = Layout(tok, CurriculumConfig(c_thought=2, max_latent_stage=3))
        m = LatentLM(lm, lay.latent_id, lay.start_id, lay.end_id, feedback=feedback)
        m.eval()
        return m

    return make


@pytest.fixture()
def layout(word_tokenizer):
    return Layout(word_tokenizer, CurriculumConfig(c_thought=1, max_latent_stage=3), max_length=256)


@pytest.fixture(scope="session")
def synth_records():
    cfg = SyntheticConfig()
    return [synthetic_record(cfg, "train", i) for i in range(8)]


@pytest.fixture(scope="session")
def coconut_fixture():
    # The fixture is in the repository: a missing file is an error, never a reason to skip.
    path = FIXTURE_DIR / "expected.json"
    if not path.exists() or not (FIXTURE_DIR / "model.safetensors").exists():
        pytest.fail(f"reference fixture missing from the repository: {FIXTURE_DIR} (see tests/fixtures/"
                    "coconut_reference/README.md)", pytrace=False)
    return json.loads(path.read_text())


def run_cli_cases(cases: list[list[str]], cwd: Path, env: dict | None = None, timeout: int = 600) -> list[dict]:
    """Each argument list through the CLI, all in one process (``tests/cli_many.py``): per case ``{"rc",
    "stderr"}`` as a process of its own would have reported them. For inputs the CLI refuses before training."""
    import os
    import subprocess
    import sys

    f = cwd / "cli_cases.json"
    f.write_text(json.dumps(cases))
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run([sys.executable, str(TESTS / "cli_many.py"), str(f)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=e, check=False)
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"rc"')]
    assert p.returncode == 0 and len(lines) == len(cases), p.stderr[-4000:]
    return lines


def tiny_trainer(root, **overrides):
    """A CPU Trainer for in-process tiny fits: the schedule decides the length (one epoch per segment),
    no logger, checkpoints or progress bar unless asked for."""
    import lightning as L

    kw = dict(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
              check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(root))
    kw.update(overrides)
    return L.Trainer(**kw)


def write_gsm8k_folder(d: Path, n_train: int = 60, n_test: int = 8, bad: int = 3) -> None:
    """A local GSM8K-layout folder (train.jsonl / test.jsonl) from synthetic records, plus ``bad`` malformed
    training lines (not JSON, no '####', no question) that a run must count and skip."""
    cfg = SyntheticConfig(max_number=20, max_value=60)
    d.mkdir(parents=True, exist_ok=True)

    def row(r):
        return json.dumps({"question": r.question, "answer": "\n".join(r.steps) + f"\n#### {r.answer}"})

    lines = [row(synthetic_record(cfg, "train", i)) for i in range(n_train)]
    bad_lines = ["{not json", json.dumps({"question": "q", "answer": "no marker"}), json.dumps({"answer": "#### 3"})]
    for j in range(bad):
        lines.insert(7 * (j + 1), bad_lines[j % 3])
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "test.jsonl").write_text("\n".join(row(synthetic_record(cfg, "test", i)) for i in range(n_test)) + "\n")


@pytest.fixture(scope="session")
def cot_ckpt(tmp_path_factory):
    """A tiny GPT-2 trained for 150 CoT steps on one-step additions (``cot_start.py``), saved as a checkpoint:
    a model that scores > 0, so its GRPO groups are mixed before anything goes wrong. Trained once per session."""
    import lightning as L

    from cot_start import fit, tiny
    from lightning_latent.schedule import Phase

    root = tmp_path_factory.mktemp("cot")
    L.seed_everything(0, verbose=False)
    m = tiny([Phase("cot", steps=150)], batch_size=32)
    t = fit(m, root)
    path = root / "cot.ckpt"
    t.save_checkpoint(str(path))
    return str(path)
