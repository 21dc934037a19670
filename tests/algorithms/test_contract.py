"""The algorithm contract, and checks that plausible bugs in the RL losses cannot pass: the KL term's
sign and presence, each loss aggregation by hand, the critic's alignment, k3's clamps, PPO's
minibatch count, and GRPO-lambda's empty selection."""
import inspect
import math

import pytest
import torch

from rlx.algorithms import Algorithm
from rlx.algorithms._rl import kl_penalty
from rlx.algorithms.constrained import Constrained
from rlx.algorithms.dler import DLER
from rlx.algorithms.dot import DOT
from rlx.algorithms.dpo import DPO
from rlx.algorithms.drpo import DRPO
from rlx.algorithms.grpo import GRPO
from rlx.algorithms.grpo_lambda import GRPOLambda
from rlx.algorithms.p3o import P3O
from rlx.algorithms.ppo import PPO, ValueModel
from rlx.algorithms.raco import RACO
from rlx.algorithms.rm import RM
from rlx.algorithms.sft import SFT
from rlx.algorithms.tppo import TPPO
from rlx.data.reasoning import ReasoningTask
from rlx.data.stream import ExampleStream, NextBatch, draw_more
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.rollout import sequence_logprobs
from rlx.state import TrainState
from tests.support import Alternating, Constant

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)
REWARD = WeightedSum({}, {})


def test_every_algorithm_keeps_the_contract():
    critic = tiny(**SMALL, device="cpu")
    algos = [SFT(), DPO(reference=critic), RACO(reference=critic), RM(), GRPO(REWARD), DLER(REWARD), DRPO(REWARD), DOT(REWARD),
             GRPOLambda(REWARD), P3O(REWARD, beta=0.0),
             Constrained(WeightedSum({'c': Constant()}, {'c': 1.0}), {'c': 1.0}, beta=0.0), PPO(REWARD, critic=critic), TPPO(REWARD, critic=critic)]
    for algo in algos:
        assert isinstance(algo, Algorithm), type(algo).__name__
        algo.load_state_dict(algo.state_dict())  # round-trips before any step
        assert isinstance(algo.param_groups(), list)
    assert [len(a.param_groups()) for a in algos[-2:]] == [1, 1]  # the critics


def _state(**kwargs):
    policy = tiny(**SMALL, device="cpu")
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    return TrainState(policy.model, policy.tokenizer, opt, None, TASK)


def _moved_reference():
    reference = tiny(**SMALL, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return reference


def _k3_token_mean(model, reference, batch):
    """KL(pi || pi_ref) by k3 from the definition, exp(ref - logp) - (ref - logp) - 1, token mean."""
    mask = batch["response_mask"]
    args = (batch["input_ids"], batch["attention_mask"], mask.shape[1])
    with torch.no_grad():
        d = sequence_logprobs(reference.model, *args) - sequence_logprobs(model, *args)
    return float(((d.exp() - d - 1) * mask).sum() / mask.sum())


def test_grpo_kl_term_is_added_with_a_positive_sign():
    """Equal rewards: advantage 0, so the loss is the KL term alone: +kl_coef * mean k3 > 0."""
    reference, state = _moved_reference(), _state()
    algo = GRPO(WeightedSum({"r": Constant()}, {"r": 1.0}), group_size=4, max_new_tokens=8, kl_coef=0.5,
                reference=reference)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    loss, metrics = algo.loss(batch, state)
    expected = 0.5 * _k3_token_mean(state.model, reference, batch)
    assert expected > 1e-3 and loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()  # one step down this loss brings the policy toward the reference
    state.optimizer.step()
    assert _k3_token_mean(state.model, reference, batch) < expected / 0.5


def test_ppo_kl_loss_term_is_added_with_a_positive_sign():
    reference, state = _moved_reference(), _state()
    algo = PPO(WeightedSum({"r": Alternating()}, {"r": 1.0}), critic=tiny(**SMALL, device="cpu"), max_new_tokens=8,
               samples_per_prompt=2, epochs=1, minibatches=1, kl_coef=0.5, reference=reference)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    with_kl, _ = algo.loss(batch, state)
    algo.kl_coef = 0.0
    without, _ = algo.loss(batch, state)
    expected = 0.5 * _k3_token_mean(state.model, reference, batch)
    assert expected > 1e-3 and (with_kl - without).item() == pytest.approx(expected, rel=1e-4)


def _hand_batch(model):
    """4 responses of widths 3, 2, 1, 0 tokens after a 3-token prompt, with advantages 1, -2, 0.5, 3."""
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (4, 6))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    attention = torch.cat([torch.ones(4, 3, dtype=torch.long), mask.long()], 1)
    return {"input_ids": ids, "attention_mask": attention, "response_mask": mask,
            "advantages": torch.tensor([1.0, -2.0, 0.5, 3.0]), "metrics": {}}


