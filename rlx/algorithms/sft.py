"""Supervised fine-tuning: next-token cross-entropy on the completion (or on all of a text).

    rlx train algo=sft
    rlx train weighting=glow data=reasoning_unfiltered     # per-sample weights (rlx/weighting/)

The loss is the mean over all target tokens of the optimizer step (token-level, as TRL's
SFTTrainer and torchtune's recipes compute it), so sequence length weights examples.

With a `weighting` (the config group; `weighting=none` is `{}`: none) the loss is per sample
instead: each sample's mean token CE `l_i`, weighted by the detached `w = weighting(l, ids)`,
and `mean_i(w_i * l_i)` over the micro-batch, as GLOW's trainer computes it. `num_targets` is
then the number of samples (gradient accumulation averages samples, not tokens) and
`num_tokens` the target tokens; `ids` are the examples' "id" fields (None if any lacks one).
"""
from __future__ import annotations

import torch

from rlx.data.collate import IGNORE, lm_batch, token_nll
from rlx.errors import RlxError


def sample_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[B] mean next-token NLL of each row over its labelled tokens (0 for a row with none)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE,
                                            reduction="none")
    return nll.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


class SFT:
    needs_trained_model = False

    def __init__(self, max_length: int = 256, weighting=None):
        self.max_length = max_length
        if weighting is not None and not callable(weighting):
            if len(weighting):  # `weighting=none` composes to {}; anything else must have been built
                raise RlxError(f"algo.weighting has no _target_ (keys {sorted(weighting)}): choose weighting=<option>")
            weighting = None
        self.weighting = weighting

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = lm_batch(examples, state.tokenizer, self.max_length)
        batch = {k: v.to(state.model.device) for k, v in batch.items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # predicted tokens
        if self.weighting is None:
            batch["num_targets"] = tokens
        else:
            ids = [ex.get("id") for ex in examples]
            batch["ids"] = None if any(i is None for i in ids) else ids
            batch["num_targets"], batch["num_tokens"] = len(examples), tokens
        return batch

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        if self.weighting is None or not hasattr(self.weighting, "state_dict"):
            return {}
        return {"weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "weighting" in state and self.weighting is not None:
            self.weighting.load_state_dict(state["weighting"])

    def loss(self, batch: dict, state):
        if self.weighting is None:
            nll, n = token_nll(state.model, batch)
            loss = nll / n
            return loss, {"train/loss": loss.detach()}
        losses = sample_losses(state.model, batch)
        w = self.weighting(losses.detach(), batch.get("ids")).detach()
        loss = (w * losses).mean()
        metrics = {"train/loss": loss.detach(), "train/sample_loss": losses.detach().mean()}
        return loss, {**metrics, **getattr(self.weighting, "metrics", {})}
