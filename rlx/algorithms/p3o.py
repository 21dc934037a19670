"""P3O: pairwise proximal policy optimisation (Wu, Zhu, Zhang, Wen, Ramchandran and Jiao, 2023,
arXiv 2310.00212): RL on relative feedback, two responses per prompt, trajectory-level ratios, no
critic.

    rlx train algo=p3o                                  # correctness reward, KL 0.05 to the SFT base
    rlx train algo=p3o reward=rm reward.terms.rm.checkpoint=PATH algo.clip=joint
    rlx train -m algo=p3o algo.beta=0.01,0.05,0.2       # a KL-reward frontier

Why: a reward model trained on comparisons is known only up to a per-prompt shift r(x, y) + c(x)
(the paper's Definition 1). PPO's advantages are not invariant to that shift until its critic
learns it; P3O uses only the difference of two responses' rewards, so the shift cancels exactly.

Per rollout each prompt is sampled twice (rows 2i and 2i+1 are a pair, GRPO's sampling with a
group of 2). With sequence log-probabilities summed over the response tokens,

    R(x, y) = r(x, y) - beta * sum_t [log pi_old - log pi_ref](y_t)       KL-regularised reward
    Delta   = (R(x, y1) - R(x, y2)) / 2
    rho_k   = exp( sum_t [log pi_theta - log pi_old](y_k,t) )                k = 1, 2

the pairwise policy gradient (the paper's Eq. 6) is E[Delta grad log(pi(y1) / pi(y2))], and its
two clipped surrogates (the paper's section 4.2) are

    separate (V1): L = -mean_pairs [ min(rho1 Delta, clip(rho1) Delta) + min(rho2 (-Delta), clip(rho2) (-Delta)) ]
    joint    (V2): L = -mean_pairs   min(rho12 Delta, clip(rho12) Delta),    rho12 = rho1 / rho2

with clip(.) to [1 - eps, 1 + eps]. At theta = theta_old both have the gradient -Delta (grad log
pi(y1) - grad log pi(y2)), the negative PPG (tested). The paper's text of section 4.2 could not be
read: these forms are rebuilt from its abstract, its blog post and a third-party extraction, so
that their gradient at the start is Eq. 6's; `clip` picks either. Deviations and open choices:
* V2 is taken in the order the pair was sampled (the two samples are exchangeable, so the
  order is random); it is not symmetrised by averaging both orders. V1 is symmetric;
* the KL term is the sampled sequence log-ratio to the reference under the behaviour policy, a
  constant of the loss (in R), as PPO-style RLHF puts it in the reward; `beta=0` needs no reference;
* sequence log-ratios are clamped to +-20 before exp (verl's guard), so a long response cannot
  overflow;
* the paper's numeric settings were not found: eps 0.2, 2 epochs over each rollout, beta 0.05
  are rlx's choices (PPO's defaults), `epochs` x `minibatches` optimizer steps per rollout.

The loss is a mean over the pairs of the minibatch; the loop weighs micro-batches by pairs.
Metrics besides the rollout's: rl/clip_frac (share of clipped terms), p3o/delta (mean |Delta|),
p3o/tie_frac (pairs with Delta = 0, no signal), rl/kl (mean sequence log-ratio to the reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.algorithms._group import frozen, rollout_tensors
from rlx.algorithms._replay import Replay, ReplayedRollouts, minibatches
from rlx.algorithms._rl import _MAX_LOG_RATIO, masked_mean
from rlx.algorithms._sampling import sample_and_score
from rlx.errors import RlxError
from rlx.rollout import sequence_logprobs_and_entropy

CLIPS = ("separate", "joint")


# ---------------------------------------------------------------------------- the objective


def kl_regularised_rewards(rewards: Tensor, old_seq: Tensor, ref_seq: Tensor | None, beta: float) -> Tensor:
    """[B] R = r - beta * (log pi_old(y) - log pi_ref(y)), sequence log-probs; r itself without a reference."""
    if ref_seq is None or beta == 0:
        return rewards.float()
    return rewards.float() - beta * (old_seq - ref_seq).float()


def pair_deltas(rewards: Tensor) -> Tensor:
    """[P] Delta = (R(y1) - R(y2)) / 2 for rows laid out pair after pair."""
    if rewards.numel() % 2:
        raise ValueError(f"{rewards.numel()} rows do not form pairs")
    pairs = rewards.view(-1, 2)
    return (pairs[:, 0] - pairs[:, 1]) / 2


def p3o_loss(seq_log_ratio: Tensor, delta: Tensor, eps: float = 0.2, clip: str = "separate") -> tuple[Tensor, Tensor]:
    """(loss, clip fraction) of one minibatch. `seq_log_ratio` [2P]: sum_t log pi_theta - log pi_old
    of each response, pair after pair; `delta` [P]. The loss is the mean over pairs."""
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, not {clip!r}")
    log_ratio = seq_log_ratio.view(-1, 2)
    if clip == "separate":
        advantage = torch.stack([delta, -delta], dim=1)  # y1 pushed up by Delta, y2 by -Delta
        rho = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    else:
        advantage = delta[:, None]
        rho = (log_ratio[:, :1] - log_ratio[:, 1:]).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    surrogate = torch.minimum(rho * advantage, rho.clamp(1 - eps, 1 + eps) * advantage)
    clipped = ((rho > 1 + eps) & (advantage > 0)) | ((rho < 1 - eps) & (advantage < 0))
    return -surrogate.sum(1).mean(), clipped.float().mean()


# ---------------------------------------------------------------------------- the algorithm


class P3O(ReplayedRollouts):
    needs_trained_model = True

    def __init__(self, reward, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 eps: float = 0.2, clip: str = "separate", beta: float = 0.05, reference=None,
                 epochs: int = 2, minibatches: int = 1):
        if clip not in CLIPS:
            raise RlxError(f"unknown algo.clip={clip!r}; valid: {', '.join(CLIPS)}")
        if beta < 0 or eps <= 0:
            raise RlxError(f"algo.beta={beta} must be >= 0 and algo.eps={eps} > 0")
        if beta > 0 and reference is None:
            raise RlxError("algo.beta > 0 is a KL to a reference model: add algo.reference='${model}' (or algo.beta=0)")
        if epochs < 1 or minibatches < 1:
            raise RlxError("algo.epochs and algo.minibatches must be >= 1")
        self.reward, self.max_new_tokens, self.temperature, self.top_p = reward, max_new_tokens, temperature, top_p
        self.eps, self.clip, self.beta, self.reference = eps, clip, beta, frozen(reference)
        self.epochs, self.minibatches = epochs, minibatches
        self._queue = Replay()  # the minibatches of a rollout still being replayed

    @torch.no_grad()
    def _rollout(self, examples, state) -> list[dict]:
        """Two responses per prompt, their KL-regularised rewards and each pair's Delta, cut into
        `epochs` passes of `minibatches` minibatches of whole pairs."""
        scored = sample_and_score(examples, state, self.reward, n=2, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p)
        reference = self.reference if self.beta > 0 else None
        data = rollout_tensors(scored, state, self.temperature, behaviour=True, reference=reference)
        mask = data["response_mask"]
        old_seq = (data["old_logprobs"] * mask).sum(-1).cpu()
        ref_seq = (data["ref_logprobs"] * mask).sum(-1).cpu() if reference is not None else None
        delta = pair_deltas(kl_regularised_rewards(scored.rewards, old_seq, ref_seq, self.beta))
        data["delta"] = delta.repeat_interleave(2).to(mask.device)  # per row, so minibatches cut it with its pair
        metrics = {**scored.metrics, "p3o/delta": delta.abs().mean().item(),
                   "p3o/tie_frac": (delta == 0).float().mean().item()}
        if ref_seq is not None:
            metrics["rl/kl"] = (old_seq - ref_seq).mean().item()
        pairs = lambda m: m.shape[0] // 2  # the loss is a mean over pairs
        return minibatches(data, min(self.minibatches, mask.shape[0] // 2), pairs, metrics, epochs=self.epochs,
                           group_size=2, shuffle=self.epochs * self.minibatches > 1)

    def loss(self, batch: dict, state):
        mask = batch["response_mask"]
        logprobs, entropy = sequence_logprobs_and_entropy(state.model, batch["input_ids"], batch["attention_mask"],
                                                          mask.shape[1], self.temperature)
        seq_log_ratio = ((logprobs - batch["old_logprobs"]) * mask).sum(-1)
        loss, clip_frac = p3o_loss(seq_log_ratio, batch["delta"][0::2], self.eps, self.clip)
        metrics = {**batch["metrics"], "rl/clip_frac": clip_frac.item(),
                   "rl/entropy": masked_mean(entropy, mask).item(), "train/loss": loss.detach()}
        return loss, metrics
