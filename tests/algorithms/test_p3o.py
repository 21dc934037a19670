"""P3O (rlx/algorithms/p3o.py) against the paper note's hand values, its limits, the pairwise policy
gradient of the paper's Eq. 6 taken by another path, and the shift invariance the paper is about."""
import math

import pytest
import torch

from rlx.algorithms import Algorithm
from rlx.algorithms.p3o import P3O, kl_regularised_rewards, p3o_loss, pair_deltas
from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.rollout import sequence_logprobs
from rlx.state import TrainState
from tests.support import small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


class LengthReward:
    """A reward that differs between the two responses of a pair: their length in characters / 4
    (exact in binary, so adding a shift loses no bits)."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([len(r) / 4 for r in responses])


class ShiftedPerPrompt(LengthReward):
    """The same reward plus a constant c(x) per prompt: what a Bradley-Terry RM cannot tell apart."""

    def __call__(self, responses, examples, task, lengths=None):
        shift = torch.tensor([float(hash(ex["prompt"]) % 1000) - 500.0 for ex in examples])
        return super().__call__(responses, examples, task) + shift


def reward(term) -> WeightedSum:
    return WeightedSum({"r": term}, {"r": 1.0})


# ---------------------------------------------------------------------------- the note's values


def test_hand_computed_losses():
    """r = (2.0, 0.5), KL terms (0.3, 0.1) -> Delta 0.65; log-ratios +0.1, -0.05, eps 0.2."""
    R = kl_regularised_rewards(torch.tensor([2.0, 0.5]), torch.tensor([0.3, 0.1]), torch.tensor([0.0, 0.0]), beta=1.0)
    delta = pair_deltas(R)
    assert delta.item() == pytest.approx(0.65)
    ratio = torch.tensor([0.1, -0.05])
    assert p3o_loss(ratio, delta, 0.2, "separate")[0].item() == pytest.approx(-0.100062, abs=1e-6)
    assert p3o_loss(ratio, delta, 0.2, "joint")[0].item() == pytest.approx(-0.755192, abs=1e-6)


def test_clipped_terms_have_no_gradient():
    delta = torch.tensor([0.65])
    ratio = torch.tensor([0.3, 0.0], requires_grad=True)  # rho1 = 1.3499 > 1.2 with Delta > 0
    loss, clip_frac = p3o_loss(ratio, delta, 0.2, "separate")
    loss.backward()
    # the y1 term is clip * Delta = 1.2 * 0.65 = 0.78; y2's is rho2 * (-Delta) = -0.65, unclipped
    assert loss.item() == pytest.approx(-(0.78 - 0.65), abs=1e-6)
    assert ratio.grad[0].item() == 0.0 and ratio.grad[1].item() == pytest.approx(0.65)
    assert clip_frac.item() == 0.5
    joint = torch.tensor([0.3, -0.05], requires_grad=True)  # rho12 = exp(0.35) = 1.419 > 1.2
    loss, clip_frac = p3o_loss(joint, delta, 0.2, "joint")
    loss.backward()
    assert loss.item() == pytest.approx(-0.78, abs=1e-6) and joint.grad.abs().max().item() == 0.0
    assert clip_frac.item() == 1.0


def test_separate_clipping_does_not_depend_on_the_order_of_the_pair():
    ratio, delta = torch.tensor([0.15, -0.3, 0.02, 0.4]), torch.tensor([0.65, -0.2])
    swapped = ratio.view(-1, 2).flip(1).flatten()
    assert p3o_loss(ratio, delta)[0].item() == pytest.approx(p3o_loss(swapped, -delta)[0].item(), abs=1e-7)


def test_equal_rewards_give_no_gradient():
    delta = pair_deltas(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    ratio = torch.tensor([0.1, -0.2, 0.05, 0.3], requires_grad=True)
    for clip in ("separate", "joint"):
        loss, _ = p3o_loss(ratio, delta, 0.2, clip)
        (grad,) = torch.autograd.grad(loss, ratio)
        assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


# ---------------------------------------------------------------------------- on a model


def _state(seed=0):
    policy = tiny(**SMALL, device="cpu", seed=seed)
    return TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)


def _loss_and_grads(algo, state, examples):
    torch.manual_seed(0)
    batch = algo.make_batch(examples, state)
    state.model.zero_grad()
    loss, metrics = algo.loss(batch, state)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in state.model.named_parameters()}, batch, metrics


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_first_gradient_is_the_pairwise_policy_gradient(clip):
    """At theta = theta_old: grad L = -mean_pairs Delta (grad log pi(y1) - grad log pi(y2)), Eq. 6,
    here from the sequence log-probabilities directly."""
    state = _state()
    algo = P3O(reward(LengthReward()), max_new_tokens=12, clip=clip, beta=0.0)
    _, grads, batch, _ = _loss_and_grads(algo, state, TASK.split("train")[:3])
    delta = batch["delta"][0::2]
    assert delta.abs().max() > 0
    state.model.zero_grad()
    mask = batch["response_mask"]
    seq = (sequence_logprobs(state.model, batch["input_ids"], batch["attention_mask"], mask.shape[1]) * mask).sum(-1)
    ppg = -(delta * (seq[0::2] - seq[1::2])).mean()
    ppg.backward()
    for n, p in state.model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_per_prompt_shift_of_the_reward_changes_nothing():
    """The paper's Definition 1: r and r + c(x) give the same Delta, loss and gradient, exactly."""
    plain = _loss_and_grads(P3O(reward(LengthReward()), max_new_tokens=12, beta=0.0), _state(),
                            TASK.split("train")[:3])
    shifted = _loss_and_grads(P3O(reward(ShiftedPerPrompt()), max_new_tokens=12, beta=0.0), _state(),
                              TASK.split("train")[:3])
    assert plain[0] == shifted[0]  # 0 at theta = theta_old under V1 (Delta - Delta): the gradient is what moves
    assert max(g.abs().max().item() for g in plain[1].values()) > 0
    for n in plain[1]:
        assert torch.equal(plain[1][n], shifted[1][n]), n
    assert torch.equal(plain[2]["delta"], shifted[2]["delta"])


