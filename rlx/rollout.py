"""Rollouts: batched sampling from a causal LM with a KV cache, for the RL algorithms' `make_batch`.

    rollout = sample(model, prompt_ids, prompt_mask, max_new_tokens=64, eos_token_id=eos,
                     pad_token_id=pad, temperature=1.0, top_p=1.0, generator=g)
    rollout.response_ids, rollout.response_mask, rollout.logprobs, rollout.finished, rollout.lengths
    input_ids, attention_mask = rollout.sequences()      # prompt + response, for a training forward
    old = sequence_logprobs(model, input_ids, attention_mask, rollout.response_ids.shape[1], temperature=1.0)
    rollout = extend(model, rollout, max_new_tokens=64, ...)  # continue the rows that were cut off

Prompts come left-padded (`rlx.data.collate.prompt_batch`); responses are right-padded with
`pad_token_id`. A row stops after it emits EOS (EOS is part of its response: mask 1) or after
`max_new_tokens`; a row cut off by the budget has `finished == False`. That is T-PPO's
truncation: sample with the budget, train on the partial responses, and later `extend` the
unfinished rows (finished rows come back unchanged). Decode with
`tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)`.

Log-prob convention: `logprobs[b, t]` is log_softmax(logits / T) at the sampled token, i.e. the
log-prob under the *policy at temperature T*, not renormalised over the top-p nucleus (as TRL
and verl report it). The nucleus is a sampling device; the importance ratios of PPO/GRPO compare
the training policy's log_softmax(logits / T) against this number, and renormalising would make
the ratio of an unchanged policy differ from 1. With temperature 0 (greedy) the log-probs are
those at temperature 1. `sequence_logprobs` computes the same quantity by a full forward pass;
the two agree to float rounding (the tests check 1e-5 in fp32).

Sampling is reproducible given a `torch.Generator` (same seed, same device -> same tokens). The
sampled token is argmax(p / E) with E ~ Exp(1) drawn from the generator, which is an exact draw
from p (the exponential race) and needs no per-row multinomial. The draws depend on the batch
(its rows and which of them are still generating), not only on the seed.

Speed: the KV cache is a transformers StaticCache (written in place; a DynamicCache re-copies
every layer's keys and values each step, which was the largest cost on a CPU), the attention
mask is allocated once, and rows that have finished are dropped from the batch. On 2 CPU
cores this is about 2x HF `generate` + a log-prob pass (scripts/bench_rollout.py).
`model.forward = torch.compile(model.forward, dynamic=True)` works with it; there it cost
~40 s of compilation for ~12% per rollout, so it is left to the caller.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from transformers import StaticCache

from rlx.errors import RlxError


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 on prompt tokens
    response_ids: Tensor  # [B, R] right-padded with pad_token_id
    response_mask: Tensor  # [B, R] 1 on generated tokens (EOS included), 0 after
    logprobs: Tensor  # [B, R] float32, log_softmax(logits / T) of the sampled token; 0 where masked
    finished: Tensor  # [B] bool, True where the row emitted EOS

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: Tensor) -> Rollout:
        """The given rows, in that order."""
        return Rollout(*(getattr(self, f.name)[rows] for f in fields(self)))

    @staticmethod
    def concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
        """One rollout of all rows: prompts left-padded and responses right-padded to the widest."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        R = max(r.response_ids.shape[1] for r in rollouts)
        left = lambda x, fill: torch.cat([x.new_full((x.shape[0], P - x.shape[1]), fill), x], 1)
        right = lambda x, fill: torch.cat([x, x.new_full((x.shape[0], R - x.shape[1]), fill)], 1)
        return Rollout(torch.cat([left(r.prompt_ids, pad_token_id) for r in rollouts]),
                       torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
                       torch.cat([right(r.response_ids, pad_token_id) for r in rollouts]),
                       torch.cat([right(r.response_mask, 0) for r in rollouts]),
                       torch.cat([right(r.logprobs, 0.0) for r in rollouts]),
                       torch.cat([r.finished for r in rollouts]))

    def sequences(self) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) of prompt + response; the response starts at column P."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip padding: each row's first real token is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _response_logits(model, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)).logits
    return logits[:, -response_len - 1 : -1].float()


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, response_len: int,
                      temperature: float = 1.0, chunk: int = 0) -> Tensor:
    """[B, response_len] log-probs (the module's convention) of the last `response_len` tokens of
    each row given everything before them; 0 where `attention_mask` is 0. Differentiable: call it
    under `torch.no_grad()` for old / reference log-probs, with grad for the policy loss.
    `chunk` > 0: the LM head runs on `chunk` positions at a time (`chunked_logprobs`)."""
    return sequence_logprobs_and_entropy(model, input_ids, attention_mask, response_len, temperature, chunk,
                                         entropy=False)[0]


