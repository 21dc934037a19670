"""DOT: the hand-computed cut-offs, the gate, re-scoring after a cut, masking, PDS arithmetic and
its one-round sampling, KL-Cov, the GRPO limit, one real step, a run in the loop and an exact resume."""
import copy
import json
import math
import statistics

import pytest
import torch

from rlx.algorithms._rl import aggregate
from rlx.algorithms._sampling import Scored
from rlx.algorithms.dot import (
    DOT,
    kl_cov_loss,
    outlier_cutoffs,
    pds_factor,
    prompts_to_draw,
    truncation_rows,
)
from rlx.algorithms.grpo import GRPO
from rlx.data.reasoning import ReasoningTask
from rlx.data.stream import ExampleStream, NextBatch
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import Correctness, LengthPenalty, WeightedSum
from rlx.rollout import Rollout
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import hook, losses, small_config

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


# ---------------------------------------------------------------------------- 1. hand-computed cut-offs


def test_one_outlier_in_a_group_of_8_inflates_the_std_and_nothing_is_cut():
    # mean 1910 / 8 = 238.75, sample std 308.24: T = floor(238.75 + 3 * 308.24) = floor(1163.47) = 1163 > 1000
    lengths = torch.tensor([100, 110, 120, 130, 140, 150, 160, 1000])
    cutoffs = outlier_cutoffs(lengths, torch.ones(8), 8, alpha=3.0, success_threshold=1.0)
    assert statistics.stdev(lengths.tolist()) == pytest.approx(308.24, abs=0.005)
    assert cutoffs.tolist() == [1163]
    assert not truncation_rows(lengths, cutoffs, 8, margin=32).any()


def test_in_a_group_of_32_the_outlier_is_cut_to_605():
    # mean (31 * 100 + 1000) / 32 = 128.125; sample variance (31 * 28.125^2 + 871.875^2) / 31 = 25312.5,
    # std 159.10: T = floor(128.125 + 3 * 159.099) = floor(605.42) = 605, and 1000 - 605 = 395 >= 32
    lengths = torch.tensor([100] * 31 + [1000])
    cutoffs = outlier_cutoffs(lengths, torch.ones(32), 32, alpha=3.0, success_threshold=1.0)
    assert cutoffs.tolist() == [605]
    assert truncation_rows(lengths, cutoffs, 32, margin=32).nonzero().flatten().tolist() == [31]


@pytest.mark.parametrize("margin, cut", [
    (32, [True, False, False]),   # 395 >= 32; 16 and 15 are not
    (16, [True, True, False]),
    (0, [True, True, True]),      # any row past T
    (0.3, [True, False, False]),  # 300 of 1000 <= 395; 186 of 621 > 16
    (0.01, [True, True, False]),  # 1% is 10 and 6 tokens: the floor of 16 applies
    (0.5, [False, False, False]),  # 500 > 395
])
def test_margin_is_tokens_or_a_fraction_of_the_length_with_a_floor_of_16(margin, cut):
    lengths = torch.tensor([1000, 621, 620])  # past T = 605 by 395, 16 and 15
    assert truncation_rows(lengths, torch.tensor([605.0], dtype=torch.float64), 3, margin).tolist() == cut


# ---------------------------------------------------------------------------- 2. gating


def test_a_group_with_31_of_32_correct_is_never_cut():
    lengths, correct = torch.tensor([100] * 31 + [1000]), torch.ones(32)
    correct[0] = 0.0
    cutoffs = outlier_cutoffs(lengths, correct, 32, alpha=3.0, success_threshold=1.0)
    assert cutoffs.isinf().all() and not truncation_rows(lengths, cutoffs, 32, 32).any()
    assert outlier_cutoffs(lengths, correct, 32, alpha=3.0, success_threshold=31 / 32).tolist() == [605]


# ---------------------------------------------------------------------------- synthetic rollouts


class MarkTask:
    """A checker that accepts a response with a '!' anywhere in it."""

    def score(self, response, example):
        return float("!" in response)


