"""The rollout engine against facts checked outside it: a plain forward pass of one unpadded
row, HF `generate`, a hand-computed nucleus, and the sampling distribution itself."""
import pytest
import torch

from rlx.data.collate import prompt_batch
from rlx.models import tiny
from rlx.rollout import extend, sample, sequence_logprobs

PROMPTS = ["4 - 1 - 7 =\n", "12 + 3 =\n", "1 =\n", "9 * 9 - 80 + 2 =\n"]


@pytest.fixture(scope="module")
def policy():
    return tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, device="cpu", seed=1)


@pytest.fixture(scope="module")
def model(policy):
    return policy.model


@pytest.fixture(scope="module")
def tok(policy):
    return policy.tokenizer


@pytest.fixture(scope="module")
def prompts(tok):
    return prompt_batch(PROMPTS, tok, "cpu")


def eos_biased(policy, bias: float):
    """A copy of the model whose logits favour EOS by `bias` (through a new lm_head bias)."""
    model = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, device="cpu", seed=1).model
    b = torch.zeros(model.config.vocab_size)
    b[policy.tokenizer.eos_token_id] = bias
    model.lm_head.bias = torch.nn.Parameter(b)
    return model


def run(model, tok, batch, **kw):
    kw = {"max_new_tokens": 12, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **kw}
    return sample(model, batch["input_ids"], batch["attention_mask"], **kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_valid(r, tok, max_new_tokens):
    """EOS ends a row's mask; after it only pad; lengths within budget; finished <-> EOS emitted."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert (r.lengths <= max_new_tokens).all()
    for ids, mask, lp, fin, n in zip(r.response_ids, r.response_mask, r.logprobs, r.finished, r.lengths):
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == pad).all() and (lp[n:] == 0).all()
        assert fin == (ids[:n] == eos).any()
        if fin:
            assert ids[n - 1] == eos and not (ids[: n - 1] == eos).any()
        else:
            assert n == r.response_ids.shape[1]


def test_sequence_logprobs_matches_unpadded_forward(model, tok, prompts):
    r = run(model, tok, prompts, temperature=0.7, generator=gen(0))
    ids, mask = r.sequences()
    lp = sequence_logprobs(model, ids, mask, r.response_ids.shape[1], temperature=0.7)
    for i in range(len(PROMPTS)):
        row = ids[i][mask[i].bool()][None]  # no padding at all, default positions
        n, R = int(r.lengths[i]), r.response_ids.shape[1]
        logits = model(input_ids=row).logits[0, -n - 1 : -1] / 0.7
        expect = logits.log_softmax(-1).gather(-1, row[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :n], expect, atol=1e-5, rtol=0)
        assert (lp[i, n:R] == 0).all()


def test_logprobs_match_fresh_forward(model, tok, prompts):
    for temperature, top_p in [(0.7, 1.0), (1.3, 0.9)]:
        r = run(model, tok, prompts, temperature=temperature, top_p=top_p, generator=gen(0))
        ids, mask = r.sequences()
        lp = sequence_logprobs(model, ids, mask, r.response_ids.shape[1], temperature=temperature)
        torch.testing.assert_close(r.logprobs, lp, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_greedy_rows(model, tok, prompts):
    batched = run(model, tok, prompts, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        alone = run(model, tok, prompt_batch([p], tok, "cpu"), temperature=0.0)
        n = int(alone.lengths[0])
        assert torch.equal(batched.response_ids[i, :n], alone.response_ids[0, :n])
        torch.testing.assert_close(batched.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_greedy_matches_hf_generate(policy, tok, prompts, bias):
    """bias 0.5: rows stop at different steps (7, 10, 5 and 16 tokens), so finished rows leave the batch."""
    model = eos_biased(policy, bias)
    r = run(model, tok, prompts, temperature=0.0, max_new_tokens=16)
    assert len(set(r.lengths.tolist())) == (4 if bias else 1)
    with torch.no_grad():
        out = model.generate(**prompts, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    hf = out[:, prompts["input_ids"].shape[1] :]
    assert torch.equal(r.response_ids, hf[:, : r.response_ids.shape[1]])


def test_eos_and_budget(policy, tok, prompts):
    r = run(eos_biased(policy, 30.0), tok, prompts, generator=gen(0))  # EOS is all but certain
    assert r.response_ids.shape[1] == 1 and r.finished.all()
    assert (r.response_ids[:, 0] == tok.eos_token_id).all() and (r.lengths == 1).all()

    r = run(eos_biased(policy, 3.0), tok, prompts, max_new_tokens=10, generator=gen(3))
    assert r.finished.any() and not r.finished.all()  # the setting this test is about
    check_valid(r, tok, 10)


def test_top_p_tiny_is_greedy(model, tok, prompts):
    greedy = run(model, tok, prompts, temperature=0.0)
    nucleus = run(model, tok, prompts, temperature=0.8, top_p=1e-6, generator=gen(0))
    assert torch.equal(nucleus.response_ids, greedy.response_ids)
    ids, mask = nucleus.sequences()
    # The log-probs are the policy's at temperature 0.8, not the renormalised nucleus' (which is 0).
    lp = sequence_logprobs(model, ids, mask, ids.shape[1] - prompts["input_ids"].shape[1], temperature=0.8)
    torch.testing.assert_close(nucleus.logprobs, lp, atol=1e-5, rtol=0)
    assert (nucleus.logprobs[nucleus.response_mask.bool()] < 0).all()


def test_first_token_distribution(model, tok):
    """4000 draws of one token from one prompt: frequencies match softmax(logits / T) within the
    top-p nucleus renormalised, and nothing outside the nucleus is drawn."""
    n, T, top_p = 4000, 1.5, 0.8
    batch = prompt_batch(["4 - 1 - 7 =\n"] * n, tok, "cpu")
    with torch.no_grad():
        probs = (model(input_ids=batch["input_ids"][:1]).logits[0, -1] / T).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    k = int((sorted_probs.cumsum(0) < top_p).sum()) + 1  # smallest prefix with mass >= top_p
    nucleus = torch.zeros_like(probs)
    nucleus[order[:k]] = sorted_probs[:k] / sorted_probs[:k].sum()
    r = run(model, tok, batch, max_new_tokens=1, temperature=T, top_p=top_p, generator=gen(0))
    freq = torch.bincount(r.response_ids[:, 0], minlength=len(probs)).float() / n
    assert freq[nucleus == 0].sum() == 0
    assert (freq - nucleus).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 standard errors at worst
    torch.testing.assert_close(r.logprobs[:, 0], probs.log()[r.response_ids[:, 0]], atol=1e-5, rtol=0)


def test_generator_reproducible(model, tok, prompts):
    a = run(model, tok, prompts, generator=gen(0))
    b = run(model, tok, prompts, generator=gen(0))
    c = run(model, tok, prompts, generator=gen(1))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_extend_continues_truncated_rows(policy, tok, prompts):
    model = eos_biased(policy, 2.5)
    short = run(model, tok, prompts, max_new_tokens=3, generator=gen(5))
    assert short.finished.any() and not short.finished.all()  # some rows stay to be continued
    long = extend(model, short, max_new_tokens=9, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  generator=gen(6))
    check_valid(long, tok, 12)
    assert torch.equal(long.prompt_ids, short.prompt_ids)
    for i in range(len(PROMPTS)):
        n = int(short.lengths[i])
        assert torch.equal(long.response_ids[i, :n], short.response_ids[i, :n])
        assert torch.equal(long.logprobs[i, :n], short.logprobs[i, :n])
        if short.finished[i]:
            assert long.lengths[i] == n and long.finished[i]
        else:
            assert long.lengths[i] > n
    ids, mask = long.sequences()
    lp = sequence_logprobs(model, ids, mask, long.response_ids.shape[1])
    torch.testing.assert_close(long.logprobs, lp, atol=1e-5, rtol=0)


def test_greedy_truncate_then_extend_equals_one_go(model, tok, prompts):
    kw = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "temperature": 0.0}
    whole = run(model, tok, prompts, max_new_tokens=12, temperature=0.0)
    parts = extend(model, run(model, tok, prompts, max_new_tokens=5, temperature=0.0), max_new_tokens=7, **kw)
    assert torch.equal(parts.response_ids, whole.response_ids)
    assert torch.equal(parts.finished, whole.finished)
    torch.testing.assert_close(parts.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_restores_training_mode(model, tok, prompts):
    model.train()
    run(model, tok, prompts, max_new_tokens=2)
    assert model.training
    model.eval()