def sequence_logprobs_and_entropy(model, input_ids: Tensor, attention_mask: Tensor, response_len: int,
                                  temperature: float = 1.0, chunk: int = 0,
                                  entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """`sequence_logprobs` and, from the same forward pass, the entropy [B, response_len] of the
    sampling distribution softmax(logits / T) at each response position (detached: a metric)."""
    mask = attention_mask[:, -response_len:]
    tokens = input_ids[:, -response_len:]
    if chunk > 0:
        hidden = _response_hidden(model, input_ids, attention_mask, response_len)
        logprobs, ent = chunked_logprobs(hidden, model.get_output_embeddings(), tokens, temperature, chunk, entropy)
        return logprobs * mask, ent * mask if ent is not None else None
    logits = _response_logits(model, input_ids, attention_mask, response_len)
    logprobs, ent = _logprobs_of(logits, tokens, temperature, entropy)
    return logprobs * mask, ent * mask if ent is not None else None


def _logprobs_of(logits: Tensor, tokens: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor | None]:
    logp_all = (logits / temperature if temperature > 0 else logits).log_softmax(-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp_all.exp() * logp_all).sum(-1)


def _response_hidden(model, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
    """The final hidden states at the positions that predict the response, without the LM head."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise RlxError(f"{type(model).__name__} post-processes its logits (softcapping or a logit scale), which the "
                       "chunked log-probs would skip: set trainer.logprob_chunk=0")
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions(attention_mask))
    return out.last_hidden_state[:, -response_len - 1 : -1]


def chunked_logprobs(hidden: Tensor, head: torch.nn.Module, tokens: Tensor, temperature: float, chunk: int,
                     entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of `tokens` [B, R] from hidden states [B, R, H] through the
    LM `head`, `chunk` positions at a time, so the [B, R, V] logits never exist at once: each chunk's
    [B, chunk, V] logits are freed after use and, under autograd, recomputed in the backward pass
    (activation checkpointing), so only the hidden states are kept for it. Equal to the plain pass
    up to float rounding; costs one more LM-head matmul per chunk in the backward."""
    from torch.utils.checkpoint import checkpoint

    def piece(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        return _logprobs_of(head(h).float(), t, temperature, entropy)  # one LM-head pass for both

    logprobs, entropies = [], []
    for s in range(0, tokens.shape[1], chunk):
        h, t = hidden[:, s : s + chunk], tokens[:, s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(piece, h, t, use_reentrant=False)
        else:
            lp, ent = piece(h, t)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs, 1), torch.cat(entropies, 1) if entropy else None


def _choose(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Next token of each row and its log-prob, from [B, V] float32 logits."""
    if temperature == 0:
        logp = logits.log_softmax(-1)
        token = logits.argmax(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    logp = (logits / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    token = (probs / noise).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (the top token always stays)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


@torch.no_grad()
def _generate(model, ids: Tensor, mask: Tensor, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
              temperature: float, top_p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, logprobs, finished) continuing left-padded `ids`; tokens after EOS are pad.

    Rows that finish leave the batch (their cache rows are dropped) once they are a quarter
    of it: responses end at very different lengths, and on a CPU the work is per row."""
    B, P = ids.shape
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=ids.device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    rows = torch.arange(B, device=ids.device)  # the batch rows still in the model's batch
    # One mask for the whole generation; step t passes a view of its first P + t columns.
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
    pos = positions(mask)
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    next_pos = pos[:, -1:] + 1
    steps = 0
    for t in range(max_new_tokens):
        token, logp = _choose(out.logits[:, -1].float(), temperature, top_p, generator)
        done = finished[rows]
        token = token.masked_fill(done, pad_token_id)
        tokens[rows, t] = token
        logprobs[rows, t] = logp.masked_fill(done, 0.0)
        done |= token == eos_token_id
        finished[rows] = done
        steps = t + 1
        n_done = int(done.sum())
        if steps == max_new_tokens or n_done == len(rows):
            break
        if 4 * n_done >= len(rows):
            keep = (~done).nonzero().squeeze(-1)
            rows, token, full_mask, next_pos = rows[keep], token[keep], full_mask[keep], next_pos[keep]
            cache.reorder_cache(keep)
        out = model(input_ids=token[:, None], attention_mask=full_mask[:, : P + steps], position_ids=next_pos,
                    cache=cache, use_cache=True)
        next_pos = next_pos + 1
    return tokens[:, :steps], logprobs[:, :steps], finished


@contextlib.contextmanager
def eval_mode(*models):
    """Run the block with `models` in eval mode (no dropout) and restore each one's mode after:
    behaviour and reference log-probs are those of the deterministic policy, as TRL and verl take them."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was):
            m.train(training)


def _response_mask(tokens: Tensor, eos_token_id: int) -> Tensor:
    """1 up to and including the first EOS of each row."""
    eos = (tokens == eos_token_id).long()
    return (eos.cumsum(-1) - eos == 0).long()


def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Rollout:
    """Sample up to `max_new_tokens` per row from `model` (temperature 0: greedy)."""
    with eval_mode(model):
        tokens, logprobs, finished = _generate(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id,
                                               pad_token_id, temperature, top_p, generator)
    return Rollout(prompt_ids, prompt_mask, tokens, _response_mask(tokens, eos_token_id), logprobs, finished)


def _left_pack(ids: Tensor, mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens (mask 1) to the right end, pads to the left; order kept."""
    # A stable sort of the mask puts the zeros first and keeps the ones in order.
    order = mask.argsort(dim=-1, stable=True)
    packed_mask = mask.gather(-1, order)
    return ids.gather(-1, order).masked_fill(packed_mask == 0, pad_token_id), packed_mask


def extend(model, rollout: Rollout, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
           temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Continue the unfinished rows of `rollout` by up to `max_new_tokens` (finished rows unchanged).

    The unfinished rows' prompt + response is re-packed as a left-padded prompt and prefilled
    again: one forward pass of work, and no cache to keep alive between the two calls."""
    todo = (~rollout.finished).nonzero().squeeze(-1)
    if len(todo) == 0 or max_new_tokens == 0:
        return rollout
    ids, mask = rollout.sequences()
    ctx_ids, ctx_mask = _left_pack(ids[todo], mask[todo], pad_token_id)
    more = sample(model, ctx_ids, ctx_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, temperature=temperature, top_p=top_p, generator=generator)
    B, R = rollout.response_ids.shape
    width = int(max(R, (rollout.lengths[todo] + more.lengths).max()))
    grow = lambda x, fill: torch.cat([x, x.new_full((B, width - R), fill)], 1)
    response_ids, response_mask = grow(rollout.response_ids, pad_token_id), grow(rollout.response_mask, 0)
    logprobs = grow(rollout.logprobs, 0.0)
    # Row i's new tokens go right after its old ones: columns lengths[i] + j.
    cols = rollout.lengths[todo, None] + torch.arange(more.response_ids.shape[1], device=ids.device)
    keep = cols < width  # only pads of `more` can fall past the widest row
    rows = todo[:, None].expand_as(cols)
    response_ids[rows[keep], cols[keep]] = more.response_ids[keep]
    response_mask[rows[keep], cols[keep]] = more.response_mask[keep]
    logprobs[rows[keep], cols[keep]] = more.logprobs[keep]
    finished = rollout.finished.clone()
    finished[todo] = more.finished
    return replace(rollout, response_ids=response_ids, response_mask=response_mask, logprobs=logprobs,
                   finished=finished)
