"""INPO (arXiv 2407.00617) against the paper note's hand values: the pair loss by hand, its IPO
limits (tau = eta; the first round), the tabular minimiser of eq. 8 equal to the OMD step of
eq. 5, the judge's pair selection, the round's caches of pi_ref and pi_t, a loop run over two
rounds and exact resume across a round boundary."""
import json

import pytest
import torch

from rlx.algorithms._pairs import response_logps
from rlx.algorithms.dpo import dpo_loss
from rlx.algorithms.inpo import INPO, best_and_worst, inpo_loss
from rlx.data.preferences import ReasoningPairs
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import WeightedSum
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import TINY, Alternating, small_config, straight_and_resumed

TASK = ReasoningPairs(num_train=16, num_validation=2, num_test=2)
SCRIPTED = "reward.terms.correct._target_=tests.support.Alternating"  # every group has a strict winner


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------------------- pure loss


def test_pair_loss_by_hand():
    # note: logp_w - logp_l = -1, ref diff -2, prev diff -1.5, eta 2, tau 0.2 (tau/eta 0.1):
    # h = -1 + 0.1 * 2 + 0.9 * 1.5 = 0.55; loss = (0.55 - 1/4)^2 = 0.09
    losses, h = inpo_loss(t(-3.0), t(-2.0), t(-4.0), t(-2.0), t(-3.5), t(-2.0), eta=2.0, tau=0.2)
    assert h.item() == pytest.approx(0.55, abs=1e-12)
    assert losses.item() == pytest.approx(0.09, abs=1e-12)


def test_tau_equal_to_eta_is_ipo_with_beta_eta_on_summed_logps():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl, qw, ql = (-30 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(6))
    ipo = dpo_loss(pw, pl, rw, rl, beta=0.3, loss_type="ipo")[0]
    torch.testing.assert_close(inpo_loss(pw, pl, rw, rl, qw, ql, eta=0.3, tau=0.3)[0], ipo, rtol=1e-12, atol=1e-12)
    # tau < eta brings pi_t in: no longer IPO when pi_t != pi_ref
    assert not torch.allclose(inpo_loss(pw, pl, rw, rl, qw, ql, eta=0.3, tau=0.1)[0], ipo)


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.1 / 3, 0.1])
def test_first_round_is_ipo_whatever_tau(tau):
    g = torch.Generator().manual_seed(1)
    pw, pl, rw, rl = (-20 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    ipo = dpo_loss(pw, pl, rw, rl, beta=0.1, loss_type="ipo")[0]
    torch.testing.assert_close(inpo_loss(pw, pl, rw, rl, rw, rl, eta=0.1, tau=tau)[0], ipo, rtol=1e-12, atol=1e-12)


def test_tabular_minimiser_is_the_omd_step():
    """Eq. 8 in exact expectation over 3 responses: each ordered pair (i, j), i the winner, weighted
    by pi_t(i) pi_t(j) P[i][j]; its minimiser over softmax logits is eq. 5's step (the note's values)."""
    pi_t, pi_ref = t(0.5, 0.3, 0.2), t(0.4, 0.4, 0.2)
    P = t(0.5, 0.7, 0.6, 0.3, 0.5, 0.8, 0.4, 0.2, 0.5).view(3, 3)
    eta, tau = 2.0, 0.2
    i, j = zip(*[(a, b) for a in range(3) for b in range(3) if a != b])
    i, j = torch.tensor(i), torch.tensor(j)
    weight = pi_t[i] * pi_t[j] * P[i, j]
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def objective():
        logp = theta.log_softmax(0)
        losses, _ = inpo_loss(logp[i], logp[j], pi_ref.log()[i], pi_ref.log()[j], pi_t.log()[i], pi_t.log()[j],
                              eta=eta, tau=tau)
        return (weight * losses).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    learned = theta.detach().softmax(0)
    torch.testing.assert_close(learned, t(0.509920, 0.303236, 0.186845), atol=2e-6, rtol=0)
    assert objective().item() == pytest.approx(0.017475, abs=1e-6)


# ---------------------------------------------------------------------------- judging


def test_best_and_worst_by_hand():
    # reward alone: best is the first 1 (index 1), worst the last 0 (index 3)
    assert best_and_worst([0.0, 1.0, 1.0, 0.0], [5, 9, 3, 7], "none") == (1, 3, True)
    # length tie-break: of the 1s the shorter (index 2), of the 0s the longer (index 3)
    assert best_and_worst([0.0, 1.0, 1.0, 0.0], [5, 9, 3, 7], "length") == (2, 3, True)
    # all right: no strict winner by reward, but the shortest beats the longest with the tie-break
    assert best_and_worst([1.0, 1.0, 1.0], [6, 4, 9], "none")[2] is False
    assert best_and_worst([1.0, 1.0, 1.0], [6, 4, 9], "length") == (1, 2, True)
    # identical judgements: no pair either way
    assert best_and_worst([0.0, 0.0], [8, 8], "length")[2] is False


def test_bad_settings_are_clear_errors():
    reward, reference = WeightedSum({"r": Alternating()}, {"r": 1.0}), tiny(**TINY, device="cpu")
    with pytest.raises(RlxError, match=r"algo.reference='\$\{model\}'"):
        INPO(reward, None)
    with pytest.raises(RlxError, match="eta"):
        INPO(reward, reference, eta=0.0)
    with pytest.raises(RlxError, match="tau"):
        INPO(reward, reference, eta=0.1, tau=0.2)
    with pytest.raises(RlxError, match="tie_break"):
        INPO(reward, reference, tie_break="coin")
    with pytest.raises(RlxError, match="logps"):
        INPO(reward, reference, logps="max")
    with pytest.raises(RlxError, match="num_samples"):
        INPO(reward, reference, num_samples=1)


# ---------------------------------------------------------------------------- tiny model


def test_rounds_cache_pi_ref_then_pi_t():
    policy, reference = tiny(**TINY, device="cpu"), tiny(**TINY, device="cpu")  # same seed: same weights
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.5), None, TASK)
    algo = INPO(WeightedSum({"r": Alternating()}, {"r": 1.0}), reference, eta=0.1, tau=0.05, round_steps=2,
                round_prompts=4, num_samples=4, max_new_tokens=6)
    examples = TASK.split("train")
    batch = algo.make_batch(examples[:4], state)  # a plain list: the round's prompts are these 4
    assert algo.round == 0 and len(algo.data) == 4  # Alternating: every prompt keeps a pair
    ref_w, ref_l, prev_w, prev_l = algo.cached.unbind(-1)
    torch.testing.assert_close(prev_w, ref_w)  # pi_1 = pi_ref
    torch.testing.assert_close(prev_l, ref_l)
    loss, metrics = algo.loss(batch, state)
    assert loss.item() == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-3)  # h = 0 at pi = pi_t = pi_ref
    assert metrics["inpo/pairs_kept"] == 4 and metrics["inpo/round"] == 0
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.step = 1
    pairs = algo.data
    algo.make_batch(examples[4:6], state)  # 2 pairs from the round's, not these prompts
    assert algo.round == 0 and algo.data is pairs and algo.pos == 2
    state.step = 2
    algo.make_batch(examples[4:8], state)
    assert algo.round == 1
    ref_w, ref_l, prev_w, prev_l = algo.cached.unbind(-1)
    tok = algo.pairs.tokenize(algo.data, state.tokenizer, "cpu")
    with torch.no_grad():
        now = response_logps(state.model.eval(), tok)[0]
        before = response_logps(reference.model, tok)[0]
    torch.testing.assert_close(torch.cat([prev_w, prev_l]), now)  # pi_t: the policy at the round's start
    torch.testing.assert_close(torch.cat([ref_w, ref_l]), before)
    assert not torch.allclose(prev_w, ref_w)  # the step moved the policy away from pi_ref


