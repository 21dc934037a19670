"""GRPO and PPO learn: on the tiny random model, a reward for writing the digit "1" must rise
well above its starting level within a few dozen steps. A sign error in an advantage, a
misaligned value or log-prob, or a loss that ignores the reward fails this."""
import pytest
import torch

from rlx.algorithms.grpo import GRPO
from rlx.algorithms.ppo import PPO
from rlx.data.reasoning import ReasoningTask
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.state import TrainState

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


class Ones:
    """The fraction of the response's characters that are "1"."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([r.count("1") / max(len(r), 1) for r in responses])


def mean_reward(algo, state, steps: int) -> tuple[float, float]:
    prompts = TASK.split("train")[:4]
    rewards = []
    for _ in range(steps):
        batch = algo.make_batch(prompts, state)
        loss, metrics = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        rewards.append(metrics["reward/mean"])
    return sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3


def build(kind: str):
    torch.manual_seed(0)
    policy = tiny(**SMALL, device="cpu")
    reward = WeightedSum({"ones": Ones()}, {"ones": 1.0})
    if kind == "grpo":
        algo = GRPO(reward, group_size=8, max_new_tokens=8)
        groups = [{"params": list(policy.model.named_parameters())}]
    else:
        algo = PPO(reward, critic=tiny(**SMALL, device="cpu"), samples_per_prompt=8, max_new_tokens=8, epochs=2,
                   minibatches=2, lam=1.0)
        groups = [{"params": list(policy.model.named_parameters())}, *algo.param_groups()]
    opt = torch.optim.Adam(groups, lr=3e-3)
    return algo, TrainState(policy.model, policy.tokenizer, opt, None, TASK)


# PPO replays each rollout for epochs x minibatches = 4 steps: 80 steps are 20 rollouts, GRPO's 40 are 40
@pytest.mark.parametrize("kind,steps", [("grpo", 40), ("ppo", 80)])
def test_reward_rises(kind, steps):
    algo, state = build(kind)
    first, last = mean_reward(algo, state, steps)
    assert last > max(3 * first, 0.2), (first, last)