class EndsWithMark:
    """A reward that checks the final token: 1 if the response ends in '!'."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(r.endswith("!")) for r in responses])


REWARD = WeightedSum({"mark": EndsWithMark(), "len": LengthPenalty(1000)}, {"mark": 1.0, "len": 0.0})
OUTLIER_BROKEN = "a" * 999 + "!"  # the cut at 605 removes the only '!'
OUTLIER_KEPT = "a" * 50 + "!" * 950  # the cut at 605 still ends in '!'


def group(outlier: str) -> list[str]:
    return ["a" * 99 + "!"] * 31 + [outlier]  # all correct; 31 rows of 100 tokens, one of 1000


def scored_from_texts(texts, examples, reward, task, tok) -> Scored:
    """What sample_and_score returns for these responses (prompt: one BOS token each)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    B, R = len(ids), max(map(len, ids))
    response_ids, mask = torch.full((B, R), tok.pad_token_id), torch.zeros(B, R, dtype=torch.long)
    for i, row in enumerate(ids):
        response_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    rollout = Rollout(torch.full((B, 1), tok.bos_token_id), torch.ones(B, 1, dtype=torch.long), response_ids, mask,
                      torch.zeros(B, R), torch.ones(B, dtype=torch.bool))
    lengths = mask.sum(-1).float()
    rewards, metrics = reward(texts, examples, task, lengths)
    correct = torch.tensor([task.score(t, ex) for t, ex in zip(texts, examples)])
    metrics = {**metrics, "reward/mean": rewards.mean().item(), "rl/response_len": lengths.mean().item()}
    return Scored(examples, rollout, rewards, correct, metrics)


@pytest.fixture
def canned(monkeypatch):
    """Sampling replaced by fixed responses: prompt {"id": k} gets the group of texts GROUPS[k]."""
    groups = {}

    def sample_and_score(examples, state, reward, *, n, **_):
        rows = [ex for ex in examples for _ in range(n)]
        texts = [t for ex in examples for t in groups[ex["id"]]]
        return scored_from_texts(texts, rows, reward, state.task, state.tokenizer)

    monkeypatch.setattr("rlx.algorithms.dot.sample_and_score", sample_and_score)
    return groups


def char_state():
    return TrainState(None, tiny(**SMALL, device="cpu").tokenizer, None, None, MarkTask())


def paper_dot(**kwargs):
    """The paper's cut (alpha 3, m 32, G 32) with one-round sampling of exactly the micro-batch."""
    return DOT(REWARD, alpha=3.0, margin=32, group_size=32, pds_init=1.0, pds_min=1.0, pds_max=1.0,
               minibatches=1, **kwargs)


# ---------------------------------------------------------------------------- 3. re-scoring, 4. masking


def test_a_cut_before_the_final_token_zeroes_reward_and_correctness_and_masks_the_tail(canned):
    canned[0] = group(OUTLIER_BROKEN)
    scored = paper_dot()._sample([{"id": 0}], char_state())
    assert scored.rollout.lengths.tolist() == [100] * 31 + [605]
    assert scored.rewards[31] == 0 and scored.correct[31] == 0 and scored.rewards[:31].eq(1).all()
    assert not scored.rollout.finished[31] and scored.rollout.finished[:31].all()
    _, attention = scored.rollout.sequences()
    assert attention[31].sum() == 1 + 605  # the prompt token and the first T(q) response tokens
    m = scored.metrics
    assert m["truncation/actually_truncated"] == 1 and m["truncation/easy_ratio"] == 1.0
    assert m["truncation/broken_answer_ratio"] == pytest.approx(1 / 32)
    assert m["rl/accuracy"] == pytest.approx(31 / 32) and m["reward/mean"] == pytest.approx(31 / 32)
    assert m["rl/response_len"] == pytest.approx((3100 + 605) / 32)
    assert m["reward/len"] == pytest.approx(-(3100 + 605) / 32 / 1000)  # a term's mean after the cut


