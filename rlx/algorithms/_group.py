"""The pieces GRPO and its variants (DLER, DOT, DRPO, GRPO-lambda) compose: checks of the shared
settings, group selection and DAPO's dynamic sampling, the rollout's tensors, and GRPO's loss
around a per-token policy term. Each variant calls these from its own `make_batch` and `loss`;
none of them overrides another's methods.

Rows are laid out group after group: each prompt's `group_size` responses are contiguous.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlx.algorithms._replay import minibatches
from rlx.algorithms._rl import (
    AGG_MODES,
    IS_MODES,
    aggregate,
    cispo_policy_loss,
    clipped_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    masked_mean,
    mismatch_metrics,
    rollout_is_weights,
)
from rlx.algorithms._sampling import Scored
from rlx.data.stream import draw_more
from rlx.errors import RlxError
from rlx.models import ADAPTERS, reference_model
from rlx.rollout import eval_mode, sequence_logprobs, sequence_logprobs_and_entropy

SCALES = ("group", "batch", "batch_tokens", "none")
LOSSES = ("clip", "gspo", "cispo")


def check_settings(group_size: int, scale: str = "group", loss_agg: str = "token_mean", kl_coef: float = 0.0,
                   reference=None, minibatches: int = 1, loss: str = "clip", is_correction: str = "none",
                   engine=None, top_p: float = 1.0) -> None:
    """One clear line per bad value of the settings GRPO and its variants share."""
    if loss not in LOSSES:
        raise RlxError(f"unknown algo.loss={loss!r}; valid: {', '.join(LOSSES)}")
    if is_correction not in IS_MODES:
        raise RlxError(f"unknown algo.is_correction={is_correction!r}; valid: {', '.join(IS_MODES)}")
    if is_correction != "none" and not engine:
        raise RlxError("algo.is_correction corrects for a sampler whose log-probs differ from the trainer's; rlx's own "
                       "sampler (rollout=rlx) has none to correct: pick an engine (rollout=perturbed or vllm)")
    if is_correction != "none" and top_p < 1 and getattr(engine, "nucleus_logprobs", False):
        raise RlxError(f"{type(engine).__name__}'s log-probs are renormalised over the top-p nucleus and the trainer's "
                       "are not, which biases algo.is_correction: set algo.top_p=1.0 (or is_correction=none)")
    if loss_agg not in AGG_MODES:
        raise RlxError(f"unknown algo.loss_agg={loss_agg!r}; valid: {', '.join(AGG_MODES)}")
    if scale not in SCALES:
        raise RlxError(f"unknown algo.scale={scale!r}; valid: {', '.join(SCALES)}")
    if group_size < 2:
        raise RlxError("algo.group_size must be >= 2: advantages are relative to the group")
    if kl_coef > 0 and reference is None:
        raise RlxError("algo.kl_coef > 0 needs a reference model: add algo.reference='${model}'")
    if minibatches < 1:
        raise RlxError("algo.minibatches must be >= 1")


def frozen(reference):
    """The KL reference's model in eval mode without gradients, None, or "adapters" (the LoRA
    policy's base, taken at each use: `rlx.models.reference_model`)."""
    if reference is None or reference == ADAPTERS:
        return reference
    return reference.model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- group selection


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """The row indices of the given groups, group after group."""
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[K] bool: the groups whose rewards differ (the others have advantage 0 and no gradient)."""
    return rewards.view(-1, group_size).std(dim=1) > 0


def keep_groups(scored: Scored, informative: Tensor, n: int, group_size: int) -> Scored:
    """The first `n` informative groups; if there is none, the first `n` groups, whose advantages
    are all 0, as GRPO would train on them."""
    groups = informative.nonzero().flatten()[:n]
    if len(groups) == 0:
        groups = torch.arange(n)
    return scored.select(group_rows(groups, group_size))


def dynamic_sampling(examples, draw: Callable[[list[dict]], Scored], group_size: int, max_draws: int,
                     pad_token_id: int) -> tuple[Scored, dict]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ, drawing more prompts through
    `examples` (`draw_more`) until there are as many as asked for (or `max_draws` extra draws), and
    truncate to that many. `draw` samples and scores one micro-batch of prompts. The rollout
    metrics are those of the first draw (the plain batch)."""
    G = group_size
    draws = [draw(examples)]
    want = len(draws[0].rewards) // G
    spread = lambda: informative_groups(torch.cat([d.rewards for d in draws]), G)
    while int(spread().sum()) < want and len(draws) <= max_draws and (extra := draw_more(examples)):
        draws.append(draw(extra))
    informative = spread()
    merged = Scored.concat(draws, pad_token_id)
    merged.metrics["rl/rollout_s"] = sum(d.metrics["rl/rollout_s"] for d in draws)
    kept = keep_groups(merged, informative, want, G)
    return kept, {"rl/groups_with_signal": informative.float().mean().item(), "rl/draws": len(draws)}


# ---------------------------------------------------------------------------- tensors and loss


