"""Held-out evaluation: accuracy and response length from greedy generation (prompt tasks),
loss and perplexity from teacher forcing (every task).

Used by the loop every `trainer.eval_every` steps and by `rlx eval`.
"""
from __future__ import annotations

import math

import torch

from rlx.data.collate import lm_batch, prompt_batch, token_nll


@torch.no_grad()
def perplexity(model, tokenizer, examples: list[dict], batch_size: int, max_length: int) -> dict:
    nll, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in lm_batch(examples[i : i + batch_size], tokenizer, max_length).items()}
        s, c = token_nll(model, batch)
        nll, n = nll + s.item(), n + c.item()
    loss = nll / max(n, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy completions (decoded, without the prompt) and their lengths in tokens (EOS included)."""
    batch = prompt_batch(prompts, tokenizer, model.device)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[:, batch["input_ids"].shape[1] :]
    lengths = []
    for row in out.tolist():
        eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        lengths.append(eos)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts, lengths


@torch.no_grad()
def answers(model, tokenizer, task, examples: list[dict], batch_size: int, max_new_tokens: int) -> tuple[list, list]:
    """Per example: whether the greedy answer is correct (task.score) and the response length."""
    correct, lengths = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        texts, lens = generate(model, tokenizer, [ex["prompt"] for ex in chunk], max_new_tokens)
        correct += [task.score(t, ex) for t, ex in zip(texts, chunk)]
        lengths += lens
    return correct, lengths


@torch.no_grad()
def evaluate(model, tokenizer, task, split: str, num_samples: int, batch_size: int,
             max_new_tokens: int, max_length: int) -> dict:
    """`eval/accuracy`, `eval/response_len` (prompt tasks) and `eval/loss`, `eval/perplexity`."""
    was_training = model.training
    model.eval()
    examples = list(task.split(split))[:num_samples]
    metrics = perplexity(model, tokenizer, examples, batch_size, max_length)
    if examples and "prompt" in examples[0]:
        correct, lengths = answers(model, tokenizer, task, examples, batch_size, max_new_tokens)
        metrics["eval/accuracy"] = sum(correct) / len(correct)
        metrics["eval/response_len"] = sum(lengths) / len(lengths)
    model.train(was_training)
    return metrics
