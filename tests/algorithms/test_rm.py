"""The reward model: the Bradley-Terry loss against hand-computed values, the reward read at each
row's last real token, training that separates chosen from rejected on the tiny model, and a
trained checkpoint used as a reward term (`reward=rm`)."""
import json
import math

import pytest
import torch

from rlx.algorithms.rm import RM, bradley_terry_loss, sequence_reward
from rlx.config import build
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import RewardModel
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------------------- pure loss


def test_equal_rewards_give_log_2():
    # r_c - r_r = 0: -log sigma(0) = -log(1/2) = log 2 = 0.693147, whatever the rewards are
    losses, accuracy = bradley_terry_loss(t(0.0, 3.0, -2.0), t(0.0, 3.0, -2.0))
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert accuracy.item() == 0.0  # ties are not counted as correct (r_c > r_r, as TRL)


def test_unit_difference_by_hand():
    # r_c - r_r = 2 - 1 = 1: -log sigma(1) = log(1 + e^-1) = 0.313262
    losses, accuracy = bradley_terry_loss(t(2.0), t(1.0))
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert accuracy.item() == 1.0


def test_margin_by_hand():
    # r_c - r_r - margin = 1 - 1 = 0 -> log 2; with margin 2: -log sigma(-1) = log(1 + e) = 1.313262
    assert bradley_terry_loss(t(2.0), t(1.0), margin=1.0)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert bradley_terry_loss(t(2.0), t(1.0), margin=2.0)[0].item() == pytest.approx(1.313262, abs=1e-6)


def test_centering_by_hand():
    # 0.313262 + 0.01 * (2 + 1)^2 = 0.313262 + 0.09 = 0.403262
    assert bradley_terry_loss(t(2.0), t(1.0), center_coef=0.01)[0].item() == pytest.approx(0.403262, abs=1e-6)
    # rewards summing to zero are not penalised: (0.5 + -0.5)^2 = 0
    plain = bradley_terry_loss(t(0.5), t(-0.5))[0].item()
    assert bradley_terry_loss(t(0.5), t(-0.5), center_coef=1.0)[0].item() == pytest.approx(plain)


def test_accuracy_is_the_fraction_ranked_right():
    # pairs: 1 > 0 yes, 0 > 1 no, 5 > 4 yes, 3 > 3 no (tie) -> 2 / 4
    _, accuracy = bradley_terry_loss(t(1.0, 0.0, 5.0, 3.0), t(0.0, 1.0, 4.0, 3.0))
    assert accuracy.item() == 0.5


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(2.0).requires_grad_(), t(1.0).requires_grad_()
    bradley_terry_loss(chosen, rejected)[0].sum().backward()
    # d/d(r_c) -log sigma(d) = -sigma(-d) = -1 / (1 + e) = -0.268941 at d = 1; opposite for r_r
    assert chosen.grad.item() == pytest.approx(-1 / (1 + math.e), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(1 / (1 + math.e), abs=1e-6)


def test_bad_settings_are_clear_errors():
    with pytest.raises(RlxError, match="center_coef"):
        RM(center_coef=-1.0)
    with pytest.raises(RlxError, match="max_length"):
        RM(max_length=1)


# ---------------------------------------------------------------------------- tiny model


def setup(lr: float = 0.1, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    opt = torch.optim.SGD(policy.model.parameters(), lr=lr)
    return RM(**kwargs), TrainState(policy.model, policy.tokenizer, opt, None, TASK)


def test_sequence_reward_reads_each_rows_last_real_token():
    algo, state = setup()
    batch = algo.make_batch(TASK.split("train")[:3], state)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["num_targets"] == 3 and ids.shape[0] == 6  # 3 chosen rows + 3 rejected rows
    assert batch["num_tokens"] == int(mask.sum())
    assert (mask.sum(-1) < ids.shape[1]).any()  # some row is padded, so "last" is not always -1
    eos = state.tokenizer.eos_token_id
    with torch.no_grad():
        rewards = sequence_reward(state.model, ids, mask, eos)
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            assert ids[i, n - 1] == eos  # lm_batch appends EOS: the reward is read on it
            alone = state.model(input_ids=ids[i:i + 1, :n]).logits[0, -1, eos]  # the unpadded row
            assert rewards[i].item() == pytest.approx(alone.item(), abs=1e-4)
    assert rewards.shape == (6,) and rewards.dtype == torch.float32


def test_steps_raise_accuracy_and_margin():
    algo, state = setup(lr=0.1)
    batch = algo.make_batch(TASK.split("train")[:8], state)
    with torch.no_grad():
        before_loss, before = algo.loss(batch, state)
    for _ in range(20):
        state.optimizer.zero_grad()
        loss, _ = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
    with torch.no_grad():
        after_loss, after = algo.loss(batch, state)
    assert after_loss.item() < before_loss.item()
    assert after["rm/margin"] > before["rm/margin"] and after["rm/margin"] > 0
    assert after["rm/accuracy"] > before["rm/accuracy"] or after["rm/accuracy"] == 1.0
    assert after["rm/accuracy"] >= 0.75


def test_rm_trains_in_the_loop_and_scores_as_a_reward(tmp_path):
    cfg = small_config("algo=rm", "data=reasoning_pairs", "data.num_train=32", "data.num_validation=4",
                       "data.num_test=4", "trainer.max_steps=2", "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "rm/accuracy", "rm/margin", "rm/chosen", "rm/rejected"} <= set(rows[0])
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)

    checkpoint = tmp_path / "checkpoints" / "last"
    examples = TASK.split("train")[:3]
    responses = [ex["chosen"] for ex in examples]
    for where in (checkpoint, tmp_path):  # a checkpoint folder, or the run folder
        term = RewardModel(checkpoint=str(where), batch_size=2, device="cpu")  # 2: scores in two chunks
        scores = term(responses, examples, TASK)
        assert scores.shape == (3,) and torch.isfinite(scores).all()
    # one chunk or two give the same scores (padding does not change a row's reward)
    whole = RewardModel(checkpoint=str(checkpoint), batch_size=64, device="cpu")(responses, examples, TASK)
    assert torch.allclose(scores, whole, atol=1e-4)

    # the documented override reaches the term: reward=rm reward.terms.rm.checkpoint=...
    reward_cfg = small_config("algo=grpo", "data=reasoning_pairs", "reward=rm",
                              f"reward.terms.rm.checkpoint={checkpoint}", "reward.terms.rm.device=cpu")
    total, metrics = build(reward_cfg.reward)(responses, examples, TASK)
    assert torch.allclose(total, whole, atol=1e-4) and metrics["reward/rm"] == pytest.approx(whole.mean().item())


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RlxError, match="does not exist"):
        RewardModel(checkpoint=str(tmp_path / "nope"))


def test_plain_bt_skips_tie_pairs():
    # loss=bt on data with ties: the loss and num_targets are those of the win pairs alone
    tied = ReasoningPairs(ties=0.5, num_train=16, num_validation=2, num_test=2).split("train")
    examples = [ex for ex in tied if not ex["tie"]][:3] + [ex for ex in tied if ex["tie"]][:2]
    algo, state = setup()
    with torch.no_grad():
        batch = algo.make_batch(examples, state)
        assert batch["num_targets"] == 3 and batch["tie"].tolist() == [False] * 3 + [True] * 2
        loss, metrics = algo.loss(batch, state)
        wins_only, _ = algo.loss(algo.make_batch(examples[:3], state), state)
    assert loss.item() == pytest.approx(wins_only.item(), abs=1e-6)
    assert "rm/tie_gap" not in metrics and RM(loss="bt_ties").make_batch(examples, state)["num_targets"] == 5
