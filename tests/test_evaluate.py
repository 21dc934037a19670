"""The benchmarks' statistics against hand-computed values, and sampled answers on the tiny model."""
import math

import pytest

from rlx.evaluate import mean_pass_at_k, mean_se, paired_difference, pass_at_k, proportion_se


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
    assert pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 hold one of the 2 correct
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_mean_pass_at_k():
    correct = [[True, False, False, False], [True, True, False, False]]
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5) / 2)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + (1 - 1 / 6)) / 2)


def test_standard_errors_by_hand():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4))
    m, se = mean_se([7.0])
    assert m == 7.0 and math.isnan(se)
    assert proportion_se(0.5, 100) == pytest.approx(0.05)
    assert proportion_se(0.77, 256) == pytest.approx(math.sqrt(0.77 * 0.23 / 256))


def test_paired_difference():
    before = [True, True, False, False]
    after = [True, False, True, True]  # changes 0, -1, +1, +1
    lift, se = paired_difference(before, after)
    assert lift == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(((0.25**2) + 1.25**2 + 0.75**2 * 2) / 3 / 4))
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_sampled_answers_groups_each_problem():
    from rlx.data.reasoning import ReasoningTask
    from rlx.evaluate import sampled_answers
    from rlx.models import tiny

    model, tokenizer, _ = tiny(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu")
    task = ReasoningTask(max_terms=2)
    examples = task.split("validation")[:3]
    out = sampled_answers(model, tokenizer, task, examples, samples=2, max_new_tokens=4, batch_size=4)
    assert [len(g) for g in out["correct"]] == [2, 2, 2] and len(out["texts"]) == 3
    assert all(1 <= n <= 4 for g in out["lengths"] for n in g)
    again = sampled_answers(model, tokenizer, task, examples, samples=2, max_new_tokens=4, batch_size=4)
    assert again["texts"] == out["texts"]  # the seeded generator: the same draws


def test_rank_statistics_by_hand():
    from rlx.evaluate import concordant, ranks, spearman

    assert ranks([10.0, 20.0, 20.0, 30.0]) == [1.0, 2.5, 2.5, 4.0]
    assert ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert concordant([1, 2, 3], [1, 3, 2]) == (2, 3)
    assert concordant([1, 1], [1, 2]) == (0, 1)  # a tie orders nothing


def test_sampled_metrics_by_hand():
    from rlx.evaluate import sampled_metrics

    out = {"correct": [[True, False], [False, False]], "lengths": [[10, 20], [30, 40]]}
    m = sampled_metrics(out, ks=(1, 2))
    assert m["accuracy"] == 0.25 and m["pass@1"] == 0.25 and m["pass@2"] == 0.5
    assert m["mean_len"] == 25.0 and m["tokens_per_correct"] == 100.0
    assert m["p90_len"] == pytest.approx(37.0)  # linear interpolation between 30 and 40
