"""GRPO on the tiny model: one real step changes the policy, equal rewards change nothing,
the KL reference stays frozen, and the loop runs it end to end."""
import copy
import json

import pytest
import torch

from rlx.algorithms.grpo import GRPO
from rlx.data.stream import ExampleStream, NextBatch
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import Correctness, WeightedSum
from rlx.rollout import sequence_logprobs
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import TASK, TINY, Alternating, Constant, hook, losses, small_config


def setup(reward, **kwargs):
    policy = tiny(**TINY, device="cpu")
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    state = TrainState(policy.model, policy.tokenizer, opt, None, TASK)
    algo = GRPO(WeightedSum({"r": reward}, {"r": 1.0}), group_size=4, max_new_tokens=8, **kwargs)
    return algo, state


def step(algo, state):
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    return batch, loss, metrics




def test_one_step_changes_the_policy():
    algo, state = setup(Alternating())
    before = copy.deepcopy(state.model.state_dict())
    batch, loss, metrics = step(algo, state)
    state.optimizer.step()
    assert torch.isfinite(loss) and batch["input_ids"].shape[0] == 8  # 2 prompts x group 4
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert metrics["reward/mean"] == pytest.approx(0.5) and metrics["rl/response_len"] <= 8


def test_equal_rewards_give_zero_advantage_and_zero_gradient():
    algo, state = setup(Constant())
    batch, loss, _ = step(algo, state)
    assert torch.equal(batch["advantages"], torch.zeros(8))
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in state.model.parameters())


def test_kl_reference_is_frozen_and_zero_at_the_start():
    reference = tiny(**TINY, device="cpu")  # same seed as the policy: same weights
    algo, state = setup(Alternating(), kl_coef=0.1, reference=reference)
    ref_before = copy.deepcopy(reference.model.state_dict())
    _, _, metrics = step(algo, state)
    state.optimizer.step()
    assert metrics["rl/kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(ref_before[k], v) for k, v in reference.model.state_dict().items())


def test_kl_without_reference_is_one_clear_error():
    with pytest.raises(RlxError, match="needs a reference model"):
        GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), kl_coef=0.1)


def test_grpo_runs_in_the_loop(tmp_path):
    cfg = small_config("algo=grpo", "algo.group_size=2", "algo.max_new_tokens=8", "trainer.max_steps=2",
                       "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/mean", "reward/correct", "rl/response_len", "rl/clip_frac", "rl/truncated"} <= set(rows[0])


class OnlySome:
    """Rewards with a spread (1, 0, 1, 0, ...) for problems with an even answer; 0 for all the others."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(i % 2 == 0 and int(ex["answer"]) % 2 == 0) for i, ex in enumerate(examples)])


def test_dynamic_sampling_keeps_only_groups_with_a_spread_and_refills():
    algo, state = setup(OnlySome(), dynamic_sampling=True, max_draws=8)
    train = TASK.split("train")
    assert {int(ex["answer"]) % 2 for ex in train} == {0, 1}  # both kinds exist
    stream = ExampleStream(train, 2, seed=1)  # its first micro-batch has two odd answers
    torch.manual_seed(0)
    batch = algo.make_batch(NextBatch(stream), state)
    groups = batch["advantages"].view(-1, 4)
    assert groups.shape == (2, 4) and (groups.abs().sum(1) > 0).all()  # 2 prompts, each informative
    assert batch["metrics"]["rl/draws"] >= 1 and 0 < batch["metrics"]["rl/groups_with_signal"] <= 1
    assert batch["metrics"]["rl/draws"] > 1 and batch["metrics"]["rl/groups_with_signal"] < 1


def test_grpo_logs_entropy():
    algo, state = setup(Alternating())
    _, _, metrics = step(algo, state)
    assert metrics["rl/entropy"] > 0 and metrics["rl/accuracy"] == 0.0  # an untrained model


def test_minibatches_replay_one_rollout_in_whole_groups_and_keep_the_behaviour_logprobs():
    algo, state = setup(Alternating(), minibatches=2)
    first = algo.make_batch(TASK.split("train")[:2], state)
    second = algo.make_batch(None, state)  # the rollout's second minibatch: it draws no data
    assert not algo._queue
    for mb in (first, second):
        assert mb["input_ids"].shape[0] == 4  # one whole group of 4
        assert mb["advantages"].sum().abs() < 1e-5 and mb["advantages"].abs().min() > 0  # centred in its group
    loss, metrics = algo.loss(first, state)  # the behaviour policy itself: ratio 1, nothing clipped
    assert metrics["rl/clip_frac"] == 0.0
    loss.backward()
    state.optimizer.step()
    moved = sequence_logprobs(state.model, second["input_ids"], second["attention_mask"],
                              second["response_mask"].shape[1])
    mask = second["response_mask"]
    assert not torch.allclose(moved * mask, second["old_logprobs"] * mask)  # the second step sees a ratio != 1


GRPO_RUN = ["algo=grpo", "algo.group_size=2", "algo.max_new_tokens=8", "algo.minibatches=2",
            "trainer.micro_batch_size=2", "trainer.eval_every=0",
            "reward.terms.correct._target_=tests.algorithms.test_grpo.Alternating"]


def test_interrupted_grpo_resumes_mid_rollout_exactly(tmp_path):
    common = [*GRPO_RUN, "trainer.max_steps=4", "trainer.save_every=1"]  # a rollout lasts 2 steps
    run_training(small_config(*common), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(*common, *hook("stop", "tests.support.InterruptAt", step=3)), tmp_path / "cut")
    run_training(small_config(*common, "trainer.resume=auto"), tmp_path / "cut")
    straight = losses(tmp_path / "straight")
    assert straight[1] != 0 and straight[3] != straight[1]  # replayed minibatches: ratio != 1, so it can fail
    assert losses(tmp_path / "cut") == pytest.approx(straight, abs=1e-6)
