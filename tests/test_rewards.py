"""Reward terms and their weighted sum, on hand-written responses."""
import math

import pytest
import torch

from rlx.data.reasoning import ReasoningTask
from rlx.errors import RlxError
from rlx.rewards import Correctness, Format, WeightedSum

TASK = ReasoningTask(num_train=10, num_validation=2, num_test=2)
EX = {"prompt": "4 - 1 - 7 =\n", "answer": "-4", "source": "chain_sum", "question": "4 - 1 - 7 ="}
RESPONSES = ["4 - 1 = 3\n3 - 7 = -4\n#### -4", "4 - 1 = 3\n3 - 7 = -5\n#### -5", "the answer is -4"]


def test_correctness_uses_the_tasks_exact_checker():
    # the third has no '####' but its last number is -4, which the checker accepts
    assert Correctness()(RESPONSES, [EX] * 3, TASK).tolist() == [1.0, 0.0, 1.0]


def test_format_rewards_a_final_answer_line_only():
    assert Format()(RESPONSES, [EX] * 3, TASK).tolist() == [1.0, 1.0, 0.0]


def test_weighted_sum_adds_terms_and_reports_each():
    reward = WeightedSum({"correct": Correctness(), "format": Format()}, {"correct": 1.0, "format": 0.1})
    total, metrics = reward(RESPONSES, [EX] * 3, TASK)
    # [1 + 0.1, 0 + 0.1, 1 + 0]
    assert torch.allclose(total, torch.tensor([1.1, 0.1, 1.0]))
    assert metrics == pytest.approx({"reward/correct": 2 / 3, "reward/format": 2 / 3})


def test_weights_must_name_the_terms():
    with pytest.raises(RlxError, match="must name the same terms"):
        WeightedSum({"correct": Correctness()}, {"corect": 1.0})


def test_length_penalty_is_linear_in_tokens_whatever_the_answer():
    from rlx.rewards import LengthPenalty

    reward = WeightedSum({"correct": Correctness(), "length": LengthPenalty(max_len=64)}, {"correct": 1.0, "length": 0.5})
    total, metrics = reward(RESPONSES, [EX] * 3, TASK, torch.tensor([32, 16, 64]))
    assert total.tolist() == pytest.approx([1 - 0.25, 0 - 0.125, 1 - 0.5])
    assert metrics["reward/length"] == pytest.approx(-(0.5 + 0.25 + 1.0) / 3)


def test_a_correct_long_answer_can_sit_below_its_groups_mean_under_the_naive_penalty():
    # DRPO's argument: short wrong answers pull the group mean above a long correct one
    from rlx.algorithms._rl import group_advantages

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0]) - 0.5 * torch.tensor([64, 2, 10, 10]) / 64
    assert group_advantages(rewards, 4)[0] < 0 < group_advantages(rewards, 4)[3]  # a right answer pushed down


def test_length_penalty_in_a_grpo_config(tmp_path):
    from rlx.tasks import run_training
    from tests.support import small_config

    run_training(small_config("algo=grpo", "reward=length_penalty", "algo.group_size=2", "algo.max_new_tokens=8",
                              "trainer.micro_batch_size=2"), tmp_path)
    assert "reward/length" in (tmp_path / "metrics.jsonl").read_text()


# ---------------------------------------------------------------------------- Ctrl-U


def test_uncertainty_weighting_on_the_notes_values():
    from rlx.rewards import uncertainty_weighted

    # two views 1.2 and 0.8 with s = 0.2: U = 0.16 / 0.08 = 2, weight e^-2, reward e^-2 * 1.0
    r, u = uncertainty_weighted(torch.tensor([[1.2, 1.0], [0.8, 1.0]]), scale=0.2)
    assert u.tolist() == pytest.approx([2.0, 0.0])
    assert r.tolist() == pytest.approx([0.135335, 1.0], abs=1e-6)  # matching views: the plain reward
    # Ctrl-U's two-class toy: P2 = (0.5, 0.5), P1 = (0.9, 0.1): U = 0.510826, weight 0.6
    logit = lambda p: math.log(p / (1 - p))
    r, u = uncertainty_weighted(torch.tensor([[logit(0.9)], [0.0]]), kind="bernoulli")
    assert u.item() == pytest.approx(0.510826, abs=1e-6)
    assert (r / torch.tensor([logit(0.9) / 2])).item() == pytest.approx(0.6, abs=1e-6)


def test_uncertainty_weighting_shrinks_with_disagreement_and_temperature():
    from rlx.rewards import uncertainty_weighted

    agree = uncertainty_weighted(torch.tensor([[1.0], [1.1]]))[0]
    disagree = uncertainty_weighted(torch.tensor([[0.5], [1.6]]))[0]  # same mean, wider apart
    warm = uncertainty_weighted(torch.tensor([[0.5], [1.6]]), temperature=10.0)[0]
    assert disagree < agree and disagree < warm < agree


