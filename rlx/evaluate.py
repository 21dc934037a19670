"""Held-out evaluation: accuracy and response length from greedy generation (prompt tasks),
loss and perplexity from teacher forcing (every task), sampled answers for pass@k, and the
standard errors the benchmarks report.

Used by the loop every `trainer.eval_every` steps, by `rlx eval` and by scripts/bench_*.py.
"""
from __future__ import annotations

import math

import torch

from rlx.data.collate import lm_batch, prompt_batch, token_nll
from rlx.rollout import sample

# ---------------------------------------------------------------------------- statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: list[list[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct` holds each problem's samples."""
    return sum(pass_at_k(len(s), sum(s), k) for s in correct) / len(correct)


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error sd / sqrt(n) (sample sd, n - 1); the error is nan below 2 values."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def proportion_se(p: float, n: int) -> float:
    """The binomial standard error of a proportion p measured on n trials: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)


def paired_difference(before: list[bool], after: list[bool]) -> tuple[float, float]:
    """The mean per-item change (after - before) and its standard error: much tighter than two
    independent accuracies' when most items come out alike."""
    return mean_se([float(a) - float(b) for b, a in zip(before, after, strict=True)])


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks; nan with fewer than 3 points or a constant side."""
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def concordant(x: list[float], y: list[float]) -> tuple[int, int]:
    """How many pairs (i, j) x orders as y does (strictly, both the same way), out of all pairs."""
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    return sum((x[i] - x[j]) * (y[i] - y[j]) > 0 for i, j in pairs), len(pairs)


# ---------------------------------------------------------------------------- generation


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
        synced_gpus=False,  # under FSDP2 rank 0 evaluates alone, with the weights gathered (rlx.distributed)
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
def sampled_answers(model, tokenizer, task, examples: list[dict], samples: int, max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 1234, batch_size: int = 256) -> dict:
    """`samples` sampled answers to each example (`rlx.rollout.sample` at `temperature`, one seeded
    generator for the whole pass): per example, whether each is correct (task.score), the texts and
    the lengths in tokens (EOS included). `mean_pass_at_k(out["correct"], 1)` is the sampled accuracy."""
    rows = [ex for ex in examples for _ in range(samples)]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    texts, lengths = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = prompt_batch([ex["prompt"] for ex in chunk], tokenizer, model.device)
        rollout = sample(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         temperature=temperature, generator=generator)
        texts += tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        lengths += rollout.lengths.tolist()
    correct = [task.score(t, ex) for t, ex in zip(texts, rows, strict=True)]
    group = lambda xs: [xs[i : i + samples] for i in range(0, len(xs), samples)]
    return {"correct": group(correct), "texts": group(texts), "lengths": group(lengths)}


def sampled_metrics(answers: dict, ks: tuple[int, ...] = ()) -> dict:
    """What `sampled_answers` amounts to: the sampled accuracy (pass@1 over all samples), pass@k for
    each of `ks`, the mean and 90th-percentile response length, and tokens spent per correct answer."""
    correct = [c for group in answers["correct"] for c in group]
    lengths = torch.tensor([n for group in answers["lengths"] for n in group], dtype=torch.float32)
    return {"accuracy": sum(correct) / len(correct), **{f"pass@{k}": mean_pass_at_k(answers["correct"], k) for k in ks},
            "mean_len": lengths.mean().item(), "p90_len": lengths.quantile(0.9).item(),
            "tokens_per_correct": lengths.sum().item() / max(sum(correct), 1)}


@torch.no_grad()
def evaluate(model, tokenizer, task, split: str, num_samples: int, batch_size: int,
             max_new_tokens: int, max_length: int) -> dict:
    """`eval/accuracy`, `eval/response_len` (prompt tasks; per `difficulty` too where the examples
    carry one: `eval/accuracy_hard`) and `eval/loss`, `eval/perplexity`."""
    was_training = model.training
    model.eval()
    examples = list(task.split(split))[:num_samples]
    metrics = perplexity(model, tokenizer, examples, batch_size, max_length)
    if examples and "prompt" in examples[0]:
        correct, lengths = answers(model, tokenizer, task, examples, batch_size, max_new_tokens)
        metrics["eval/accuracy"] = sum(correct) / len(correct)
        metrics["eval/response_len"] = sum(lengths) / len(lengths)
        for level in sorted({ex["difficulty"] for ex in examples if "difficulty" in ex}):  # e.g. easy / hard
            rows = [i for i, ex in enumerate(examples) if ex.get("difficulty") == level]
            metrics[f"eval/accuracy_{level}"] = sum(correct[i] for i in rows) / len(rows)
            metrics[f"eval/response_len_{level}"] = sum(lengths[i] for i in rows) / len(rows)
    model.train(was_training)
    return metrics
