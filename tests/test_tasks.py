"""lightning_latent/data/tasks.py, the task registry: built-in tasks dispatch through it, and a new task is one
file (tests/toy_task.py).

``toy_task`` is defined and registered outside the package; nothing under ``lightning_latent`` names it,
yet the datamodule, the from-scratch tokenizer and a whole CoT -> Coconut -> GRPO fit take it (the CLI
too: test_cli.py).
"""
from __future__ import annotations


import lightning as L
import pytest

import toy_task
from lightning_latent.data.datamodule import LatentDataModule
from lightning_latent.data.layout import CurriculumConfig, Layout
from lightning_latent.data.records import Record
from lightning_latent.data.synthetic import DEFAULT_SYNTHETIC
from lightning_latent.data.tasks import TASKS, Task, get_task, register_task, word_vocabulary
from lightning_latent.data.tokenizer import build_word_tokenizer
from lightning_latent.model.build import ModelConfig, build_model, build_tokenizer
from lightning_latent.module import LatentReasoner
from lightning_latent.schedule import Phase

from lightning_latent.rl.update import GRPOConfig

BUILT_IN = ["synthetic", "gsm8k", "gsm8k_aug", "coconut_json"]


def test_built_in_tasks_are_registered_with_the_former_rules():
    assert list(TASKS)[:4] == BUILT_IN
    assert [n for n in BUILT_IN if TASKS[n].needs_path] == ["gsm8k_aug", "coconut_json"]
    assert [n for n in BUILT_IN if TASKS[n].generated] == ["synthetic"]
    assert all(TASKS[n].reward == "exact_match" for n in BUILT_IN)
    assert TASKS["gsm8k"].parse({"question": "q", "answer": "a\n#### 1,000"}, 3) == Record("q", ("a",), "1000", 3)


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"data.task='nope' is unknown; registered tasks: synthetic, gsm8k, "
                                         r"gsm8k_aug, coconut_json, .*toy"):
        LatentDataModule(task="nope")
    with pytest.raises(ValueError, match=r"data.task='gsm8k_aug' needs data.path"):
        LatentDataModule(task="gsm8k_aug")


def test_register_task_refuses_to_shadow_a_task():
    assert register_task(toy_task.TOY) is toy_task.TOY  # the same task again (a re-import): a no-op
    other = Task("synthetic", toy_task.toy_source)
    with pytest.raises(ValueError, match="'synthetic' is already registered"):
        register_task(other)
    assert get_task("synthetic").generated and get_task("synthetic") is not other


def test_toy_task_streams_its_records_and_speaks_its_own_vocabulary():
    dm = LatentDataModule(task="toy", val_limit=3, test_limit=2)
    assert dm.eval_records("validation") == [toy_task.toy_record("validation", i) for i in range(3)]
    assert len(dm.eval_records("test")) == 2
    train = iter(dm.source("train"))
    assert [next(train)["question"] for _ in range(3)] == [toy_task.toy_record("train", i).question for i in range(3)]

    # build_tokenizer asks the registry for a from-scratch model's vocabulary (task=None: synthetic, as before)
    tok = build_tokenizer(ModelConfig(), DEFAULT_SYNTHETIC, task="toy")
    assert len(tok) == 3 + len(toy_task.toy_vocabulary(DEFAULT_SYNTHETIC))  # pad, eos, unk + the toy words
    assert tok.get_vocab() == build_word_tokenizer(word_vocabulary("toy")).get_vocab()
    assert build_tokenizer(ModelConfig(), DEFAULT_SYNTHETIC).get_vocab() == \
        build_tokenizer(ModelConfig(), DEFAULT_SYNTHETIC, task="synthetic").get_vocab()
    layout_tok = build_tokenizer(ModelConfig(), task="toy")
    build_model(ModelConfig(n_layer=1, n_embd=8, n_head=2), layout_tok)  # adds the Coconut markers
    layout = Layout(layout_tok, CurriculumConfig(c_thought=1, max_latent_stage=1))
    q, steps, ans = layout.pieces(toy_task.toy_record("train", 0))
    assert layout_tok.unk_token_id not in q + [t for s in steps for t in s] + ans


class _FirstQuestions(L.Callback):
    def __init__(self) -> None:
        self.questions: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.questions.append(batch[0].question)


def test_a_registered_task_runs_a_whole_fit(tmp_path):
    """CoT, a Coconut stage and a GRPO step on ``toy``, with the toy word tokenizer: the module takes it
    through ``model.tokenizer`` (a saved folder) today, since LatentReasoner does not pass the task to
    ``build_tokenizer`` yet."""
    tok_dir = tmp_path / "toy_tokenizer"
    build_tokenizer(ModelConfig(), task="toy").save_pretrained(tok_dir)
    backbone = ModelConfig(n_layer=1, n_embd=32, n_head=2, tokenizer=str(tok_dir))
    L.seed_everything(0, verbose=False)
    module = LatentReasoner(backbone=backbone, curriculum=CurriculumConfig(c_thought=1, max_latent_stage=1),
                            schedule=[Phase("cot", steps=2), Phase("coconut", steps=1, stages=[1]),
                                      Phase("grpo", steps=1)],
                            batch_size=4, grpo_prompts=2, grpo=GRPOConfig(group_size=2, max_new_tokens=4))
    assert len(module.tokenizer) == len(build_tokenizer(ModelConfig(), task="toy")) + 3  # + the Coconut markers
    seen = _FirstQuestions()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                        check_val_every_n_epoch=None, val_check_interval=1000, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[seen])
    trainer.fit(module, datamodule=LatentDataModule(task="toy", val_limit=4, test_limit=4, eval_batch_size=4))
    assert module.step_count == 4
    assert len(seen.questions) == 4 and all(q.startswith("What is ") for q in seen.questions)
