"""lightning_latent/rl/rewards.py: the exact-match reward and the reward registry (the answer rules it
applies are tested in test_answers.py)."""
from __future__ import annotations

import pytest
import torch

from lightning_latent import answers
from lightning_latent.rl import rewards
from lightning_latent.rl.rewards import REWARDS, exact_match_reward, get_reward


def test_exact_match_reward_and_registry() -> None:
    r = exact_match_reward(["a\n### 28 <|eos|>", "### 27", "no answer", "#### 1,000.0"],
                           ["28", "28", "28", "1000"])
    assert r.dtype == torch.float32
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert get_reward("exact_match") is exact_match_reward
    assert "exact_match" in REWARDS
    with pytest.raises(ValueError, match="nope.*exact_match"):
        get_reward("nope")
    with pytest.raises(ValueError):
        exact_match_reward(["### 1"], [])


def test_rewards_apply_the_one_set_of_answer_rules() -> None:
    for name in ("extract_answer", "answers_equal", "answer_key", "normalize_answer"):
        assert getattr(rewards, name) is getattr(answers, name), name
    # the gold is normalised like the prediction: "$1,000" and "1000.00" are the same answer
    assert exact_match_reward(["### 1000.00", "### 1000.5"], ["$1,000", "1,000"]).tolist() == [1.0, 0.0]
