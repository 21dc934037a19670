"""Train-inference mismatch: the IS weights by hand, the correction's unbiasedness by exact
enumeration, the perturbed engine as a measured mismatch, and GRPO's new options in the loop."""
import importlib.util
import itertools
import json

import pytest
import torch

from rlx.algorithms._rl import mismatch_metrics, rollout_is_weights
from rlx.algorithms.grpo import GRPO
from rlx.engines import PerturbedEngine
from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rewards import Correctness, WeightedSum
from rlx.state import TrainState
from rlx.tasks import run_training
from tests.support import TASK, TINY, Alternating, small_config

# ---------------------------------------------------------------------------- the weights by hand

TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.9, 0.0]])  # log pi - log mu: [0.5, -1, 0], [0, 0.7, (pad)]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_weights_by_hand():
    w = rollout_is_weights(TRAIN, SAMPLER, MASK, "token_truncate", None, 1.5)
    # exp(0.5) = 1.6487 and exp(0.7) = 2.0138 are cut to 1.5; exp(-1) = 0.3679 has no floor
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.36787944, 1.0], [1.0, 1.5, 1.0]]))
    w = rollout_is_weights(TRAIN, SAMPLER, MASK, "token_truncate", 0.5, 1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.5, 1.0]]))
    w = rollout_is_weights(TRAIN, SAMPLER, MASK, "token_mask", 0.5, 1.5)
    # 1.6487 > 1.5 and 0.3679 < 0.5 are zeroed, 2.0138 > 1.5 too
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))


def test_sequence_weights_by_hand():
    # row 0: exp(0.5 - 1 + 0) = 0.6065; row 1: exp(0.7) = 2.0138 (the padded column does not count)
    w = rollout_is_weights(TRAIN, SAMPLER, MASK, "sequence_truncate", None, 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.60653066], [2.0]]))
    w = rollout_is_weights(TRAIN, SAMPLER, MASK, "sequence_mask", 0.7, 3.0)
    torch.testing.assert_close(w, torch.tensor([[0.0], [2.01375271]]))
    assert rollout_is_weights(TRAIN, TRAIN, MASK, "sequence_mask").eq(1).all()  # no mismatch: weight 1


def test_weights_carry_no_gradient():
    train = TRAIN.clone().requires_grad_(True)
    assert not rollout_is_weights(train, SAMPLER, MASK, "token_truncate").requires_grad


def test_mismatch_metrics_by_hand():
    m = mismatch_metrics(TRAIN, SAMPLER, MASK)
    d = torch.tensor([0.5, -1.0, 0.0, 0.0, 0.7])  # log pi - log mu on the five valid tokens
    assert m["mismatch/kl_k1"] == pytest.approx((-d).mean().item())
    assert m["mismatch/kl_k3"] == pytest.approx((d.exp() - d - 1).mean().item())
    assert m["mismatch/max_abs_logp_diff"] == pytest.approx(1.0)
    assert mismatch_metrics(TRAIN, TRAIN, MASK)["mismatch/kl_k3"] == 0.0


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode must be one of"):
        rollout_is_weights(TRAIN, SAMPLER, MASK, "none")


# ---------------------------------------------------------------------------- unbiasedness, exactly


