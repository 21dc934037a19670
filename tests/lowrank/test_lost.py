"""LOST: the limiting cases of y = γ·B σ(A x) + (1−γ)·W_s x[I], channel selection by column norm,
the parameter count, the surgery on the tiny model, a training run that learns and resumes exactly,
and one-line errors for bad input."""
import pytest
import torch
from torch import nn

from rlx.config import build
from rlx.errors import RlxError
from rlx.layers import target_layers
from rlx.lowrank import parameterize
from rlx.lowrank.lost import LostLinear, apply_lost, lost_layer, resolve_rank, select_channels, svd_split
from rlx.models import tiny
from rlx.tasks import run_training
from tests.support import losses, small_config, straight_and_resumed

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu")


def weight(m=6, n=10, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def test_full_rank_linear_layer_without_sparse_part_is_gamma_times_w():
    W, x = weight(), torch.randn(3, 10)
    layer = lost_layer(W, None, rank=6, k=0, gamma=0.7, activation="none")
    assert torch.allclose(layer(x), 0.7 * x @ W.T, atol=1e-5)


def test_rank_zero_with_all_channels_is_the_sparse_part():
    W, x = weight(), torch.randn(3, 10)
    layer = lost_layer(W, None, rank=0, k=10, gamma=0.7, activation="none")
    assert layer.lowrank_a is None  # at rank 0 W_comp = W: the sparse part is (1 − γ)·W x
    assert torch.allclose(layer(x), 0.3 * x @ W.T, atol=1e-5)


def test_equal_mix_of_all_channels_reproduces_w_at_any_rank():
    # γ = ½ and every channel: ½·(W_r + W_comp) x = ½·W x, whatever r
    W, x = weight(), torch.randn(3, 10)
    for r in (1, 3, 5):
        assert torch.allclose(lost_layer(W, None, r, 10, 0.5, "none")(x), 0.5 * x @ W.T, atol=1e-5)


def test_bias_is_kept_outside_the_mix():
    W, b, x = weight(), torch.randn(6), torch.randn(3, 10)
    layer = lost_layer(W, b, rank=6, k=0, gamma=0.25, activation="none")
    assert torch.allclose(layer(x), 0.25 * x @ W.T + b, atol=1e-5)


def test_svd_split_factors_and_complement():
    W = weight()
    a, b, comp = svd_split(W, 2)
    assert a.shape == (2, 10) and b.shape == (6, 2)
    assert torch.allclose(b @ a + comp, W, atol=1e-5)
    assert torch.linalg.matrix_rank(b @ a) == 2 and torch.linalg.matrix_rank(comp) == 4
    assert torch.allclose(torch.linalg.norm(b, dim=0), torch.linalg.norm(a, dim=1), atol=1e-5)  # Σ^½ each side


def test_channels_are_the_largest_column_norms_of_the_complement():
    _, _, comp = svd_split(weight(8, 20), 3)
    expected = torch.argsort(comp.norm(dim=0))[-5:].sort().values
    assert torch.equal(select_channels(comp, 5, "l2"), expected)
    expected_l1 = torch.argsort(comp.abs().sum(dim=0))[-5:].sort().values
    assert torch.equal(select_channels(comp, 5, "l1"), expected_l1)
    drawn = select_channels(comp, 5, "random", torch.Generator().manual_seed(0))
    assert len(set(drawn.tolist())) == 5 and torch.equal(drawn, drawn.sort().values)


def test_parameter_count_is_r_m_plus_n_plus_m_k():
    layer = lost_layer(weight(6, 10), None, rank=2, k=3, gamma=0.5)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (6 + 10) + 6 * 3  # 50, against 60 dense


def test_random_init_keeps_the_structure_and_the_channels():
    W = weight(6, 10)
    svd = lost_layer(W, None, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    rnd = lost_layer(W, None, 2, 3, 0.5, init="random", generator=torch.Generator().manual_seed(0))
    assert [p.shape for p in svd.parameters()] == [p.shape for p in rnd.parameters()]
    assert torch.equal(svd.sparse_channels, rnd.sparse_channels)
    assert not torch.allclose(svd.lowrank_a, rnd.lowrank_a)


def test_rank_as_int_or_fraction():
    assert resolve_rank(8, 192, 512) == 8 and resolve_rank(0.25, 192, 512) == 48
    assert resolve_rank(1.0, 192, 512) == 192 and resolve_rank(1000, 192, 512) == 192


def test_apply_lost_swaps_exactly_the_attention_and_mlp_linears():
    model = tiny(**SMALL).model
    embed, head = model.model.embed_tokens, model.lm_head
    swapped = apply_lost(model, rank=4, sparsity=0.25)
    projections = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(swapped) == sorted(f"model.layers.0.{p}" for p in projections)
    assert all(isinstance(model.get_submodule(n), LostLinear) for n in swapped)
    assert model.model.embed_tokens is embed and model.lm_head is head and type(head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert target_layers(model) == {}  # nothing left to swap
    assert "model.layers.0.self_attn.q_proj.lowrank_a" in dict(model.named_parameters())


def test_lost_trains_and_resumes_exactly(tmp_path):
    cfg = small_config("model.parameterization=lost", "trainer.max_steps=8")
    run_training(cfg, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0]
    # a constant LR: the cut run's schedule would otherwise end at its own (earlier) last step
    full, resumed, w_full, w_cut = straight_and_resumed(
        tmp_path, ["model.parameterization=lost", "trainer.lr_scheduler=constant"])
    assert full["train/loss"] == resumed["train/loss"]
    assert w_full.keys() == w_cut.keys() and any(k.endswith("lowrank_a") for k in w_full)
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))


@pytest.mark.parametrize("build", [lambda: tiny(**SMALL).model, gpt2], ids=["llama", "gpt2-conv1d"])
def test_full_rank_linear_lost_with_gamma_one_leaves_the_model_unchanged(build):
    model = build().eval()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    before = model(ids).logits
    swapped = apply_lost(model, rank=1.0, sparsity=0.0, gamma=1.0, activation="none")
    assert len(swapped) == (7 if "layers" in next(iter(swapped)) else 4)  # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj
    assert torch.allclose(model(ids).logits, before, atol=1e-4)


def test_options_from_a_mapping_on_the_command_line():
    cfg = small_config("model.parameterization={name:lost,rank:0.5,sparsity:0.125,gamma:0.7,activation:none}")
    q = build(cfg.model).model.get_submodule("model.layers.0.self_attn.q_proj")
    assert (q.rank, q.k, q.gamma, q.activation) == (16, 4, 0.7, "none")


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown model.parameterization='nope'; valid: lost"),
    ("trp", "TRP is a training procedure.*hooks=trp"),
    ({"rank": 4}, "needs a `name`"),
    ({"name": "lost", "rnak": 4}, "unknown option 'rnak'"),
    ({"name": "lost", "gamma": 1.5}, r"gamma=1.5 must be a number in \[0, 1\]"),
    ({"name": "lost", "rank": 1.5}, "fraction of min"),
    ({"name": "lost", "channel_score": "l3"}, "unknown LOST channel_score='l3'"),
    ({"name": "lost", "targets": "no_such_layer"}, "found no attention/MLP linear layers"),
])
def test_bad_input_is_one_clear_error(spec, message):
    with pytest.raises(RlxError, match=message):
        parameterize(tiny(**SMALL).model, spec)


def test_builder_refuses_lost_with_lora():
    with pytest.raises(RlxError, match="use one of them"):
        tiny(**SMALL, lora={"r": 4, "target_modules": ["q_proj"]}, parameterization="lost")
