"""PPO: per-token rewards by hand, the REINFORCE limit of GAE with a fresh critic, one real step
that trains policy and critic and leaves the reference alone, a rollout replayed without drawing
data, and an interrupted run that resumes mid-rollout exactly."""
import copy
import json

import pytest
import torch

from rlx.algorithms.ppo import PPO, ValueModel, score_rewards
from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import Correctness, WeightedSum
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import Alternating, hook, losses, small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


def test_score_rewards_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.0, -0.1, 0.3]])
    # score on the last valid token (col 1 of row 0, col 2 of row 1), minus 0.5 * kl on every valid token:
    # row 0: [-0.05, 1 - 0.1, 0]; row 1: [0, 0.05, 2 - 0.15]
    expected = torch.tensor([[-0.05, 0.9, 0.0], [0.0, 0.05, 1.85]])
    got = score_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.5)
    assert torch.allclose(got, expected)
    assert torch.equal(score_rewards(torch.tensor([1.0, 2.0]), mask), torch.tensor([[0, 1.0, 0], [0, 0, 2.0]]))


def setup(reward, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    algo = PPO(WeightedSum({"r": reward}, {"r": 1.0}), critic=tiny(**SMALL, device="cpu"), max_new_tokens=8,
               samples_per_prompt=2, **kwargs)
    opt = torch.optim.SGD([{"params": list(policy.model.named_parameters())}, *algo.param_groups()], lr=0.1)
    return algo, TrainState(policy.model, policy.tokenizer, opt, None, TASK)


def test_fresh_critic_values_are_zero_and_aligned():
    critic = ValueModel(tiny(**SMALL, device="cpu").model)
    ids, mask = torch.randint(3, 50, (2, 7)), torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1] * 7])
    values = critic(ids, mask, response_len=3)
    assert values.shape == (2, 3) and not values.any()
    torch.nn.init.ones_(critic.head.weight)  # now V = sum of the hidden state, 0 where masked
    assert critic(ids, mask, 3)[0, 2] == 0 and critic(ids, mask, 3)[1].ne(0).all()


def test_fresh_critic_gae_with_lambda_one_is_reinforce():
    """V = 0, gamma = lam = 1, no whitening: every token's advantage and return is the sequence's score."""
    algo, state = setup(Alternating(), lam=1.0, whiten_advantages=False, epochs=1, minibatches=1)
    torch.manual_seed(0)
    mb = algo.make_batch(TASK.split("train")[:2], state)
    mask = mb["response_mask"]
    row_scores = (mb["returns"] * mask).sum(-1) / mask.sum(-1)  # rows come shuffled: read each one's score
    assert sorted(row_scores.tolist()) == [0.0, 0.0, 1.0, 1.0]  # Alternating: 1, 0 in each group of 2
    assert torch.allclose(mb["advantages"], row_scores[:, None] * mask)
    assert torch.equal(mb["advantages"], mb["returns"])  # A = R - V with V = 0


def test_one_step_trains_policy_and_critic_and_not_the_reference():
    reference = tiny(**SMALL, device="cpu")
    algo, state = setup(Alternating(), kl_coef=0.1, kl_reward_coef=0.05, reference=reference)
    policy_before, ref_before = copy.deepcopy(state.model.state_dict()), copy.deepcopy(reference.model.state_dict())
    head_before = algo.critic.head.weight.clone()
    torch.manual_seed(0)
    mb = algo.make_batch(TASK.split("train")[:2], state)
    loss, metrics = algo.loss(mb, state)
    loss.backward()
    state.optimizer.step()
    assert torch.isfinite(loss) and len(algo._queue) == 2 * 2 - 1  # epochs x minibatches, one handed out
    # first minibatch of a rollout: the policy has not moved, so every ratio is 1
    assert metrics["rl/clip_frac"] == 0 and metrics["rl/approx_kl"] == pytest.approx(0, abs=1e-10)
    assert metrics["rl/kl"] == pytest.approx(0.0, abs=1e-6)  # reference == policy at the start
    assert metrics["rl/value_loss"] > 0 and metrics["rl/entropy"] > 0
    assert any(not torch.equal(policy_before[k], v) for k, v in state.model.state_dict().items())
    assert not torch.equal(head_before, algo.critic.head.weight)
    assert all(torch.equal(ref_before[k], v) for k, v in reference.model.state_dict().items())


def test_kl_without_reference_is_one_clear_error():
    with pytest.raises(RlxError, match="need a reference model"):
        PPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), critic=tiny(**SMALL, device="cpu"), kl_reward_coef=0.05)


# Alternating rewards: an untrained model is never correct, and all-zero rewards make every loss 0
PPO_RUN = ["algo=ppo", "algo.max_new_tokens=8", "algo.epochs=2", "algo.minibatches=2", "trainer.micro_batch_size=2",
           "trainer.eval_every=0", "reward.terms.correct._target_=tests.algorithms.test_grpo.Alternating"]


def test_replaying_a_rollout_draws_no_data_and_logs_every_metric(tmp_path):
    run_training(small_config(*PPO_RUN, "trainer.max_steps=4", "trainer.save_every=4"), tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last" / "trainer_state.pt", weights_only=False)
    assert saved["data"]["pos"] == 2  # 4 steps = 1 rollout (2 prompts) replayed as 2 epochs x 2 minibatches
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = {"reward/mean", "rl/accuracy", "rl/response_len_p90", "rl/truncated", "rl/entropy",
             "rl/clip_frac", "rl/value_loss", "time/batch_s", "time/update_s", "train/tokens_per_s"}
    assert names <= set(rows[0])


def test_interrupted_ppo_resumes_mid_rollout_exactly(tmp_path):
    common = [*PPO_RUN, "trainer.max_steps=6", "trainer.save_every=3"]  # a rollout lasts 4 steps
    run_training(small_config(*common), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(*common, *hook("stop", "tests.support.InterruptAt", step=3)), tmp_path / "cut")
    run_training(small_config(*common, "trainer.resume=auto"), tmp_path / "cut")
    straight = losses(tmp_path / "straight")
    assert len(set(straight)) == len(straight)  # the losses differ, so the comparison can fail
    assert losses(tmp_path / "cut") == pytest.approx(straight, abs=1e-6)


def test_critic_gets_its_own_learning_rate(tmp_path):
    from rlx.config import build
    cfg = small_config(*PPO_RUN, "algo.critic_lr=0.5")
    algo = build(cfg.algo)
    (group,) = algo.param_groups()
    assert group["lr"] == 0.5 and group["params"] and all(p.requires_grad for _, p in group["params"])