def test_an_ensemble_of_reward_models_scores_responses(tmp_path):
    from rlx.models import tiny
    from rlx.rewards import RewardModel, UncertainRewardModel, uncertainty_weighted

    paths = []
    for seed in (0, 1):  # any causal LM is a reward model by its EOS logit; two different ones disagree
        policy = tiny(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu", seed=seed)
        policy.model.save_pretrained(tmp_path / f"rm{seed}")
        policy.tokenizer.save_pretrained(tmp_path / f"rm{seed}")
        paths.append(str(tmp_path / f"rm{seed}"))
    term = UncertainRewardModel(paths, scale=0.5, device="cpu")
    got = term(RESPONSES, [EX] * 3, TASK)
    views = torch.stack([RewardModel(p, device="cpu")(RESPONSES, [EX] * 3, TASK) for p in paths])
    assert (views[0] != views[1]).all()
    torch.testing.assert_close(got, uncertainty_weighted(views, scale=0.5)[0])
    with pytest.raises(RlxError, match="two or more"):
        UncertainRewardModel(paths[:1])


# ---------------------------------------------------------------------------- reward=multi (Quark, provisional)


class Values:
    """A term returning fixed values, one per response."""

    def __init__(self, *values):
        self.values = torch.tensor(values)

    def __call__(self, responses, examples, task, lengths=None):
        return self.values


def test_reference_frozen_normalisation_on_the_notes_toy():
    """Frozen mu = (0.5, 10, 0.9), s = (0.1, 5, 0.05): r = (0.6, 20, 0.85) gives z = (1, 2, -1) and,
    with equal weights, R = 2/3."""
    from rlx.rewards import ReferenceNormalized

    reward = ReferenceNormalized({"a": Values(0.4, 0.6, 0.5), "b": Values(5.0, 15.0, 10.0),
                                  "c": Values(0.85, 0.95, 0.9)}, adaptive=False, eps=0.0)
    reward(["x"] * 3, [EX] * 3, TASK)  # the calibration rollout: means (0.5, 10, 0.9), stds (0.1, 5, 0.05)
    mu, s = reward.frozen_stats
    assert mu.tolist() == pytest.approx([0.5, 10.0, 0.9]) and s.tolist() == pytest.approx([0.1, 5.0, 0.05])
    reward.terms = {"a": Values(0.6), "b": Values(20.0), "c": Values(0.85)}
    total, metrics = reward(["y"], [EX], TASK)
    assert reward.normalise(torch.tensor([[0.6], [20.0], [0.85]])).flatten().tolist() == pytest.approx([1, 2, -1])
    assert total.item() == pytest.approx(2 / 3, abs=1e-5)
    assert reward.frozen_stats[0].tolist() == pytest.approx([0.5, 10.0, 0.9])  # frozen after calibration


def test_tri_factor_weights_on_the_notes_toy():
    from rlx.rewards import tri_factor_weights

    w = tri_factor_weights(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 2.0]), torch.ones(3), tau=1.0)
    assert w.tolist() == pytest.approx([0.146963, 0.054065, 0.798973], abs=1e-6)
    # no weakness signal, uniform priority, no redundancy: equal weights
    assert tri_factor_weights(torch.tensor([0.3, -2.0, 1.0]), torch.ones(3), torch.ones(3), tau=0.0).tolist() == \
        pytest.approx([1 / 3] * 3)


def test_redundant_terms_are_down_weighted():
    from rlx.rewards import redundancy_factors

    z = torch.tensor([[1.0, -1.0, 0.5, -0.5], [2.0, -2.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])  # a and b move together
    c = redundancy_factors(z)
    assert c[0].item() == pytest.approx(0.5) and c[1].item() == pytest.approx(0.5) and c[2].item() == pytest.approx(1.0)


def test_a_rescaled_term_changes_nothing():
    """Multiplying one raw reward by 100 leaves its z, the weights and the reward unchanged."""
    from rlx.rewards import ReferenceNormalized

    def run(scale):
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(2, 8, generator=g) for _ in range(4)]
        reward = ReferenceNormalized({"a": None, "b": None}, every=1, rho=0.5)
        out = []
        for x in batches:
            reward.terms = {"a": Values(*(x[0] * scale).tolist()), "b": Values(*x[1].tolist())}
            out.append(reward(["r"] * 8, [EX] * 8, TASK)[0])
        return torch.stack(out), reward.weights

    (plain, w_plain), (scaled, w_scaled) = run(1.0), run(100.0)
    torch.testing.assert_close(plain, scaled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_plain, w_scaled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_plain, torch.full((2,), 0.5))  # the weights did move


def test_multi_reward_resumes_exactly_with_grpo(tmp_path):
    from tests.support import straight_and_resumed

    over = ["algo=grpo", "model=tiny", "reward=multi", "reward.every=1", "algo.group_size=2", "algo.max_new_tokens=8",
            "optimizer.lr=1e-3"]
    full, resumed, a, b = straight_and_resumed(tmp_path, over, steps=4, cut=2)
    assert full["reward/weight_correct"] == resumed["reward/weight_correct"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_prompt_shift_is_constant_per_prompt_and_changes_no_preference():
    from rlx.rewards import PromptShift

    other = {**EX, "prompt": "2 + 2 =\n"}
    shift = PromptShift(scale=3.0, seed=1)(["a", "bb", "ccc"], [EX, EX, other], TASK)
    assert shift[0] == shift[1] != shift[2]  # one value per prompt, whatever the response
    assert torch.equal(shift, PromptShift(scale=3.0, seed=1)(["x", "y", "z"], [EX, EX, other], TASK))
    assert not torch.equal(shift, PromptShift(scale=3.0, seed=2)(["a", "bb", "ccc"], [EX, EX, other], TASK))
