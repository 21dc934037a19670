"""Examples -> tensors. Shared by the objectives and by evaluation, so that a loss and a
perplexity are always computed over the same tokens."""
from __future__ import annotations

import torch

from rlx.errors import RlxError

IGNORE = -100  # label value that cross-entropy skips


def lm_batch(examples: list[dict], tokenizer, max_length: int) -> dict:
    """Right-padded causal-LM batch. Prompt examples train on the completion (+EOS) only;
    text examples train on every token. `labels` holds IGNORE where no loss is taken."""
    rows, masks = [], []
    for ex in examples:
        if "text" in ex:
            prompt, target = [], tokenizer(ex["text"], add_special_tokens=False)["input_ids"]
        else:
            prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            target = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + target)[:max_length]
        rows.append(ids)
        masks.append(([0] * len(prompt) + [1] * len(target))[:max_length])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
    labels = input_ids.masked_fill(~target_mask, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_rows(examples: list[dict], ties: bool = False) -> list[dict]:
    """Preference pairs as `lm_batch` rows: every chosen response, then every rejected one, so a
    single forward scores both sides and `.chunk(2)` splits them again. A pair whose sides come
    from different prompts (SoliReward's cross-prompt pairs) names the rejected side's own in
    "prompt_rejected". Tie pairs ("tie": true) are refused unless `ties`: an objective that reads
    every pair as "chosen beats rejected" would learn noise from them."""
    if examples and not {"chosen", "rejected"} <= set(examples[0]):
        raise RlxError("this algorithm trains on preference pairs (prompt, chosen, rejected), and the data has "
                       f"fields {sorted(examples[0])}: add data=reasoning_pairs")
    if not ties and any(ex.get("tie") for ex in examples):
        raise RlxError("the pairs include ties (data.ties > 0), which only algo=rm algo.loss=bt_ties trains on: "
                       "set data.ties=0")
    return [{"prompt": ex.get(f"prompt_{side}", ex["prompt"]), "completion": ex[side]}
            for side in ("chosen", "rejected") for ex in examples]


def prompt_batch(prompts: list[str], tokenizer, device) -> dict:
    """Left-padded prompts for generation (so every row's next token is at the end)."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_nll(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return nll, (labels != IGNORE).sum()
