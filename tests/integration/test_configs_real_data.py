"""Smoke runs of the shipped GSM8K and ProsQA configs on real rows (``tests/fixtures/gsm8k`` and
``tests/fixtures/prosqa``: the first rows of each file, see their README.md).

The configs name ``openai-community/gpt2``, which cannot be downloaded here: the test saves a tiny GPT-2
with a byte-level BPE tokenizer trained on the spot from GSM8K text (``save_pretrained``) and points
``--model.backbone.name_or_path`` at it. Everything else comes from the config files (the GRPO recipe,
dynamic sampling, W_V only, bf16-mixed where the config says so), with the step counts and sizes cut
down. CoT -> Coconut -> Dropout-GRPO chain through ``--model.init_from``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GSM8K, PROSQA, REPO as ROOT

RUN = str(ROOT / "experiments" / "run.py")
CONFIGS = ROOT / "experiments" / "configs"
DATA = {"gsm8k": GSM8K, "prosqa": PROSQA}

pytestmark = pytest.mark.slow

SMALL = ["--data.val_limit", "4", "--data.test_limit", "4", "--data.eval_batch_size", "4",
         "--model.evaluation.max_new_tokens", "8", "--model.max_length", "256",
         "--trainer.val_check_interval", "1000", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--checkpoint.every_n_train_steps", "1",
         "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = []
    with open(GSM8K / "train.jsonl") as f:
        for i, line in enumerate(f):
            if i >= 400:
                break
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=1024,
                                    eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    folder = tmp_path_factory.mktemp("hub") / "tiny-gpt2"
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(cwd: Path, *args: str) -> Path:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, RUN, "fit", *args[:2], *SMALL, *args[2:]], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    versions = sorted((cwd / "logs").glob("*/version_*"), key=lambda d: d.stat().st_mtime)
    return versions[-1]


def check_summary(vdir: Path, phases: list[str]) -> None:
    s = json.loads((vdir / "summary.json").read_text())
    assert [r["phase"] for r in s["phases"]] == phases
    for r in s["phases"]:
        assert r["test_n"] == 4 and r["val_n"] == 4 and 0.0 <= r["test_pass@1"] <= 1.0


def test_gsm8k_cot_coconut_dropout_grpo_configs(tmp_path, tiny_gpt2):
    # the configs hold out 500 training rows for validation; the fixture has 300: hold out 50
    data = ["--data.path", str(GSM8K), "--data.val_size", "50", "--model.backbone.name_or_path", str(tiny_gpt2)]
    cot = run(tmp_path, "--config", str(CONFIGS / "gsm8k" / "cot.yaml"), *data, "--model.batch_size", "4",
              "--model.schedule", '[{"kind":"cot","steps":2}]')
    check_summary(cot, ["cot"])
    coco = run(tmp_path, "--config", str(CONFIGS / "gsm8k" / "coconut.yaml"), *data, "--model.batch_size", "4",
               "--model.init_from", str(cot / "checkpoints" / "last.ckpt"),
               "--model.schedule", '[{"kind":"coconut","steps":1,"stages":[1,2,3]},'
                                   '{"kind":"coconut","steps":1,"stages":[4],"name":"coconut_final"}]')
    check_summary(coco, ["start", "coconut", "coconut_final"])  # start: the init_from checkpoint
    grpo = run(tmp_path, "--config", str(CONFIGS / "gsm8k" / "dropout_grpo.yaml"), *data,
               "--model.init_from", str(coco / "checkpoints" / "last.ckpt"), "--model.grpo_prompts", "2",
               "--model.grpo.group_size", "4", "--model.grpo.max_new_tokens", "8", "--model.grpo.max_groups", "2",
               "--model.schedule", '[{"kind":"grpo","steps":2,"name":"dropout_grpo"}]')
    check_summary(grpo, ["start", "dropout_grpo"])
    cfg = (grpo / "config.yaml").read_text()
    assert "trainable: value" in cfg and "dynamic_sampling: true" in cfg and "group_size: 4" in cfg


@pytest.mark.parametrize("task", ["prosqa"])
def test_coconut_json_configs(tmp_path, tiny_gpt2, task):
    # the fixture has valid.json and test.json only: the validation file doubles as training data
    d = tmp_path / "data"
    d.mkdir()
    for name in ("valid.json", "test.json"):
        shutil.copy(DATA[task] / name, d / name)
    shutil.copy(DATA[task] / "valid.json", d / "train.json")
    data = ["--data.path", str(d), "--model.backbone.name_or_path", str(tiny_gpt2), "--model.max_length", "1024"]
    coco = run(tmp_path, "--config", str(CONFIGS / task / "coconut.yaml"), *data, "--model.batch_size", "4",
               "--model.schedule", '[{"kind":"cot","steps":1},{"kind":"coconut","steps":1,"stages":[1]}]')
    check_summary(coco, ["cot", "coconut"])
    grpo = run(tmp_path, "--config", str(CONFIGS / task / "dropout_grpo.yaml"), *data,
               "--model.init_from", str(coco / "checkpoints" / "last.ckpt"), "--model.grpo_prompts", "2",
               "--model.grpo.group_size", "2", "--model.grpo.max_new_tokens", "8",
               "--model.schedule", '[{"kind":"grpo","steps":1,"name":"dropout_grpo"}]')
    check_summary(grpo, ["start", "dropout_grpo"])