def test_a_cut_that_keeps_the_answer_keeps_reward_1_and_the_filter_drops_that_group(canned):
    canned[0], canned[1] = group(OUTLIER_BROKEN), group(OUTLIER_KEPT)
    algo = paper_dot()
    scored, extra = algo._informative([{"id": 0}, {"id": 1}], char_state())
    assert [ex["id"] for ex in scored.examples] == [0] * 32  # only the group the cut broke
    assert scored.rewards.tolist() == [1.0] * 31 + [0.0]
    assert scored.metrics["truncation/actually_truncated"] == 2  # both outliers were cut
    assert scored.metrics["truncation/broken_answer_ratio"] == pytest.approx(1 / 64)
    assert extra["rl/groups_with_signal"] == 0.5 and algo._pass_rates == [0.5]


def test_cut_tokens_and_an_all_masked_row_add_no_loss_and_no_gradient():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # row 1 cut after 2 tokens, row 2 empty
    old = torch.randn(3, 4)
    logprobs = (old + 0.1 * torch.randn(3, 4)).requires_grad_()
    advantages = torch.tensor([1.0, -2.0, 3.0])
    per_token, selected = kl_cov_loss(logprobs, old, advantages, mask, ratio=0.5, coef=1.0)
    aggregate(per_token, mask, "seq_mean_token_mean").backward()
    assert per_token[mask == 0].eq(0).all() and logprobs.grad[mask == 0].eq(0).all()
    assert logprobs.grad[mask == 1].ne(0).all() and not (selected & (mask == 0)).any()
    garbage = torch.where(mask.bool(), logprobs.detach(), -math.inf)  # what masked positions hold does not matter
    again, _ = kl_cov_loss(garbage, old, advantages, mask, ratio=0.5, coef=1.0)
    assert torch.equal(again, per_token.detach())


# ---------------------------------------------------------------------------- 5. PDS


@pytest.mark.parametrize("history, factor", [
    ([0.5, 0.5], 2.0),      # 1 / 0.5 * (1 + 0)
    ([0.25, 0.75], 2.5),    # mean 0.5, population std 0.25: 2 * 1.25
    ([], 1.5),              # no history: the initial factor
    ([0.0, 0.0], 5.0),      # nothing passed: the maximum
    ([1.0, 1.0], 1.2),      # 1.0 clipped up to the minimum
    ([0.1], 5.0),           # 10 clipped down to the maximum
])
def test_pds_factor_by_hand(history, factor):
    assert pds_factor(history, f_init=1.5, f_min=1.2, f_max=5.0) == pytest.approx(factor)


def test_prompts_drawn_are_ceil_of_b_times_f():
    assert [prompts_to_draw(4, 1.5), prompts_to_draw(4, 1.2), prompts_to_draw(5, 1.2), prompts_to_draw(32, 1.2),
            prompts_to_draw(4, 1.0)] == [6, 5, 6, 39, 4]


def test_pds_history_keeps_the_last_window_and_survives_state_dict(canned):
    canned[0], canned[1] = group(OUTLIER_BROKEN), group("a" * 99 + "!")  # one group broken, one uniform
    algo, state = paper_dot(pds_history=2), char_state()
    for prompts in ([{"id": 0}, {"id": 1}], [{"id": 1}, {"id": 1}], [{"id": 0}, {"id": 0}]):
        algo._informative(prompts, state)
    assert algo._pass_rates == [0.0, 1.0]  # 0.5 fell out of the window of 2
    fresh = paper_dot(pds_history=2)
    fresh.load_state_dict(copy.deepcopy(algo.state_dict()))
    assert fresh._pass_rates == [0.0, 1.0]


class LastGroupSpread:
    """Rewards 1, 0, 1, 0 for the last group of 4 in the batch, 0 for every other row."""

    def __call__(self, responses, examples, task, lengths=None):
        n = len(responses)
        return torch.tensor([float(i >= n - 4 and i % 2 == 0) for i in range(n)])


