"""rlx.ensemble: logit averaging (the paper note's checks), perplexity and sampling of an ensemble,
the power-law fits on the note's synthetic points, and Shakespeare's data budget."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.data.collate import lm_batch
from rlx.ensemble import Ensemble, average_logits, fit_power_law
from rlx.errors import RlxError
from rlx.evaluate import perplexity
from rlx.models import tiny
from tests.support import TINY


class Fixed(torch.nn.Module):
    """A 'model' whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_logits_are_averaged_not_probabilities():
    # the note's check: [0, 2] and [2, 0] -> [1, 1]
    z = Ensemble([Fixed([0.0, 2.0]), Fixed([2.0, 0.0])])(torch.zeros(1, 1, dtype=torch.long)).logits
    assert z[0, 0].tolist() == [1.0, 1.0]
    # [0, 4] and [0, 0]: mean logits [0, 2] -> p1 = e^2 / (1 + e^2) = 0.8808; the probability mean would be
    # (e^4 / (1 + e^4) + 0.5) / 2 = (0.9820 + 0.5) / 2 = 0.7410
    z = average_logits([torch.tensor([0.0, 4.0]), torch.tensor([0.0, 0.0])])
    assert torch.softmax(z, -1)[1].item() == pytest.approx(0.8808, abs=1e-4)


def test_k_identical_members_are_the_single_model_exactly():
    model = tiny(**TINY, device="cpu").model.eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    single = model(input_ids=ids).logits
    assert torch.equal(Ensemble([model, model, model])(ids).logits, single)


def test_ensemble_perplexity_is_the_mean_logit_cross_entropy():
    # two fixed members, vocab of 100: mean logits put (2 + 0)/2 = 1 on token 5, 0 elsewhere, so every
    # target token "5" has p = e / (e + 99) and every other p = 1 / (e + 99)
    a, b = torch.zeros(100), torch.zeros(100)
    a[5] = 2.0
    policy = tiny(**TINY, device="cpu")
    ens = Ensemble([Fixed(a.tolist()), Fixed(b.tolist())], policy.tokenizer)
    token = policy.tokenizer.convert_ids_to_tokens(5)
    loss = perplexity(ens, policy.tokenizer, [{"text": token * 4}], batch_size=1, max_length=8)["eval/loss"]
    assert lm_batch([{"text": token * 4}], policy.tokenizer, 8)["input_ids"].tolist() == [[5] * 4]
    assert loss == pytest.approx(-math.log(math.e / (math.e + 99)), abs=1e-6)


def test_sampling_draws_from_the_averaged_logits():
    # members that each favour another token by +50 average to +25 on both: only those two are drawn
    a, b = torch.zeros(100), torch.zeros(100)
    a[7], b[9] = 50.0, 50.0
    ens = Ensemble([Fixed(a.tolist()), Fixed(b.tolist())])
    out = ens.sample(torch.full((64, 1), 3), max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 7) and set(out[:, 1:].unique().tolist()) == {7, 9}
    assert torch.equal(ens.sample(torch.full((2, 1), 3), 3, temperature=0)[:, 1:], torch.full((2, 3), 7))  # tie: first


def test_sampling_with_real_members_matches_a_full_forward():
    # greedy decoding with per-member KV caches = argmax of a full (uncached) forward at every step
    members = [tiny(**TINY, seed=s, device="cpu").model for s in (0, 1)]
    ens = Ensemble(members)
    out = ens.sample(torch.tensor([[40], [50]]), max_new_tokens=5, temperature=0)
    full = ens(out).logits
    assert torch.equal(full[:, :-1].argmax(-1), out[:, 1:])


def test_members_must_share_a_vocabulary_and_paths_must_exist(tmp_path):
    with pytest.raises(RlxError, match="at least one member"):
        Ensemble([])
    with pytest.raises(RlxError, match="does not exist"):
        Ensemble.load([str(tmp_path / "nowhere")])


def test_power_law_fit_recovers_the_notes_asymptote():
    # the note's points L(N) = 0.05 / N^1.02 + 3.43 at N = 0.15, 0.3, 0.6, 1.4, no noise -> E = 3.43 +- 1e-3
    n = [0.15, 0.3, 0.6, 1.4]
    fit = fit_power_law(n, [0.05 / x**1.02 + 3.43 for x in n])
    assert fit["E"] == pytest.approx(3.43, abs=1e-3)
    assert fit["alpha"] == pytest.approx(1.02, abs=1e-2) and fit["A"] == pytest.approx(0.05, abs=1e-3)


def test_ensemble_law_recovers_a_one_over_k_asymptote():
    # excess loss falling as 1/K: L(K) = 3.34 + 0.1 / K at K = 1..4 (3.44, 3.39, 3.3733, 3.365) -> E = 3.34
    k = [1, 2, 3, 4]
    fit = fit_power_law(k, [3.34 + 0.1 / x for x in k])
    assert fit["E"] == pytest.approx(3.34, abs=1e-3) and fit["alpha"] == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(RlxError, match="at least 3 points"):
        fit_power_law([1, 2], [3.0, 2.0])


def test_shakespeare_budget_keeps_whole_chunks_spread_over_the_split(tmp_path):
    from rlx.data.shakespeare import Shakespeare

    (tmp_path / "a_gut.txt").write_text("".join(f"a{i:03d}" for i in range(250)))  # 1,000 characters
    (tmp_path / "b_gut.txt").write_text("".join(f"b{i:03d}" for i in range(250)))
    full = Shakespeare(chunk_chars=8, cache=str(tmp_path))
    capped = Shakespeare(chunk_chars=8, cache=str(tmp_path), train_chars=100)  # 100 // 8 = 12 chunks
    train = [e["text"] for e in full.split("train")]  # 2 x 900 train characters + "\n\n" -> 225 chunks
    kept = [train.index(e["text"]) for e in capped.split("train")]
    assert len(kept) == 12 and kept[0] == 0 and kept == sorted(set(kept))  # whole chunks, in order, no repeats
    assert max(b - a for a, b in zip(kept, kept[1:])) <= math.ceil(len(train) / 12)  # evenly spread
    assert any("a" in train[i] for i in kept) and any("b" in train[i] for i in kept)  # both texts contribute
    assert capped.split("validation") == full.split("validation")
    with pytest.raises(RlxError, match="at least one chunk"):
        Shakespeare(chunk_chars=8, cache=str(tmp_path), train_chars=4)
