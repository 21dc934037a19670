"""GRPO-lambda: "Stable Reinforcement Learning for Efficient Reasoning" (Dai, Liu, Si, 2025,
arXiv 2505.18086). Not the eligibility-trace method of the same name (arXiv 2510.00194).

    rlx train algo=grpo_lambda model=tiny_sft
    rlx train algo=grpo_lambda algo.fraction=1.0      # every group length-penalised: GRPO + LP
    rlx train algo=grpo_lambda algo.mode=threshold algo.threshold=0.75

A length penalty applied to every prompt shortens answers and then collapses accuracy, because
on prompts the model cannot yet solve the penalty fights the correctness signal. GRPO-lambda
applies it only where the model is already competent, and recomputes where that is on every
batch:

    rho_k = mean_i c_k^i                           the group's correctness ratio (the task's checker)
    S     = the floor(lambda * K) groups of the batch with the largest rho_k     (mode=topk)
            (or every group with rho_k >= threshold                              (mode=threshold))
    r_k^i = 1 - alpha * sigmoid((L_k^i - mean L_k,correct) / std L_k,correct)   if k in S and correct
          = 0                                                                    if k in S and wrong
          = the configured reward (0/1 correctness)                              if k not in S
    A_k^i = GRPO's group-normalised advantage of r_k^i; the update is GRPO's.

Inside S a correct answer always scores above a wrong one (alpha < 1), so length only reorders
the correct answers; an all-wrong group scores 0 either way.

The paper body could not be read; the rule and the reward above follow a detailed secondary
write-up of its method section. Choices where it is silent, each a config option:
* `fraction` (lambda) 0.2, the value the paper's Fig. 2 illustrates; `alpha` 0.6 (unconfirmed);
* ties in rho are broken by batch order (a stable sort), floor(lambda * K) groups are selected;
* the length statistics are the population mean/std of the group's correct responses, with the
  std floored at 1e-4 so a group with one correct answer gives z = 0 (r = 1 - alpha/2);
* `length_reward=kimi` swaps in Kimi-1.5's min-max length reward (correct: 0.5 - (L - min) /
  (max - min); wrong: min(0, that)), the paper's named example of a length-penalty reward;
* `mode=threshold` is an ablation, not the paper's rule.

Scope: "the batch" is one micro-batch rollout (trainer.micro_batch_size prompts), which is the
optimizer step's batch at trainer.grad_accum=1; with accumulation each micro-batch selects its own
top-lambda groups. Under data parallelism the batch is the micro-batch rollouts of all ranks
(micro_batch_size x ranks prompts): the selection is taken over them all. A micro-batch too small for floor(lambda * K) >= 1 stops the run with one line
rather than silently training plain GRPO.

The rollout, minibatches and loss are GRPO's, from the same shared pieces (`rlx.algorithms._group`);
GRPO-lambda's own part is `advantages`, on the shaped rewards.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlx.algorithms._group import (
    check_settings,
    dynamic_sampling,
    frozen,
    group_minibatches,
    grpo_loss,
    policy_term,
    rollout_tensors,
)
from rlx.algorithms._replay import Replay, ReplayedRollouts
from rlx.algorithms._rl import aggregation_weight, group_advantages
from rlx.algorithms._sampling import Scored, sample_and_score
from rlx.distributed import across_ranks, batch_concat
from rlx.errors import RlxError

MODES = ("topk", "threshold")
LENGTH_REWARDS = ("sigmoid", "kimi")


def efficiency_groups(ratios: Tensor, fraction: float, mode: str = "topk", threshold: float = 1.0) -> Tensor:
    """Bool [K]: the groups that get the length-penalised reward."""
    if mode == "threshold":
        return ratios >= threshold
    k = int(fraction * len(ratios) + 1e-9)
    chosen = torch.zeros(len(ratios), dtype=torch.bool)
    chosen[torch.sort(ratios, descending=True, stable=True).indices[:k]] = True
    return chosen


def sigmoid_length_reward(lengths: Tensor, correct: Tensor, alpha: float) -> Tensor:
    """[G] rewards of one group: 1 - alpha * sigmoid(z-scored length among the correct), 0 if wrong."""
    right = correct > 0
    if not right.any():
        return torch.zeros_like(lengths, dtype=torch.float32)
    ok = lengths[right].float()
    z = (lengths.float() - ok.mean()) / ok.std(unbiased=False).clamp(min=1e-4)
    return torch.where(right, 1 - alpha * torch.sigmoid(z), 0.0)


def kimi_length_reward(lengths: Tensor, correct: Tensor, alpha: float = 1.0) -> Tensor:
    """[G] Kimi-1.5's length reward added to correctness: lambda = 0.5 - (L - min) / (max - min) over
    the group; correct: 1 + alpha * lambda, wrong: alpha * min(0, lambda)."""
    lengths = lengths.float()
    span = (lengths.max() - lengths.min()).clamp(min=1e-4)
    lam = 0.5 - (lengths - lengths.min()) / span
    return torch.where(correct > 0, 1 + alpha * lam, alpha * lam.clamp(max=0))


class GRPOLambda(ReplayedRollouts):
    needs_trained_model = True

    def __init__(
        self,
        reward,
        fraction: float = 0.2,
        alpha: float = 0.6,
        mode: str = "topk",
        threshold: float = 1.0,
        length_reward: str = "sigmoid",
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        scale: str = "group",
        loss_agg: str = "token_mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        reference=None,
        dynamic_sampling: bool = False,
        max_draws: int = 4,
        minibatches: int = 1,
        loss: str = "clip",
        cispo_max: float = 5.0,
        cispo_min: float | None = None,
        engine=None,
        is_correction: str = "none",
        is_clip_min: float | None = None,
        is_clip_max: float | None = 3.0,
    ):
        check_settings(group_size, scale, loss_agg, kl_coef, reference, minibatches, loss, is_correction,
                       engine, top_p)
        if mode not in MODES:
            raise RlxError(f"unknown algo.mode={mode!r}; valid: {', '.join(MODES)}")
        if length_reward not in LENGTH_REWARDS:
            raise RlxError(f"unknown algo.length_reward={length_reward!r}; valid: {', '.join(LENGTH_REWARDS)}")
        if not 0.0 <= fraction <= 1.0:
            raise RlxError(f"algo.fraction={fraction} must be in [0, 1]")
        self.fraction, self.alpha, self.mode, self.threshold = fraction, alpha, mode, threshold
        self.length_reward = sigmoid_length_reward if length_reward == "sigmoid" else kimi_length_reward
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.eps_low, self.eps_high, self.scale, self.loss_agg = eps_low, eps_high, scale, loss_agg
        self.kl_coef, self.kl_estimator, self.reference = kl_coef, kl_estimator, frozen(reference)
        self.dynamic_sampling, self.max_draws, self.minibatches = dynamic_sampling, max_draws, minibatches
        self.loss_kind, self.cispo_max, self.cispo_min = loss, cispo_max, cispo_min
        self.engine, self.is_correction, self.is_clip_min, self.is_clip_max = engine or None, is_correction, \
            is_clip_min, is_clip_max
        self._queue = Replay()  # the minibatches of a rollout still being replayed

    def shaped_rewards(self, rewards: Tensor, correct: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(rewards with S's groups length-penalised, the bool [K] selection S)."""
        G = self.group_size
        ratios, mine = across_ranks(correct.float().view(-1, G).mean(1))  # the groups of every rank's rollout
        K = len(ratios)
        if self.mode == "topk" and self.fraction > 0 and int(self.fraction * K + 1e-9) == 0:
            raise RlxError(f"algo.fraction={self.fraction} of the {K} groups in a micro-batch selects none, so "
                           f"GRPO-lambda would silently be GRPO: raise trainer.micro_batch_size to at least "
                           f"{math.ceil(1 / self.fraction - 1e-9)} prompts (the selection is per micro-batch rollout)")
        chosen = efficiency_groups(ratios, self.fraction, self.mode, self.threshold)[mine]
        out = rewards.float().clone().view(-1, G)
        for k in chosen.nonzero().flatten().tolist():
            out[k] = self.length_reward(lengths.view(-1, G)[k], correct.view(-1, G)[k], self.alpha)
        return out.view(-1), chosen

    def advantages(self, scored: Scored) -> Tensor:
        lengths = scored.rollout.lengths.cpu().float()
        rewards, chosen = self.shaped_rewards(scored.rewards, scored.correct, lengths)
        G = self.group_size
        ratios = scored.correct.float().view(-1, G).mean(1)
        mean_len = lengths.view(-1, G).mean(1)
        scored.metrics["grpo_lambda/selected"] = chosen.float().mean().item()
        for name, rows in (("selected", chosen), ("rest", ~chosen)):
            if rows.any():  # an empty side has no mean: leave it out rather than log NaN
                scored.metrics[f"grpo_lambda/rho_{name}"] = ratios[rows].mean().item()
                scored.metrics[f"grpo_lambda/len_{name}"] = mean_len[rows].mean().item()
        return group_advantages(rewards, G, scale=self.scale, lengths=lengths, gather=batch_concat)

    # Sampling, the rollout and the loss are GRPO's, kept word for word as in rlx/algorithms/grpo.py.

    def _sample(self, examples, state) -> Scored:
        return sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p, engine=self.engine)

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Sample (with dynamic sampling, keep the informative groups), score, compute advantages,
        and cut the rollout into `minibatches` minibatches of whole groups."""
        if self.dynamic_sampling:
            draw = lambda ex: self._sample(ex, state)
            scored, extra = dynamic_sampling(examples, draw, self.group_size, self.max_draws,
                                             state.tokenizer.pad_token_id)
        else:
            scored, extra = self._sample(examples, state), {}
        advantages = self.advantages(scored).to(state.model.device)
        data = rollout_tensors(scored, state, self.temperature, behaviour=self.minibatches > 1,
                               reference=self.reference, sampler=self.engine is not None)
        data["advantages"] = advantages
        weight = lambda mask: aggregation_weight(mask, self.loss_agg, self.max_new_tokens)
        return group_minibatches(data, self.minibatches, self.group_size, weight, {**scored.metrics, **extra})

    def loss(self, batch: dict, state):
        term = policy_term(self.loss_kind, self.eps_low, self.eps_high, self.cispo_max, self.cispo_min)
        return grpo_loss(batch, state, term, temperature=self.temperature, loss_agg=self.loss_agg,
                         max_len=self.max_new_tokens, reference=self.reference, kl_coef=self.kl_coef,
                         kl_estimator=self.kl_estimator, is_correction=self.is_correction,
                         is_clip_min=self.is_clip_min, is_clip_max=self.is_clip_max)