def test_inpo_runs_two_rounds_in_the_loop(tmp_path):
    cfg = small_config("algo=inpo", "data=reasoning_pairs", SCRIPTED, "data.num_train=32", "trainer.max_steps=4",
                       "trainer.micro_batch_size=2", "algo.round_steps=2", "algo.round_prompts=4",
                       "algo.num_samples=4", "algo.max_new_tokens=6")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["inpo/round"] for r in train] == [0, 0, 1, 1]
    assert all(r["inpo/pairs_kept"] == 4 for r in train)
    assert {"inpo/sample_accuracy", "inpo/reward_margin", "inpo/reward_accuracy"} <= set(train[0])
    assert train[0]["train/loss"] == pytest.approx(25.0, abs=1e-3)  # 1/(2 eta) = 5 at pi = pi_t = pi_ref


def test_exact_resume_across_a_round_boundary(tmp_path):
    # rounds of 3 steps: cut at step 2 (mid-round: the pairs and pi_t's log-probs come from the
    # checkpoint), then the resumed run starts round 1 at step 3
    over = ["algo=inpo", "data=reasoning_pairs", SCRIPTED, "data.num_train=32", "trainer.micro_batch_size=2",
            "algo.round_steps=3", "algo.round_prompts=3", "algo.num_samples=4", "algo.max_new_tokens=6",
            "trainer.lr_scheduler=constant", "optimizer.lr=1e-2"]  # the cut run's schedule must match
    full, resumed, a, b = straight_and_resumed(tmp_path, over, steps=4, cut=2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "cut")}
    last = {run: [r for r in rows[run] if "train/loss" in r][-1] for run in rows}
    assert last["full"]["inpo/round"] == last["cut"]["inpo/round"] == 1
    assert last["full"]["train/loss"] == last["cut"]["train/loss"]
    assert last["full"]["inpo/h"] != 0.0  # pi_t of round 1 is not pi_ref: the run did move
