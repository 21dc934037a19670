"""The learned critic PPO and T-PPO share: a value model, its optimizer group, and the per-token
rewards GAE runs over."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlx.rollout import positions


class ValueModel(nn.Module):
    """V(prefix) for every response position: a causal LM's decoder and a scalar head."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.get_decoder()  # drops the LM head (unused)
        ref = next(self.backbone.parameters())
        self.head = nn.Linear(lm.config.hidden_size, 1, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
        """[B, response_len] float32: the value before each response token (the state the token is
        chosen in, aligned with `sequence_logprobs`); 0 where masked."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions(attention_mask)).last_hidden_state
        values = self.head(hidden[:, -response_len - 1 : -1]).squeeze(-1).float()
        return values * attention_mask[:, -response_len:]


def critic_group(critic: ValueModel, lr: float | None) -> list[dict]:
    """The critic's parameters as one group of the loop's optimizer (named `critic.*`), at `lr` if
    set (verl's critic.optim.lr), else the optimizer's lr."""
    group = {"params": [(f"critic.{n}", p) for n, p in critic.named_parameters() if p.requires_grad]}
    return [group if lr is None else {**group, "lr": lr}]


def score_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards [B, T]: each sequence's score on its last valid token, minus
    kl_coef * kl on every token (the RLHF reward of Ouyang et al., eq. 2; TRL's PPO)."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    last = mask.sum(-1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores), device=mask.device), last] = scores.to(rewards)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl * mask
    return rewards * mask
