"""RM: a reward model trained with the Bradley-Terry loss on preference pairs.

    rlx train algo=rm data=reasoning_pairs
    rlx train algo=rm data=reasoning_pairs algo.margin=0.5 algo.center_coef=0.01
    rlx train algo=grpo reward=rm reward.terms.rm.checkpoint=outputs/<run>/checkpoints/last   # use it

For a pair (prompt x, chosen y_c, rejected y_r) with scalar rewards r_c = r(x, y_c) and
r_r = r(x, y_r), the per-pair loss is (Bradley & Terry, 1952; Ouyang et al., 2022, eq. 1)

    −log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²

`margin` is Llama 2's preference-strength margin (one value for every pair here), and
`center_coef` is TRL's `center_rewards_coefficient` (Eisenstein et al., 2023): it keeps the
rewards near zero, which the Bradley-Terry loss alone leaves free (it only sees differences).
The loss is the mean over pairs (`num_targets` counts pairs). `rm/accuracy` is the fraction of
pairs with r_c > r_r (TRL's `accuracy`); `rm/margin` the mean r_c − r_r.

Deviation from TRL's RewardTrainer / OpenRLHF (AutoModelForSequenceClassification, a separate
`score` head, Linear(hidden, 1)): the loop trains and saves `state.model`, an ordinary causal
LM built by the `model` group, and its optimizer already holds that model's parameters. So the
scalar head is not a new module but a row of the LM head that is already there ("a designated
logit"):

    r(x, y) = logits[last non-pad position of prompt + response + EOS, reward_token_id]

with `reward_token_id` the tokenizer's EOS id. This is exactly a bias-free linear head on the
last hidden state, `w · h`, whose weight w is the EOS row of `lm_head` (tied to the EOS
embedding in the tiny model, so the embedding trains with it): the same function class as
TRL's `score` head (also bias-free), saved
and loaded as a plain causal LM (`save_pretrained` / `rlx.models.hf`). The price: the model's
next-token distribution is no longer meaningful after RM training (its perplexity and
generation-based eval are not the point of this run), and the head starts from the LM's EOS
logit rather than from zero.

Sequences are tokenised as in SFT and DPO (`rlx.data.collate.lm_batch`): prompt + response +
EOS, right padded, truncated at `max_length` (a truncated row is scored at its last kept token,
as TRL does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.data.collate import lm_batch, pair_rows
from rlx.errors import RlxError


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0,
                       center_coef: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair losses [B] and the pairwise accuracy (a scalar: fraction with r_c > r_r)."""
    # logsigmoid is the stable form of log(σ(x)) for large |x|
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    accuracy = (r_chosen > r_rejected).float().mean().detach()
    return losses, accuracy


def sequence_reward(model, input_ids: Tensor, attention_mask: Tensor, reward_token_id: int) -> Tensor:
    """[N] float32: the logit of `reward_token_id` at each row's last non-pad position.

    Rows are right padded; the last position is found from `attention_mask` (not from the pad
    id, which may equal EOS)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, T, V]
    last = attention_mask.sum(-1).long() - 1  # [N]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return hidden[rows, last, reward_token_id].float()


class RM:
    needs_trained_model = True

    def __init__(self, max_length: int = 256, margin: float = 0.0, center_coef: float = 0.0):
        if max_length < 2:
            raise RlxError(f"algo.max_length={max_length} must be >= 2")
        if center_coef < 0:
            raise RlxError(f"algo.center_coef={center_coef} must be >= 0")
        self.max_length, self.margin, self.center_coef = max_length, margin, center_coef

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = lm_batch(pair_rows(examples), state.tokenizer, self.max_length)
        batch = {k: batch[k].to(state.model.device) for k in ("input_ids", "attention_mask")}
        batch["num_targets"] = len(examples)  # the loss is a mean over pairs
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # chosen + rejected tokens
        return batch

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def loss(self, batch: dict, state):
        rewards = sequence_reward(state.model, batch["input_ids"], batch["attention_mask"],
                                  state.tokenizer.eos_token_id)
        chosen, rejected = rewards.chunk(2)
        losses, accuracy = bradley_terry_loss(chosen, rejected, self.margin, self.center_coef)
        loss = losses.mean()
        return loss, {
            "train/loss": loss.detach(),
            "rm/accuracy": accuracy.item(),
            "rm/margin": (chosen - rejected).mean().item(),
            "rm/chosen": chosen.mean().item(),
            "rm/rejected": rejected.mean().item(),
        }
