"""DRPO: decoupled reward policy optimisation (Li, Chen, Lin and Yang, 2025, arXiv 2510.04474), a
length-aware extension of DisCO that never pushes a correct response down for being long.

    rlx train algo=drpo model=tiny_sft
    rlx train algo=drpo model=tiny_sft algo.lam=0.01      # a stronger pull toward short answers
    rlx train algo=drpo model=tiny_sft algo.lam=1e9       # uniform weights: DisCO with the logL score

Why: GRPO with an additive length penalty centres correct - c |o| / L in the group, so a correct
but long response can land below the group mean and be pushed away. DRPO keeps the two signals
apart: correct versus incorrect is a contrastive objective, and length only reweights the
correct responses among themselves, so every correct response gets a push of the same sign.

Per rollout, each prompt is sampled `group_size` times (GRPO's sampling and minibatch replay,
from the shared pieces in `rlx.algorithms._group`) and every response is split by the task's
checker into O+ (correct) and O- (incorrect), which the rollout batch carries as `correct`. With
the score s(o) = (1/|o|) sum_t log pi(o_t | q, o_<t) at the sampling temperature,

    r_l(o) = 1 - |o| / L_max                                  L_max = max_new_tokens
    w(o)   = exp(r_l(o)/lam) / sum_{o' in O+} exp(r_l(o')/lam)        over O+ only
    J_q    = sum_{o in O+} w(o) s(o) - tau log( (1/|O-|) sum_{o' in O-} exp(s(o')/tau) )
    KL_old = token mean of (log pi_old - log pi) over the minibatch       (k1)
    loss   = -(1/N) sum_q J_q + (beta/2) max(KL_old - delta, 0)^2

with J_q = 0 for a group that lacks O+ or O-, and N = every prompt of the micro-batch, valid or
not. w is the closed-form tilt of the policy's correct answers toward higher r_l under a KL
penalty (weight lam), reached by self-normalised importance weights; lam -> inf gives DisCO.
The equations are rebuilt from the paper's abstract and the official code
(`compute_policy_loss_drpo`, Optimization-AI/DRPO), so the score, the 1/N normaliser, the k1 trust region and its squared hinge are the
code's choices, not checked against the paper's text.

Deviations, on purpose:
* correctness is the task's checker (`Scored.correct`), whatever the `reward` config says: the
  official code splits on reward == 1 / == 0, which is the same thing for a 0/1 reward. The
  reward config is still computed and logged (reward/*), e.g. to compare with a penalised one;
* the loss value is the true objective. The official code computes the negatives' log-mean-exp
  as S / stopgrad(S) and the penalty as stopgrad(max(beta (KL - delta), 0)) KL: the same
  gradients, but a printed loss that is not -J;
* the weights are a masked softmax (max subtracted), not the code's raw exp(r_l / lam), which
  overflows float32 for lam below ~0.012; the values are the same;
* L_max is the configured `max_new_tokens`, not the padded width: rlx pads each rollout to
  its longest response, so the padded width would change r_l from batch to batch;
* under gradient accumulation each micro-batch has its own KL_old and penalty, averaged by
  prompts (as verl does per micro-batch); the J part accumulates exactly (num_targets = prompts);
* no PPO ratio clipping, no reference model and no entropy bonus, as in the official scripts.

The trust region only acts when a rollout is replayed as several minibatches (`minibatches`,
default 4 as the paper's 4 updates per rollout): on the first minibatch, or with minibatches=1,
pi_old is the current policy and KL_old = 0.

Defaults are the paper's 1.5B script (lam 0.1, tau 10, delta 1e-4, beta 1e3, 8 samples per prompt,
4 minibatches per rollout) except the sampling temperature (paper 0.6; 1.0 here, as GRPO) and the
length budget (8192 there; 128 for the embedded task's ~30-token traces).

Metrics besides GRPO's shared ones: rl/valid_groups (share of groups with both a correct and an
incorrect response), drpo/max_weight (largest w in a valid group, averaged: 1/|O+| is uniform,
1 keeps only one response), drpo/correct_len (mean length of correct responses, 0 if none),
drpo/objective (sum_q J_q / N), drpo/kl_old and drpo/penalty.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.algorithms._group import check_settings, group_minibatches, rollout_tensors
from rlx.algorithms._replay import Replay, ReplayedRollouts
from rlx.algorithms._rl import masked_mean
from rlx.algorithms._sampling import Scored, sample_and_score
from rlx.errors import RlxError
from rlx.rollout import sequence_logprobs_and_entropy

# ---------------------------------------------------------------------------- the objective
# Rows are laid out group after group, as rlx samples them; `correct` is 0/1 per row.


def _grouped(x: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or x.numel() % group_size:
        raise ValueError(f"{x.numel()} rows do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def valid_groups(correct: Tensor, group_size: int) -> Tensor:
    """[Q] bool: the groups with at least one correct and one incorrect response."""
    pos = _grouped(correct, group_size) > 0.5
    return pos.any(1) & (~pos).any(1)


def positive_weights(lengths: Tensor, correct: Tensor, max_len: int, lam: float, group_size: int) -> Tensor:
    """[B] w(o): softmax of r_l / lam over each group's correct responses, r_l = 1 - |o| / max_len;
    0 on incorrect responses (and on every response of a group with none correct)."""
    pos = _grouped(correct, group_size) > 0.5
    r_l = 1.0 - _grouped(lengths, group_size).float() / max_len
    logits = (r_l / lam).masked_fill(~pos, float("-inf"))
    logits = logits.masked_fill(~pos.any(1, keepdim=True), 0.0)  # an empty O+ would softmax to NaN
    return (logits.softmax(1) * pos).reshape(-1)


def drpo_objective(scores: Tensor, correct: Tensor, weights: Tensor, tau: float, group_size: int) -> Tensor:
    """[Q] J_q = sum_{O+} w s - tau log mean_{O-} exp(s / tau); exactly 0, with 0 gradient, for a
    group lacking O+ or O-."""
    s = _grouped(scores, group_size)
    pos = _grouped(correct, group_size) > 0.5
    valid = pos.any(1) & (~pos).any(1)
    # In an invalid group every row stands in as a negative, so nothing below is -inf or NaN
    # (a NaN would survive the final `where` in the backward pass as 0 * NaN).
    neg = ~pos | ~valid[:, None]
    log_mean_exp = (s / tau).masked_fill(~neg, float("-inf")).logsumexp(1) - neg.sum(1).float().log()
    positive = (_grouped(weights, group_size) * s).sum(1)
    return torch.where(valid, positive - tau * log_mean_exp, 0.0)


def trust_region_penalty(kl: Tensor, delta: float, beta: float) -> Tensor:
    """(beta/2) max(KL - delta, 0)^2: zero inside the budget; d/dKL = beta (KL - delta) beyond it
    (the official code's stopgrad(max(beta (KL - delta), 0)) * KL has the same gradient)."""
    return 0.5 * beta * (kl - delta).clamp(min=0).square()


def drpo_loss(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, correct: Tensor, max_len: int, *,
              lam: float, tau: float, delta: float, beta: float, group_size: int) -> tuple[Tensor, dict]:
    """The loss of one micro-batch: -(1/N) sum_q J_q + the trust-region penalty, N = all its groups."""
    scores = masked_mean(logprobs, mask, dim=-1)  # length-normalised log-likelihood
    weights = positive_weights(mask.sum(-1), correct, max_len, lam, group_size)
    objective = drpo_objective(scores, correct, weights, tau, group_size).mean()  # mean over all N
    kl = masked_mean(old_logprobs - logprobs, mask)  # k1 estimate of KL(pi_old || pi)
    penalty = trust_region_penalty(kl, delta, beta)
    metrics = {"drpo/objective": objective.item(), "drpo/kl_old": kl.item(), "drpo/penalty": penalty.item()}
    return -objective + penalty, metrics


# ---------------------------------------------------------------------------- the algorithm


class DRPO(ReplayedRollouts):
    needs_trained_model = True

    def __init__(
        self,
        reward,
        group_size: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        lam: float = 0.1,
        tau: float = 10.0,
        delta: float = 1e-4,
        beta: float = 1e3,
        minibatches: int = 4,
    ):
        if lam <= 0 or tau <= 0:
            raise RlxError(f"algo.lam={lam} and algo.tau={tau} are temperatures: both must be > 0")
        if delta < 0 or beta < 0:
            raise RlxError(f"algo.delta={delta} (KL budget) and algo.beta={beta} (penalty) must be >= 0")
        if max_new_tokens < 1:
            raise RlxError(f"algo.max_new_tokens={max_new_tokens} must be >= 1: it is L_max of the length reward")
        check_settings(group_size, minibatches=minibatches)
        self.reward, self.group_size, self.max_new_tokens = reward, group_size, max_new_tokens
        self.temperature, self.top_p, self.minibatches = temperature, top_p, minibatches
        self.lam, self.tau, self.delta, self.beta = lam, tau, delta, beta
        self._queue = Replay()  # the minibatches of a rollout still being replayed

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Sample and score (GRPO's), log the contrast's shape, and cut the rollout into
        `minibatches` minibatches of whole groups. The batch carries each response's checker
        correctness; the response lengths travel in its response_mask."""
        scored = sample_and_score(examples, state, self.reward, n=self.group_size, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p)
        scored.metrics.update(self._contrast_metrics(scored))
        data = rollout_tensors(scored, state, self.temperature, behaviour=self.minibatches > 1)
        data["correct"] = scored.correct.float().to(state.model.device)
        G = self.group_size
        prompts = lambda mask: mask.shape[0] // G  # the loss averages over prompts, so accumulation weighs by them
        return group_minibatches(data, self.minibatches, G, prompts, dict(scored.metrics))

    def _contrast_metrics(self, scored: Scored) -> dict:
        """rl/valid_groups, drpo/max_weight and drpo/correct_len of one rollout."""
        G, correct = self.group_size, scored.correct.float()
        valid = valid_groups(correct, G)
        lengths = scored.rollout.lengths.float().cpu()
        weights = positive_weights(lengths, correct, self.max_new_tokens, self.lam, G)
        max_weight = weights.view(-1, G).max(1).values[valid]
        return {
            "rl/valid_groups": valid.float().mean().item(),
            "drpo/max_weight": max_weight.mean().item() if valid.any() else 0.0,
            "drpo/correct_len": lengths[correct > 0.5].mean().item() if correct.any() else 0.0,
        }

    def loss(self, batch: dict, state):
        mask = batch["response_mask"]
        logprobs, entropy = sequence_logprobs_and_entropy(state.model, batch["input_ids"], batch["attention_mask"],
                                                          mask.shape[1], self.temperature)
        old = batch.get("old_logprobs", logprobs.detach())  # minibatches=1: old = current, KL_old = 0
        loss, drpo_metrics = drpo_loss(logprobs, old, mask, batch["correct"], self.max_new_tokens, lam=self.lam,
                                       tau=self.tau, delta=self.delta, beta=self.beta, group_size=self.group_size)
        metrics = {**batch["metrics"], **drpo_metrics, "rl/entropy": masked_mean(entropy, mask).item()}
        metrics["train/loss"] = loss.detach()
        return loss, metrics
