"""Supervised fine-tuning: next-token cross-entropy on the completion (or on all of a text).

    rlx train algo=sft

The loss is the mean over all target tokens of the optimizer step (token-level, as TRL's
SFTTrainer and torchtune's recipes compute it), so sequence length weights examples.
"""
from __future__ import annotations

from rlx.data.collate import IGNORE, lm_batch, token_nll


class SFT:
    needs_trained_model = False

    def __init__(self, max_length: int = 256):
        self.max_length = max_length

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = lm_batch(examples, state.tokenizer, self.max_length)
        batch = {k: v.to(state.model.device) for k, v in batch.items()}
        batch["num_targets"] = int((batch["labels"][:, 1:] != IGNORE).sum())  # predicted tokens
        return batch

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def loss(self, batch: dict, state):
        nll, n = token_nll(state.model, batch)
        loss = nll / n
        return loss, {"train/loss": loss.detach()}