def test_sequence_is_weights_make_the_off_policy_gradient_the_on_policy_one():
    """A policy over all 3^3 sequences of a 3-token vocabulary (independent positions, logits theta),
    sampled by a mismatched sampler mu. Enumerating every sequence, the expected REINFORCE gradient
    E_mu[w(y) A(y) grad log pi(y)] with the sequence-level weight (no bound reached) equals the
    on-policy E_pi[A grad log pi]; without the weight it does not, and neither does token-level TIS,
    whose weight ignores how the other tokens' distribution, which the reward depends on, moved
    (here it is no closer than no correction at all: a bias traded for variance)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 3, generator=g, requires_grad=True)  # [position, token]
    mu_logits = theta.detach() + 0.8 * torch.randn(3, 3, generator=g)
    reward = torch.randn(3, 3, 3, generator=g)  # any function of the whole sequence

    def expected_gradient(weighting):
        total = torch.zeros(3, 3)
        for seq in itertools.product(range(3), repeat=3):
            logp, logmu = theta.log_softmax(-1), mu_logits.log_softmax(-1)
            idx = torch.tensor(seq)
            tok_lp, tok_mu = logp[torch.arange(3), idx], logmu[torch.arange(3), idx]
            prob = tok_mu.sum().exp() if weighting != "on_policy" else tok_lp.sum().exp()
            if weighting in ("on_policy", "none"):
                w = torch.ones(1, 3)
            else:
                w = rollout_is_weights(tok_lp[None].detach(), tok_mu[None], torch.ones(1, 3), weighting, None, 1e9)
            surrogate = (w.expand(1, 3) * tok_lp[None]).sum() if weighting != "sequence_truncate" \
                else w.squeeze() * tok_lp.sum()
            (grad,) = torch.autograd.grad(prob.detach() * reward[seq] * surrogate, theta)
            total += grad
        return total

    exact = expected_gradient("on_policy")
    torch.testing.assert_close(expected_gradient("sequence_truncate"), exact, atol=1e-5, rtol=1e-5)
    uncorrected = (expected_gradient("none") - exact).norm()
    token = (expected_gradient("token_truncate") - exact).norm()
    assert uncorrected > 0.05 * exact.norm()
    assert token > 0.05 * exact.norm()


# ---------------------------------------------------------------------------- the perturbed engine


def _rollout(engine, seed=0):
    policy = tiny(**TINY, device="cpu")
    from rlx.data.collate import prompt_batch
    from rlx.rollout import sequence_logprobs

    b = prompt_batch([ex["prompt"] for ex in TASK.split("train")[:4]], policy.tokenizer, "cpu")
    torch.manual_seed(seed)
    r = engine.generate(policy.model, b["input_ids"], b["attention_mask"], max_new_tokens=12,
                        eos_token_id=policy.tokenizer.eos_token_id, pad_token_id=policy.tokenizer.pad_token_id)
    ids, mask = r.sequences()
    with torch.no_grad():
        train = sequence_logprobs(policy.model, ids, mask, r.response_ids.shape[1])
    return mismatch_metrics(train, r.logprobs, r.response_mask)


def test_an_exact_copy_has_no_mismatch_and_precision_and_noise_make_one():
    exact = _rollout(PerturbedEngine())
    assert exact["mismatch/max_abs_logp_diff"] < 1e-4  # rlx's sampler = the trainer's forward, to rounding
    bf16 = _rollout(PerturbedEngine(dtype="bfloat16"))
    noisy = _rollout(PerturbedEngine(noise=0.2))
    assert bf16["mismatch/max_abs_logp_diff"] > 100 * exact["mismatch/max_abs_logp_diff"]
    assert noisy["mismatch/kl_k3"] > bf16["mismatch/kl_k3"] > 0


def test_bad_engine_settings_are_one_clear_line():
    with pytest.raises(RlxError, match="rollout.dtype"):
        PerturbedEngine(dtype="int3")
    with pytest.raises(RlxError, match="algo.is_correction"):
        GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), is_correction="tis")
    with pytest.raises(RlxError, match="has none to correct"):
        GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), is_correction="token_mask")
    with pytest.raises(RlxError, match="algo.loss"):
        GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), loss="ppo")


def test_rollout_on_an_algorithm_without_an_engine_is_one_clear_line(tmp_path):
    with pytest.raises(RlxError, match="rollout=PerturbedEngine"):
        run_training(small_config("algo=ppo", "rollout=perturbed"), tmp_path)


# ---------------------------------------------------------------------------- GRPO with an engine


def _loss(engine=None, **kwargs):
    policy = tiny(**TINY, device="cpu")
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    algo = GRPO(WeightedSum({"r": Alternating()}, {"r": 1.0}), group_size=4, max_new_tokens=8, engine=engine, **kwargs)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    return algo.loss(batch, state)


def test_correction_with_an_exact_sampler_is_plain_grpo():
    plain, _ = _loss()
    corrected, metrics = _loss(PerturbedEngine(), is_correction="sequence_mask")
    assert corrected.item() == pytest.approx(plain.item(), abs=1e-5)
    assert metrics["mismatch/is_w_p50"] == pytest.approx(1.0, abs=1e-4) and metrics["mismatch/is_zeroed"] == 0


def test_correction_changes_the_loss_under_a_mismatch():
    off, m_off = _loss(PerturbedEngine(noise=0.3))
    on, m_on = _loss(PerturbedEngine(noise=0.3), is_correction="token_truncate", is_clip_max=2.0)
    assert m_off["mismatch/kl_k3"] > 1e-3 and "mismatch/is_w_p50" not in m_off
    assert on.item() != pytest.approx(off.item(), abs=1e-4)
    assert m_on["mismatch/is_w_p95"] <= 2.0


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
def test_new_losses_run_in_the_loop_with_a_perturbed_engine(tmp_path, loss):
    cfg = small_config("algo=grpo", f"algo.loss={loss}", "algo.group_size=2", "algo.max_new_tokens=8",
                       "trainer.micro_batch_size=2", "rollout=perturbed", "rollout.dtype=bfloat16",
                       "algo.is_correction=token_truncate")
    run_training(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"mismatch/kl_k3", "mismatch/is_w_p50", "rl/clip_frac"} <= set(rows[0])
    assert rows[0]["mismatch/kl_k3"] > 0


# ---------------------------------------------------------------------------- the vLLM engine, without vLLM


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_is_one_clear_line():
    from rlx.engines import VLLMEngine

    with pytest.raises(RlxError, match=r"needs vLLM on a CUDA machine: pip install -e '.\[vllm\]'"):
        VLLMEngine()


def test_vllm_completions_become_a_right_padded_rollout():
    """vLLM's output objects (token ids, per-token {id: Logprob}, finish reason) -> rlx's Rollout; a
    row stopped by EOS keeps it (appended with an unknown log-prob where vLLM left it out)."""
    from types import SimpleNamespace as NS

    from rlx.engines import VLLMEngine

    eos, pad = 2, 0
    lp = lambda ids, vals: [{i: NS(logprob=v)} for i, v in zip(ids, vals)]
    completions = [NS(token_ids=[5, 6, eos], logprobs=lp([5, 6, eos], [-0.1, -0.2, -0.3]), finish_reason="stop"),
                   NS(token_ids=[7, 8, 9, 10], logprobs=lp([7, 8, 9, 10], [-1, -2, -3, -4]), finish_reason="length"),
                   NS(token_ids=[11], logprobs=lp([11], [-0.5]), finish_reason="stop")]  # EOS left out
    prompts = torch.tensor([[0, 3, 4], [3, 4, 4], [0, 0, 3]])
    r = VLLMEngine._rollout(prompts, (prompts > 0).long(), completions, eos, pad)
    assert r.response_ids.tolist() == [[5, 6, eos, pad], [7, 8, 9, 10], [11, eos, pad, pad]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert r.finished.tolist() == [True, False, True]
    assert r.logprobs[1].tolist() == [-1, -2, -3, -4] and r.logprobs[2, 1].isnan()
    w = rollout_is_weights(torch.zeros(3, 4), r.logprobs, r.response_mask, "token_truncate", None, 100.0)
    assert w[2, 1] == 1.0  # an unknown sampler log-prob gets weight 1, as in TRL


def test_is_correction_against_nucleus_logprobs_is_refused():
    class Nucleus:
        nucleus_logprobs = True

    with pytest.raises(RlxError, match="top-p nucleus"):
        GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), engine=Nucleus(), top_p=0.9, is_correction="token_mask")
    GRPO(WeightedSum({"c": Correctness()}, {"c": 1.0}), engine=Nucleus(), top_p=1.0, is_correction="token_mask")