class Alternating:
    """Rewards 1, 0, 1, 0, ... so every group has a spread."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(i % 2 == 0) for i in range(len(responses))])


def setup(reward, **kwargs):
    policy = tiny(**SMALL, device="cpu")
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    kwargs = {"group_size": 4, "max_new_tokens": 8, "minibatches": 1, **kwargs}
    return DOT(WeightedSum({"r": reward}, {"r": 1.0}), **kwargs), state


def test_pds_samples_one_round_from_the_stream_and_trains_on_the_survivors():
    algo, state = setup(LastGroupSpread())
    train = TASK.split("train")
    stream, twin = ExampleStream(train, 2, seed=1), ExampleStream(train, 2, seed=1)
    twin.next()
    third = twin.next()[0]  # ceil(2 * 1.5) = 3 prompts: the micro-batch and the next one's first
    torch.manual_seed(0)
    scored, extra = algo._informative(NextBatch(stream), state)
    assert extra["pds/factor"] == 1.5 and extra["pds/prompts"] == 3 and stream.pos == 4
    assert [ex["question"] for ex in scored.examples] == [third["question"]] * 4  # 1 of 3 groups kept
    assert algo._pass_rates == [pytest.approx(1 / 3)]
    _, extra = algo._informative(NextBatch(stream), state)
    assert extra["pds/factor"] == pytest.approx(3.0) and extra["pds/prompts"] == 6  # 1 / (1/3), 2 x 3


def test_fewer_surviving_groups_than_minibatches_make_fewer_minibatches():
    algo, state = setup(LastGroupSpread(), minibatches=4)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)  # no stream: one group of 2 has a spread
    assert batch["input_ids"].shape[0] == 4 and not algo._queue and algo.minibatches == 4


# ---------------------------------------------------------------------------- 6. KL-Cov


def kl_cov_case():
    # valid tokens: row 0 has 3, row 1 has 4 (N = 7); row 0's fourth position is padding holding junk
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 9.0], [-1.0, -2.0, -3.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return logprobs, logprobs - 0.1, torch.tensor([1.0, -1.0]), mask  # log ratio 0.1 everywhere


def test_kl_cov_with_ratio_0_is_the_unclipped_surrogate():
    logprobs, old, advantages, mask = kl_cov_case()
    per_token, selected = kl_cov_loss(logprobs, old, advantages, mask, ratio=0.0, coef=1.0)
    assert not selected.any()
    expected = -advantages[:, None] * math.exp(0.1) * mask
    assert torch.allclose(per_token, expected)


def test_kl_cov_penalises_the_top_covariance_tokens_by_hand():
    # mean A over the 7 tokens = -1/7, mean log p = -17/7; cov = (A - mean A)(log p - mean log p):
    # row 0: 8/7 * [10, 3, -4]/7 = [80, 24, -32]/49; row 1: -6/7 * [10, 3, -4, -18]/7 = [-60, -18, 24, 108]/49
    logprobs, old, advantages, mask = kl_cov_case()
    _, top1 = kl_cov_loss(logprobs, old, advantages, mask, ratio=0.01, coef=1.0)  # max(1, floor(0.07)) = 1
    assert top1.nonzero().tolist() == [[1, 3]]
    per_token, top2 = kl_cov_loss(logprobs, old, advantages, mask, ratio=0.4, coef=2.0)  # floor(2.8) = 2
    assert top2.nonzero().tolist() == [[0, 0], [1, 3]]
    assert per_token[1, 3].item() == pytest.approx(math.exp(0.1) + 2.0 * 0.1)  # -A rho + k |log ratio|
    assert per_token[1, 2].item() == pytest.approx(math.exp(0.1))


def test_with_old_equal_to_current_the_kl_term_has_no_value_and_no_gradient():
    logprobs, _, advantages, mask = kl_cov_case()
    grads = []
    for ratio in (0.0, 1.0):  # no token penalised, every token penalised
        lp = logprobs.clone().requires_grad_()
        per_token, _ = kl_cov_loss(lp, lp.detach(), advantages, mask, ratio=ratio, coef=1.0)
        aggregate(per_token, mask, "seq_mean_token_mean").backward()
        grads.append(lp.grad)
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------------------- 7. the GRPO limit


class OnlySome:
    """Rewards with a spread (1, 0, 1, 0, ...) for problems with an even answer; 0 for the others."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(i % 2 == 0 and int(ex["answer"]) % 2 == 0) for i, ex in enumerate(examples)])


def two_minibatches(algo, examples):
    policy = tiny(**SMALL, device="cpu")
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    torch.manual_seed(0)
    out = []
    for _ in range(2):
        batch = algo.make_batch(examples, state)
        loss, _ = algo.loss(batch, state)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        out.append((batch, loss.detach()))
    return out