def test_the_kl_to_the_reference_enters_the_reward():
    """With beta > 0 and an equal reward, Delta is -beta/2 times the difference of the pair's
    sequence log-ratios to the reference (here a moved copy of the policy)."""
    state, reference = _state(), tiny(**SMALL, device="cpu", seed=1)
    algo = P3O(reward(lambda responses, examples, task, lengths=None: torch.ones(len(responses))),
               max_new_tokens=12, beta=0.5, reference=reference)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    mask = batch["response_mask"]
    args = (batch["input_ids"], batch["attention_mask"], mask.shape[1])
    with torch.no_grad():
        log_ratio = ((sequence_logprobs(state.model, *args) - sequence_logprobs(reference.model, *args)) * mask).sum(-1)
    expected = -0.5 * (log_ratio[0::2] - log_ratio[1::2]) / 2
    torch.testing.assert_close(batch["delta"][0::2], expected, rtol=1e-4, atol=1e-5)
    assert batch["metrics"]["rl/kl"] == pytest.approx(log_ratio.mean().item(), rel=1e-4)


def test_settings_are_checked():
    assert isinstance(P3O(reward(LengthReward()), beta=0.0), Algorithm)
    with pytest.raises(RlxError, match="algo.clip"):
        P3O(reward(LengthReward()), clip="both", beta=0.0)
    with pytest.raises(RlxError, match="reference"):
        P3O(reward(LengthReward()), beta=0.1)


def test_runs_in_the_loop_and_resumes_exactly(tmp_path):
    from tests.support import straight_and_resumed

    over = ["algo=p3o", "model=tiny", "algo.max_new_tokens=8", "algo.epochs=2", "optimizer.lr=1e-3",
            "reward=length_penalty", "reward.terms.length.max_len=8"]
    full, resumed, a, b = straight_and_resumed(tmp_path, over, steps=4, cut=1)  # the cut lands inside a rollout
    assert math.isfinite(full["train/loss"]) and "p3o/delta" in full
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert small_config(*over).algo.reference is not None
