"""GLOW: Gain-based LOss Weighting of SFT samples by their progress since the last visit.

    rlx train weighting=glow data=reasoning_unfiltered
    rlx train weighting=glow weighting.alpha=1 weighting.beta=20

Paper: "Learning from Mistakes: Negative Reasoning Samples Enhance Out-of-Domain Generalization"
(Tian et al., 2026, arXiv 2601.04992); official code github.com/Eureka-Maggie/GLOW,
`CustomSeq2SeqTrainer.compute_loss` in LLaMA-Factory/src/llamafactory/train/sft/trainer.py.

For each sample i of a micro-batch, with l_i its mean token CE in this step's forward pass:
    gain     d_i = l_i^prev - l_i           (l_i^prev: its loss at its previous visit)
    weight   w_i = clamp(alpha * (1 - sigmoid(beta * d_i)), w_min, w_max)
    loss     mean_i(w_i * l_i), w detached (SFT computes it; rlx/algorithms/sft.py)
then prev[i] = l_i. A sample that improved a lot ("mastered") weighs little, one that stagnates
or regresses (d_i <= 0) weighs more. With alpha = 2, d = 0 gives exactly 1; d = 0.1 gives
2(1 - sigmoid(1)) = 0.5379, d = -0.1 gives 1.4621, d = 0.5 gives 0.0134, clamped to 0.5.

Defaults alpha 2, beta 10 are the released configs' (model_yamls/qwen3b_math_2_10.yaml: "alpha:
2.0, beta: 10.0"); w_min 0.5, w_max 5 are the trainer's DYN_LOSS_MIN_WEIGHT / _MAX_WEIGHT.

Deviations:
* The official trainer weighs nothing while `state.epoch < 1` and afterwards falls back to the
  micro-batch's mean loss for an id it has no history of. rlx's loop has no epochs to ask, so a
  sample's *first visit* weighs 1 (no history, no gain) at any time. That is the same in the
  first epoch (every visit is a first one); it differs only for the few samples an epoch's
  dropped tail first shows in a later epoch (rlx.data.stream drops a tail shorter than a batch).
* The history is checkpointed (`state_dict`), so a resumed run weighs as the straight one; the
  official dictionary is a module global that a restart loses.
* One process: no all-gather of the history across ranks (rlx trains on one device).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.weighting import weight_metrics


def glow_weights(gain: Tensor, alpha: float, beta: float, w_min: float, w_max: float) -> Tensor:
    """clamp(alpha * (1 - sigmoid(beta * gain)), w_min, w_max), the paper's weight of a gain."""
    return (alpha * (1 - torch.sigmoid(beta * gain))).clamp(w_min, w_max)


class GLOW:
    def __init__(self, alpha: float = 2.0, beta: float = 10.0, w_min: float = 0.5, w_max: float = 5.0):
        if alpha <= 0 or beta <= 0:
            raise RlxError(f"GLOW needs alpha > 0 and beta > 0 (got alpha={alpha}, beta={beta})")
        if not 0 <= w_min <= w_max:
            raise RlxError(f"GLOW's clamp needs 0 <= w_min <= w_max (got w_min={w_min}, w_max={w_max})")
        self.alpha, self.beta, self.w_min, self.w_max = alpha, beta, w_min, w_max
        self.prev_loss: dict = {}  # sample id -> its loss at its last visit
        self.metrics: dict[str, float] = {}

    def __call__(self, losses: Tensor, ids: list | None) -> Tensor:
        if ids is None:
            raise RlxError("weighting=glow keys each sample's previous loss by its id, and this data has none: "
                           "use data=reasoning_unfiltered (or give every example an 'id')")
        losses = losses.detach().float()
        seen = torch.tensor([i in self.prev_loss for i in ids], device=losses.device)
        prev = torch.tensor([self.prev_loss.get(i, 0.0) for i in ids], device=losses.device)
        gain = torch.where(seen, prev - losses, torch.zeros_like(losses))
        w = torch.where(seen, glow_weights(gain, self.alpha, self.beta, self.w_min, self.w_max), torch.ones_like(losses))
        for i, value in zip(ids, losses.tolist()):
            self.prev_loss[i] = value
        # weight/gain: the mean gain of the revisited samples (0 while none is), as the official log's avg_delta_l
        revisited = seen.float().mean().item()
        self.metrics = {**weight_metrics(w), "weight/revisited": revisited,
                        "weight/gain": gain.sum().item() / max(int(seen.sum()), 1)}
        return w

    def state_dict(self) -> dict:
        return {"prev_loss": dict(self.prev_loss)}

    def load_state_dict(self, state: dict) -> None:
        self.prev_loss = dict(state.get("prev_loss", {}))