def rollout_tensors(scored: Scored, state, temperature: float, *, behaviour: bool, reference=None,
                    sampler: bool = False) -> dict:
    """The sequences and response mask of a scored rollout, with the behaviour log-probs if
    `behaviour` (a rollout replayed as several minibatches: later ones see a policy that has
    moved; taken without dropout, as TRL) and the reference's if there is one. With `sampler`
    (a rollout-mismatch correction) also the sampler's own log-probs, and the behaviour
    log-probs, which the correction compares them with."""
    model = state.model
    input_ids, attention_mask = scored.rollout.sequences()
    mask = scored.rollout.response_mask.float()
    data = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": mask}
    if sampler:
        data["sampler_logprobs"] = scored.rollout.logprobs.to(input_ids.device)
    chunk = logprob_chunk(state)
    if behaviour or sampler:
        with eval_mode(model):
            data["old_logprobs"] = sequence_logprobs(model, input_ids, attention_mask, mask.shape[1], temperature, chunk)
    if reference is not None:
        with reference_model(reference, model) as ref:
            data["ref_logprobs"] = sequence_logprobs(ref, input_ids, attention_mask, mask.shape[1], temperature, chunk)
    return data


def logprob_chunk(state) -> int:
    """trainer.logprob_chunk (0 where a state has no trainer settings, as in unit tests)."""
    return getattr(state.trainer, "logprob_chunk", 0)


def clip_term(eps_low: float, eps_high: float):
    """GRPO's per-token policy term: the clipped surrogate and its clip fraction."""
    return policy_term("clip", eps_low, eps_high)


def policy_term(loss: str, eps_low: float, eps_high: float, cispo_max: float = 5.0, cispo_min: float | None = None):
    """The per-token policy term `algo.loss` names and its clip fraction: `clip` (PPO/GRPO's
    token-level clipped surrogate), `gspo` (the sequence-level ratio, clipped at eps_low/eps_high)
    or `cispo` (REINFORCE with the weight capped at cispo_max, stop-gradient)."""
    def term(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        if loss == "gspo":
            per_token, clipped = gspo_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
        elif loss == "cispo":
            per_token, clipped = cispo_policy_loss(logprobs, old_logprobs, advantages, mask, cispo_max, cispo_min)
        else:
            per_token, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
        return per_token, {"rl/clip_frac": masked_mean(clipped.float(), mask).item()}
    return term


def grpo_loss(batch: dict, state, policy_term, *, temperature: float, loss_agg: str, max_len: int, reference=None,
              kl_coef: float = 0.0, kl_estimator: str = "k3", is_correction: str = "none",
              is_clip_min: float | None = None, is_clip_max: float | None = 3.0) -> tuple[Tensor, dict]:
    """`policy_term` per token (+ kl_coef * KL to the reference), aggregated per `loss_agg`. With one
    minibatch per rollout there are no stored behaviour log-probs: old = current, detached.

    `is_correction` (`rlx.algorithms._rl.rollout_is_weights`) multiplies the policy term by the
    truncated or masked ratio of the trainer's behaviour log-probs to the sampler's, before the
    KL term is added (TRL's order); the mismatch metrics are logged whenever the batch carries the
    sampler's log-probs."""
    mask = batch["response_mask"]
    logprobs, entropy = sequence_logprobs_and_entropy(state.model, batch["input_ids"], batch["attention_mask"],
                                                      mask.shape[1], temperature, logprob_chunk(state))
    old = batch.get("old_logprobs", logprobs.detach())
    per_token, policy_metrics = policy_term(logprobs, old, batch["advantages"], mask)
    metrics = {**batch["metrics"], **policy_metrics}
    if "sampler_logprobs" in batch:
        weights = None
        if is_correction != "none":
            weights = rollout_is_weights(old, batch["sampler_logprobs"], mask, is_correction, is_clip_min, is_clip_max)
            per_token = per_token * weights
        metrics.update(mismatch_metrics(old, batch["sampler_logprobs"], mask, weights))
    if reference is not None:
        kl = kl_penalty(logprobs, batch["ref_logprobs"], kl_estimator)
        per_token = per_token + kl_coef * kl
        metrics["rl/kl"] = masked_mean(kl, mask).item()
    loss = aggregate(per_token, mask, loss_agg, max_len)
    metrics["rl/entropy"] = masked_mean(entropy, mask).item()
    metrics["train/loss"] = loss.detach()
    return loss, metrics


def group_minibatches(data: dict, parts: int, group_size: int, weight: Callable[[Tensor], int],
                      metrics: dict) -> list[dict]:
    """The rollout cut into min(parts, groups) minibatches of whole groups (dynamic sampling may
    keep fewer groups than `parts`), shuffled when there is more than one: one optimizer step
    each (verl's ppo_mini_batch_size)."""
    n = min(parts, data["response_mask"].shape[0] // group_size)
    return minibatches(data, n, weight, metrics, group_size=group_size, shuffle=n > 1)