@pytest.mark.parametrize("loss_agg,expected", [
    # one update per rollout: ratio 1, so every valid token's loss is -A
    ("token_mean", 0.5 / 6),               # -(3*1 + 2*(-2) + 1*0.5) / 6 tokens
    ("seq_mean_token_mean", 0.125),        # -(1 - 2 + 0.5 + 0) / 4 sequences (the empty one counts as 0)
    ("seq_mean_token_sum_norm", 0.5 / 32),  # -(3 - 4 + 0.5) / (4 sequences * max_new_tokens 8): Dr. GRPO
])
def test_grpo_loss_under_each_aggregation_by_hand(loss_agg, expected):
    state = _state()
    algo = GRPO(REWARD, group_size=2, max_new_tokens=8, loss_agg=loss_agg)
    loss, _ = algo.loss(_hand_batch(state.model), state)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_critic_reads_the_value_of_the_state_before_each_response_token():
    """V before response token j sees the prompt and response tokens < j only: changing token j leaves
    values[:, :j + 1] alone and changes values[:, j + 1]. Reading one position late would fail."""
    critic = ValueModel(tiny(**SMALL, device="cpu").model)
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.head.weight)
    ids, mask = torch.randint(3, 40, (1, 8)), torch.ones(1, 8, dtype=torch.long)  # prompt 5, response 3
    base = critic(ids, mask, response_len=3)
    for pos, unchanged in ((4, 0), (5, 1), (6, 2)):  # the last prompt token, response tokens 0 and 1
        other = ids.clone()
        other[0, pos] = 3 + (ids[0, pos] - 3 + 1) % 37
        values = critic(other, mask, 3)
        assert torch.equal(values[:, :unchanged], base[:, :unchanged])
        assert not torch.allclose(values[:, unchanged], base[:, unchanged])


def test_k3_clamps_its_value_and_keeps_its_gradient_finite():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    ref = torch.tensor([2.0, -3.0, 50.0, -1000.0])
    kl = kl_penalty(lp, ref, "k3")
    # e^2 - 2 - 1 = 4.389056; e^-3 + 3 - 1 = 2.049787; beyond: capped at 10
    assert kl.tolist() == pytest.approx([math.e ** 2 - 3, math.e ** -3 + 2, 10.0, 10.0], rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(lp.grad).all()
    huge = torch.tensor([1000.0], requires_grad=True)  # log-ratio beyond the +-20 clamp: exp would overflow
    kl_penalty(torch.zeros(1), huge, "k3").backward()
    assert torch.isfinite(huge.grad).all()


def test_ppo_replays_exactly_epochs_times_minibatches_even_when_rows_do_not_divide():
    """6 responses in 4 minibatches: 2, 2, 1, 1 rows (chunk would give 3 minibatches of 2)."""
    state = _state()
    algo = PPO(WeightedSum({"r": Alternating()}, {"r": 1.0}), critic=tiny(**SMALL, device="cpu"), max_new_tokens=8,
               samples_per_prompt=2, epochs=2, minibatches=4)
    torch.manual_seed(0)
    batches = [algo.make_batch(TASK.split("train")[:3], state)]
    batches += [algo.make_batch(None, state) for _ in range(7)]  # the rest of the rollout draws no data
    assert not algo._queue
    sizes = [b["input_ids"].shape[0] for b in batches]
    assert sorted(sizes[:4]) == sorted(sizes[4:]) == [1, 1, 2, 2]


def test_grpo_lambda_refuses_a_micro_batch_too_small_to_select_any_group():
    state = _state()
    algo = GRPOLambda(WeightedSum({"r": Alternating()}, {"r": 1.0}), group_size=2, max_new_tokens=8, fraction=0.2)
    torch.manual_seed(0)
    with pytest.raises(RlxError, match="selects none.*at least 5 prompts"):
        algo.make_batch(TASK.split("train")[:2], state)  # floor(0.2 * 2) = 0 groups


@pytest.mark.parametrize("variant,methods", [
    (DLER, ["_rollout", "advantages", "loss"]),
    (GRPOLambda, ["_sample", "_rollout", "loss"]),
    (DOT, ["advantages"]),
    (DRPO, []),
])
def test_the_variants_copies_of_grpo_stay_word_for_word(variant, methods):
    """The variants compose GRPO's pieces; the few lines they repeat must not drift apart, and the
    rollout queue's members are one shared definition (`ReplayedRollouts`), not copies."""
    for name in methods:
        assert inspect.getsource(vars(variant)[name]) == inspect.getsource(vars(GRPO)[name]), name
    shared = ("make_batch", "param_groups") if variant is DOT else ("make_batch", "state_dict", "load_state_dict",
                                                                      "param_groups")  # DOT adds its pass rates
    for name in shared:
        assert getattr(variant, name) is getattr(GRPO, name), name


def test_next_batch_draws_more_through_itself_and_a_plain_list_has_none():
    stream, twin = ExampleStream(TASK.split("train"), 2, seed=0), ExampleStream(TASK.split("train"), 2, seed=0)
    first, second = twin.next(), twin.next()
    batch = NextBatch(stream)
    assert draw_more(batch) == second  # the batch's own micro-batch is drawn first, whatever is asked first
    assert list(batch) == first and stream.pos == 4
    assert draw_more(TASK.split("train")[:2]) == []