def test_with_the_cut_off_and_the_clipped_loss_dot_is_grpo_with_dynamic_sampling():
    train = TASK.split("train")
    even, odd = ([ex for ex in train if int(ex["answer"]) % 2 == parity] for parity in (0, 1))
    examples = even[:2] + odd[:2]  # two groups with a reward spread, two without
    common = {"group_size": 4, "max_new_tokens": 8, "loss_agg": "token_mean", "minibatches": 2}
    reward = WeightedSum({"r": OnlySome()}, {"r": 1.0})
    dot = DOT(reward, alpha=1e9, loss_mode="clip", pds_init=1.0, pds_min=1.0, pds_max=1.0, **common)
    grpo = GRPO(reward, dynamic_sampling=True, max_draws=0, **common)
    runs = two_minibatches(dot, examples), two_minibatches(grpo, examples)
    for (d, d_loss), (g, g_loss) in zip(*runs):
        assert torch.equal(d["input_ids"], g["input_ids"]) and torch.equal(d["advantages"], g["advantages"])
        assert d["advantages"].abs().sum() > 0 and torch.equal(d_loss, g_loss)
    assert runs[0][1][1] != 0  # the second minibatch sees a moved policy: the comparison can fail


# ---------------------------------------------------------------------------- real steps and the loop


def test_one_real_step_changes_the_policy():
    algo, state = setup(Alternating())
    before = copy.deepcopy(state.model.state_dict())
    torch.manual_seed(0)
    loss, metrics = algo.loss(algo.make_batch(TASK.split("train")[:2], state), state)
    loss.backward()
    state.optimizer.step()
    assert torch.isfinite(loss) and metrics["rl/ppo_kl"] == 0.0  # one minibatch: pi_old = pi_theta
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())


def test_dot_runs_in_the_loop(tmp_path):
    cfg = small_config("algo=dot", "algo.group_size=2", "algo.max_new_tokens=8", "trainer.micro_batch_size=2")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {"truncation/easy_ratio", "truncation/actually_truncated", "truncation/broken_answer_ratio",
            "pds/factor", "rl/groups_with_signal", "rl/kl_cov_frac", "rl/ppo_kl", "rl/response_len", "train/loss"}
    assert keys <= set(rows[0]) and rows[0]["pds/factor"] == 1.5


DOT_RUN = ["algo=dot", "algo.group_size=2", "algo.max_new_tokens=8", "algo.minibatches=2",
           "trainer.micro_batch_size=4", "trainer.max_steps=5", "trainer.save_every=3",
           "reward.terms.correct._target_=tests.algorithms.test_dot.Alternating"]


def factors(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["pds/factor"] for r in rows if "pds/factor" in r]


def test_interrupted_dot_resumes_with_its_pds_history(tmp_path):
    run_training(small_config(*DOT_RUN), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):  # mid-rollout, after the first rollout set the history
        run_training(small_config(*DOT_RUN, *hook("stop", "tests.support.InterruptAt", step=3)), tmp_path / "cut")
    run_training(small_config(*DOT_RUN, "trainer.resume=auto"), tmp_path / "cut")
    assert factors(tmp_path / "straight") == [1.5, 1.5, 1.2, 1.2, 1.2]  # every group passes: p = 1
    assert factors(tmp_path / "cut") == factors(tmp_path / "straight")  # without the history step 5 draws at 1.5
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -1.0}, "algo.alpha"),
    ({"margin": -2}, "algo.margin"),
    ({"success_threshold": 1.5}, "algo.success_threshold"),
    ({"loss_mode": "clip_cov"}, "algo.loss_mode"),
    ({"kl_cov_ratio": 2.0}, "algo.kl_cov_ratio"),
    ({"pds_history": 0}, "algo.pds_history"),
    ({"pds_min": 2.0, "pds_max": 1.5}, "PDS factors"),
])
def test_bad_values_raise_one_clear_error(kwargs, message):
    with pytest.raises(RlxError, match=message):
        DOT(WeightedSum({"c": Correctness()}, {"c": 1.0}), **kwargs)
