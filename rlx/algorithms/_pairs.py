"""Offline preference pairs, shared by DPO and the objectives built on its pieces (RPO, MADPO,
SmPO, ...): tokenising a micro-batch of (prompt, chosen, rejected) into one batch, the frozen
reference's summed log-probs (computed once per pair and cached), the policy's, a frozen reward
model's margin per pair, and the implicit-reward metrics every DPO-style run logs.

Conventions (TRL's DPOTrainer): the response is the completion plus EOS and the prompt is masked
(`rlx.data.collate.lm_batch`, as in SFT); log-probs are summed over the response tokens; a batch
holds the chosen rows then the rejected rows, so one forward scores both sides.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlx.data.collate import IGNORE, lm_batch, pair_rows
from rlx.errors import RlxError
from rlx.models import ADAPTERS, reference_model


def response_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each row's labelled tokens [N] and how many there are [N]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def pair_key(example: dict) -> tuple[str, str, str]:
    return example["prompt"], example["chosen"], example["rejected"]


def frozen(policy, what: str):
    """The model of a built `Policy`, in eval mode and without gradients ("adapters" stays itself:
    the LoRA policy's base, `rlx.models.reference_model`)."""
    if policy is None:
        raise RlxError(f"this algorithm needs {what}: set it in its config (e.g. algo.reference='${{model}}')")
    if policy == ADAPTERS:
        return policy
    return policy.model.eval().requires_grad_(False)


class PairBatcher:
    """Tokenised pairs plus the reference's summed log-probs, cached by (prompt, chosen, rejected).

    The cache is TRL's `precompute_ref_log_probs`, but lazy: later epochs reuse it. It is not
    checkpointed; a resumed run recomputes it (the reference is frozen, so the values are the same)."""

    def __init__(self, reference, max_length: int):
        self.reference = frozen(reference, "a frozen reference model")
        self.max_length = max_length
        self.cache: dict[tuple[str, str, str], tuple[float, float]] = {}  # key -> (chosen, rejected)

    def tokenize(self, examples: list[dict], tokenizer, device) -> dict:
        """Chosen rows then rejected rows, in one right-padded batch for a single forward."""
        return {k: v.to(device) for k, v in lm_batch(pair_rows(examples), tokenizer, self.max_length).items()}

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = self.tokenize(examples, state.tokenizer, state.model.device)
        ref = self.reference_logps(examples, state)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.to(state.model.device).unbind(-1)
        batch["num_targets"] = len(examples)  # the loss is a mean over pairs
        batch["num_tokens"] = int((batch["labels"][:, 1:] != IGNORE).sum())  # chosen + rejected targets
        return batch

    @torch.no_grad()
    def reference_logps(self, examples: list[dict], state) -> Tensor:
        """[B, 2] summed reference log-probs (chosen, rejected), computed once per pair."""
        keys = [pair_key(ex) for ex in examples]
        missing = list({key: ex for key, ex in zip(keys, examples) if key not in self.cache}.items())  # deduped
        if missing:
            with reference_model(self.reference, state.model) as reference:
                device = next(reference.parameters()).device
                batch = self.tokenize([ex for _, ex in missing], state.tokenizer, device)
                chosen, rejected = response_logps(reference, batch)[0].cpu().chunk(2)
            for (key, _), c, r in zip(missing, chosen.tolist(), rejected.tolist()):
                self.cache[key] = (c, r)
        return torch.tensor([self.cache[key] for key in keys])


def policy_logps(model, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The policy's summed log-probs of the chosen and rejected responses [B] each, and their
    token counts [B] each (for objectives that average per token)."""
    logps, counts = response_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    return chosen, rejected, chosen_counts, rejected_counts


def reward_metrics(prefix: str, chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict:
    """The implicit-reward metrics TRL logs: margin, accuracy (margin > 0), each side's mean."""
    margin = chosen_rewards - rejected_rewards
    return {
        f"{prefix}/reward_margin": margin.mean().item(),
        f"{prefix}/reward_accuracy": (margin > 0).float().mean().item(),
        f"{prefix}/chosen_reward": chosen_rewards.mean().item(),
        f"{prefix}/rejected_reward": rejected_rewards.mean().item(),
    }


class RewardMargins:
    """A frozen reward model's margin r(x, y_c) − r(x, y_r) per pair, cached by pair (MADPO and
    SmPO weight or rescale each pair by it). `scorer` is a reward callable such as
    `rlx.rewards.RewardModel` (an `algo=rm` checkpoint): `scorer(responses, examples, task)`."""

    def __init__(self, scorer):
        if scorer is None:
            raise RlxError("this algorithm needs a reward model: set algo.reward_model.checkpoint to an algo=rm run")
        self.scorer = scorer
        self.cache: dict[tuple[str, str, str], float] = {}

    def __call__(self, examples: list[dict]) -> Tensor:
        """[B] float32 margins, chosen minus rejected."""
        keys = [pair_key(ex) for ex in examples]
        missing = list({key: ex for key, ex in zip(keys, examples) if key not in self.cache}.items())
        if missing:
            rows = [ex for _, ex in missing]
            scores = self.scorer([ex["chosen"] for ex in rows] + [ex["rejected"] for ex in rows], rows + rows, None)
            chosen, rejected = scores.float().cpu().chunk(2)
            for (key, _), margin in zip(missing, (chosen - rejected).tolist()):
                self.cache[key] = margin
        return torch.tensor([self.cache[key] for key in keys], dtype=torch.float32)
