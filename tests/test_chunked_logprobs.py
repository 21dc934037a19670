"""trainer.logprob_chunk: the LM head `chunk` positions at a time gives the plain log-probs,
entropies and gradients, and never holds a [B, R, V] tensor for the backward pass or in the
forward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlx.errors import RlxError
from rlx.models import tiny
from rlx.rollout import sequence_logprobs, sequence_logprobs_and_entropy
from tests.support import TINY

B, P, R = 3, 5, 12


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, -4:] = 0  # a response that ended early
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny(**TINY, device="cpu").model.eval()


@pytest.mark.parametrize("chunk", [1, 5, R, 64])
def test_chunked_equals_plain_in_values_entropies_and_gradients(model, chunk):
    ids, mask = _batch(model.config.vocab_size)
    model.zero_grad()
    plain, plain_ent = sequence_logprobs_and_entropy(model, ids, mask, R, temperature=0.7)
    plain.sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked, chunked_ent = sequence_logprobs_and_entropy(model, ids, mask, R, temperature=0.7, chunk=chunk)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked_ent, plain_ent, atol=1e-6, rtol=0)
    for a, b in zip(model.parameters(), plain_grads):
        torch.testing.assert_close(a.grad, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, ids, mask, R, 0.7, chunk), plain.detach(), atol=1e-6, rtol=0)


def _largest_saved(model, chunk: int) -> int:
    """The most vocabulary-wide elements (last dim V) any tensor saved for the backward holds."""
    V = model.config.vocab_size
    ids, mask = _batch(V)
    sizes = [0]

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == V:  # [B, positions, V]
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logprobs_and_entropy(model, ids, mask, R, chunk=chunk)[0].sum()
    return max(sizes)


class _Largest(TorchDispatchMode):
    """The largest vocabulary-wide tensor (last dim V) any op produces."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.vocab:  # [B, positions, V]
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_are_kept_for_the_backward_or_made_in_the_forward(model):
    V = model.config.vocab_size
    full = B * R * V
    assert _largest_saved(model, 0) >= full  # the plain pass keeps [B, R, V] log-softmax for the backward
    assert _largest_saved(model, 4) == 0  # chunked: the logits are recomputed in the backward, not kept
    ids, mask = _batch(V)
    with torch.no_grad():
        plain, chunked = _Largest(V), _Largest(V)
        with plain:
            sequence_logprobs(model, ids, mask, R)
        with chunked:
            sequence_logprobs(model, ids, mask, R, chunk=4)
    assert plain.largest >= full  # the plain pass makes logits for every position, prompt included
    assert chunked.largest == B * 4 * V  # one chunk's at a time


def test_a_model_that_post_processes_its_logits_is_refused(model):
    ids, mask = _batch(model.config.vocab_size)
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(RlxError, match="logprob_chunk=0"):
            sequence_logprobs(model, ids, mask, R, chunk=4)
    finally:
        model.config.final_logit_softcapping = None


def test_grpo_runs_with_chunked_logprobs_and_matches_the_plain_run(tmp_path):
    from rlx.tasks import run_training
    from tests.support import losses, small_config

    common = ["algo=grpo", "algo.group_size=2", "algo.max_new_tokens=8", "trainer.micro_batch_size=2",
              "trainer.max_steps=2", "algo.minibatches=2"]
    run_training(small_config(*common), tmp_path / "plain")
    run_training(small_config(*common, "trainer.logprob_chunk=3"), tmp_path / "chunked")
    assert losses(tmp_path / "chunked") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
