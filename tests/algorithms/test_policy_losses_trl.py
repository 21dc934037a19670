"""rlx's GSPO, CISPO and clipped-surrogate terms, and the rollout-mismatch weights, against TRL's
own `GRPOTrainer._compute_loss` on identical tensors (TRL 1.16).

TRL has no pure policy-loss function: the loss lives inside `_compute_loss`, which runs the model
first. So the test calls that method on a bare object carrying just the attributes it reads, whose
`_get_per_token_logps_and_entropies` returns given log-probs (a leaf tensor), and compares the loss
and its gradient with respect to those log-probs with rlx's `grpo_loss` pieces.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from rlx.algorithms._group import policy_term  # noqa: E402
from rlx.algorithms._rl import aggregate, rollout_is_weights  # noqa: E402

B, T = 6, 7


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logprobs, inputs, **settings):
    """TRL's loss for per-token `logprobs` (the value the model would return) and `inputs`."""
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                           sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    defaults = dict(top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=0.0, use_vllm=False,
                    vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
                    model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
                    accelerator=_Accelerator(), args=args, _metrics={"train": defaultdict(list)},
                    importance_sampling_level="token")
    trainer = SimpleNamespace(**{**defaults, **settings})
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None)
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g) * 3
    new = old + 0.3 * torch.randn(B, T, generator=g)  # a policy that has moved: some ratios clip
    adv = torch.randn(B, generator=g)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    return new, old, adv, mask, inputs


def _both(new, old, adv, mask, inputs, term, agg, trl_settings, weights=None):
    ours_lp = new.clone().requires_grad_(True)
    per_token, _ = term(ours_lp, old, adv, mask.float())
    if weights is not None:
        per_token = per_token * weights
    ours = aggregate(per_token, mask.float(), agg)
    ours.backward()
    theirs_lp = new.clone().requires_grad_(True)
    theirs = _trl_loss(theirs_lp, inputs, **trl_settings)
    theirs.backward()
    return ours, ours_lp.grad, theirs, theirs_lp.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,term,agg,trl", [
    ("clip / dapo", policy_term("clip", 0.2, 0.28), "token_mean",
     {"loss_type": "dapo", "epsilon_low": 0.2, "epsilon_high": 0.28}),
    ("clip / grpo", policy_term("clip", 0.2, 0.2), "seq_mean_token_mean",
     {"loss_type": "grpo", "epsilon_low": 0.2, "epsilon_high": 0.2}),
    ("gspo", policy_term("gspo", 3e-4, 4e-4), "seq_mean_token_mean",
     {"loss_type": "grpo", "epsilon_low": 3e-4, "epsilon_high": 4e-4, "importance_sampling_level": "sequence"}),
    ("gspo, wide clip", policy_term("gspo", 0.05, 0.05), "seq_mean_token_mean",
     {"loss_type": "grpo", "epsilon_low": 0.05, "epsilon_high": 0.05, "importance_sampling_level": "sequence"}),
    ("cispo", policy_term("cispo", 0.2, 0.2, cispo_max=1.2), "token_mean",
     {"loss_type": "cispo", "epsilon_low": 0.2, "epsilon_high": 1.2}),
    ("cispo, TRL's cap", policy_term("cispo", 0.2, 0.2, cispo_max=5.0), "token_mean",
     {"loss_type": "cispo", "epsilon_low": 0.2, "epsilon_high": 5.0}),
])
def test_policy_term_equals_trl(seed, name, term, agg, trl):
    new, old, adv, mask, inputs = _case(seed)
    ours, our_grad, theirs, their_grad = _both(new, old, adv, mask, inputs, term, agg, trl)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6), name
    torch.testing.assert_close(our_grad, their_grad, atol=1e-7, rtol=1e-6)
    assert our_grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_mismatch_weights_equal_trl_in_the_loss(mode):
    """rlx's IS weights, multiplied into the clipped term, give TRL's loss when TRL is handed the same
    weights as its `importance_sampling_ratio` (TRL computes them inline in its rollout code; their
    values are checked by hand in test_rollout_correction.py)."""
    new, old, adv, mask, inputs = _case(5)
    sampler = old + 0.4 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9))
    w = rollout_is_weights(old, sampler, mask, mode, 0.5, 2.0)
    inputs = {**inputs, "importance_sampling_ratio": w}
    settings = {"loss_type": "dapo", "epsilon_low": 0.2, "epsilon_high": 0.2, "use_vllm": True,
                "vllm_importance_sampling_correction": True}
    ours, our_grad, theirs, their_grad = _both(new, old, adv, mask, inputs, policy_term("clip", 0.2, 0.2),
                                               "token_mean", settings, weights=w)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-7, rtol=1e-6)
    if mode.endswith("mask"):
        assert (w == 0).any()  # the bounds bite on this case
