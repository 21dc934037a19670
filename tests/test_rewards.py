"""Reward terms and their weighted sum, on hand-written responses."""
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
