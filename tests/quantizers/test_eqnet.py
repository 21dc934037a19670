"""EQ-Net: the quantizer on every point of the space, WDR by hand, the GPG chain, the gradient the
hook adds (explicitly recomputed), runs through the loop, exact resume, and evaluating points of
the space after training."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rlx.quantizers.eqnet as eqnet
import rlx.quantizers.lsq as lsq
from rlx.config import build
from rlx.errors import RlxError
from rlx.evaluate import perplexity
from rlx.models import tiny
from rlx.quantizers.eqnet import EQNet, kd_loss, load_supernet, wdr_loss
from rlx.quantizers.lsq import ElasticQuantLinear, QConfig, code_range, evaluate_space, make_space, set_config
from rlx.robustness import kurtosis, skewness
from rlx.tasks import run_training
from tests.support import small_config, straight_and_resumed

# ---------------------------------------------------------------------------- WDR by hand


def test_kurtosis_and_skewness_by_hand():
    assert kurtosis(torch.linspace(-1, 1, 10001, dtype=torch.float64)).item() == pytest.approx(1.79999998, abs=1e-8)
    assert skewness(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).item() == 0.0
    # Bernoulli(1/4): skewness (1 - 2p)/sqrt(p(1 - p)) = 2/sqrt(3), kurtosis (1 - 6p(1 - p))/(p(1 - p)) + 3 = 7/3
    b = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert skewness(b).item() == pytest.approx(2 / 3**0.5)
    assert kurtosis(b).item() == pytest.approx(7 / 3)


def test_wdr_loss_by_hand():
    u, b = torch.linspace(-1, 1, 10001, dtype=torch.float64), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    kurt = ((1.8 - 1.8) ** 2 + (7 / 3 - 1.8) ** 2) / 2
    skew = (0.0 + 4 / 3) / 2
    assert wdr_loss([u, b], 0.015, 1.0).item() == pytest.approx(0.015 * kurt + skew, abs=1e-7)


# ---------------------------------------------------------------------------- the quantizer


def _integers(x: torch.Tensor) -> bool:
    return torch.allclose(x, x.round(), atol=1e-3)


def test_every_sampled_configuration_quantizes_as_specified():
    torch.manual_seed(0)
    space = make_space([2, 8], [2, 8], ["channel", "tensor"], [False, True])
    layer = ElasticQuantLinear(torch.nn.Linear(64, 12), space)
    x = torch.randn(3, 5, 64)
    g = torch.Generator().manual_seed(0)
    choose = lambda options: options[int(torch.randint(len(options), (), generator=g))]
    seen = set()
    for _ in range(60):
        c = space.random(choose)
        seen.add((c.bits, c.per_channel, c.symmetric))
        layer.set_config(c)
        qmin, qmax = code_range(c.bits, c.symmetric)
        step, zero = layer.weight_quant[(c.bits, c.per_channel, c.symmetric)]
        assert step.numel() == (12 if c.per_channel else 1)  # per-tensor: one step for the layer
        assert (zero is None) == c.symmetric
        z = 0 if zero is None else zero.detach().round()
        codes = layer.quantized_weight().detach() / step.detach() + z
        assert _integers(codes) and codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3
        assert all(len(row.round().unique()) <= 2**c.bits for row in codes)
        a_step, a_zero = layer.act_quant[(c.act_bits, c.symmetric)]
        a_codes = layer.quantized_input(x).detach() / a_step.detach() + (0 if a_zero is None else a_zero.detach().round())
        lo, hi = code_range(c.act_bits, c.symmetric)
        assert _integers(a_codes) and a_codes.min() >= lo - 1e-3 and a_codes.max() <= hi + 1e-3
        assert len(a_codes.round().unique()) <= 2**c.act_bits
    assert len(seen) > 20  # the draws cover the space
    # symmetric codes are signed and centred: [-2^(b-1), 2^(b-1) - 1]
    assert code_range(3, True) == (-4, 3) and code_range(3, False) == (0, 7)


def test_lsq_gradients_and_init():
    w = torch.tensor([[0.1, -0.25, 0.26, 3.0]])
    step = torch.nn.Parameter(torch.tensor([[0.1]]))
    wq = torch.nn.Parameter(w.clone())
    out = lsq.lsq(wq, step, None, 3, True, 4)  # codes [-4, 3]: 3.0 clips at 3·0.1
    assert torch.allclose(out, torch.tensor([[0.1, -0.2, 0.3, 0.3]]))
    out.sum().backward()
    assert torch.equal(wq.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # straight through, zero when clipped
    # LSQ: d/ds = round(w/s) - w/s inside, qmax when clipped; times 1/sqrt(n·qmax)
    expect = ((1 - 1) + (-2 + 2.5) + (3 - 2.6) + 3) / (4 * 3) ** 0.5
    assert step.grad.item() == pytest.approx(expect, rel=1e-5)
    s, z = lsq.lsq_init(torch.tensor([[-1.0, 1.0, 3.0]]), 8, True)
    assert s.item() == pytest.approx(2 * (5 / 3) / 127**0.5) and z is None
    s, z = lsq.lsq_init(torch.tensor([[-1.0, 1.0, 3.0]]), 2, False)
    assert s.item() == pytest.approx(4 / 3) and z.item() == pytest.approx(0.75)


def test_bad_values_raise_one_line():
    for kwargs in (dict(weight_bits=[1, 8]), dict(weight_bits=[8, 2]), dict(act_bits=[2, 9]),
                   dict(granularity=["row"]), dict(symmetric=[]), dict(num_subnet=0), dict(kd_alpha=1.5)):
        with pytest.raises(RlxError):
            EQNet(**kwargs)


# ---------------------------------------------------------------------------- a small model


def _setup(grad_accum=1, **kwargs):
    policy = tiny(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu")
    model = policy.model
    hook = EQNet(**{"seed": 3, **kwargs})
    hook.on_train_start(SimpleNamespace(model=model, optimizer=None, trainer=SimpleNamespace(grad_accum=grad_accum)))
    model.train()
    ids = torch.randint(3, len(policy.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return model, hook, ids, mask


def _task(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _grads(model, hook):
    weights = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    steps = [t.grad.clone() for layer in hook.layers.values() for t in layer.held_tensors() if t.grad is not None]
    return weights + steps


def _zero(model, hook):
    model.zero_grad(set_to_none=True)
    hook.optimizer.zero_grad(set_to_none=True)


def _explicit(model, hook, chain, ids, mask):
    """The chain by hand: subnets run one by one in eval mode (a single configuration each)."""
    model.eval()
    logits = []
    for subnet in chain:
        set_config(model, subnet)
        logits.append(model(input_ids=ids, attention_mask=mask).logits)
    set_config(model, hook.space.largest())
    model.train()
    return logits


def test_state_dict_keeps_transformers_keys_and_other_forwards_run_one_configuration():
    plain = tiny(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, device="cpu").model
    model, hook, ids, mask = _setup(act_bits=[4, 8])
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert len(hook.layers) == 7 and "lm_head" not in " ".join(hook.layers)
    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():  # no grad (generation, reference passes): one forward at the current point
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1
    model(input_ids=ids, attention_mask=mask)  # train mode with grad: the whole chain
    handle.remove()
    assert len(calls) == 1 + 3
    model.eval()
    assert model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)
    with pytest.raises(RlxError, match="outside"):
        set_config(model, QConfig(bits=9))
    with pytest.raises(RlxError, match="input bits"):
        set_config(model, QConfig(bits=4, act_bits=2))


def test_gpg_chain_targets_are_the_previous_subnets_detached_logits(monkeypatch):
    model, hook, ids, mask = _setup()
    calls = []
    monkeypatch.setattr(eqnet, "kd_loss", lambda s, t, m: calls.append((s.detach(), t, m)) or kd_loss(s, t, m))
    before = hook.generator.get_state()
    returned = model(input_ids=ids, attention_mask=mask).logits
    hook.generator.set_state(before)
    chain = hook.subnets()
    assert [c.bits for c in chain[0].values()] == [8] * 7 and {c.bits for c in chain[2].values()} == {2}
    with torch.no_grad():
        logits = _explicit(model, hook, chain, ids, mask)
    assert len(calls) == 2
    for k, (student, teacher, m) in enumerate(calls, start=1):
        assert not teacher.requires_grad and m is mask
        assert torch.allclose(teacher, logits[k - 1], atol=1e-6) and torch.allclose(student, logits[k], atol=1e-6)
    assert torch.allclose(returned, logits[0], atol=1e-6)  # the algorithm sees the largest subnet
    assert not torch.allclose(logits[0], logits[2], atol=1e-3)  # 2-bit differs from 8-bit


def test_one_subnet_is_lsq_qat_of_the_largest_configuration():
    model, hook, ids, mask = _setup(num_subnet=1)
    logits = model(input_ids=ids, attention_mask=mask).logits
    _task(logits, ids).backward()
    hook.on_after_backward(None)
    hooked = _grads(model, hook)
    assert not hook._kd  # no KL term
    _zero(model, hook)
    (largest,) = _explicit(model, hook, hook.subnets(), ids, mask)
    assert torch.equal(largest, logits)
    weights = [layer.weight for layer in hook.layers.values()][1:]  # all but the first layer
    (_task(largest, ids) + wdr_loss(weights, 0.015, 1.0)).backward()
    explicit = _grads(model, hook)
    assert len(hooked) == len(explicit) > 7
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(hooked, explicit))


def test_the_auxiliary_losses_reach_the_gradients_as_computed_by_hand():
    model, hook, ids, mask = _setup(act_bits=[2, 8], grad_accum=2)
    model(input_ids=ids, attention_mask=mask)  # the first forward initializes the input steps
    _zero(model, hook)
    before = hook.generator.get_state()
    _task(model(input_ids=ids, attention_mask=mask).logits, ids).backward()
    hook.on_after_backward(None)
    hooked = _grads(model, hook)
    _zero(model, hook)

    hook.generator.set_state(before)
    logits = _explicit(model, hook, hook.subnets(), ids, mask)
    a = hook.kd_alpha
    share = sum(lk - lk.detach() for lk in logits[1:])
    kd = sum(kd_loss(logits[k], logits[k - 1].detach(), mask) for k in (1, 2))
    weights = [layer.weight for layer in hook.layers.values()][1:]
    task = _task(logits[0] + (1 - a) * share, ids)
    (task + a * kd / 2 + wdr_loss(weights, 0.015, 1.0)).backward(retain_graph=True)
    explicit = _grads(model, hook)
    assert len(hooked) == len(explicit)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(hooked, explicit))
    _zero(model, hook)

    _task(logits[0], ids).backward()  # the task alone, at the largest subnet
    plain = _grads(model, hook)
    assert not all(torch.allclose(x, y, atol=1e-6) for x, y in zip(hooked[:len(plain)], plain))


# ---------------------------------------------------------------------------- through the loop


@pytest.mark.parametrize("algo,extra", [("sft", []), ("grpo", ["quantizer.act_bits=[4,8]"])])
def test_eqnet_runs_in_the_loop(algo, extra, tmp_path):
    summary = run_training(small_config("quantizer=eqnet", f"algo={algo}", *extra), tmp_path)
    assert summary["steps"] == 2
    assert summary["eqnet/kd"] >= 0 and summary["eqnet/wdr"] > 0 and 2 <= summary["eqnet/random_bits"] <= 8
    assert summary["memory/hooks_MB"] > 0  # the hook's own Adam over the LSQ steps is counted


def test_eqnet_resumes_exactly(tmp_path):
    full, resumed, a, b = straight_and_resumed(tmp_path, ["quantizer=eqnet", "quantizer.act_bits=[2,8]",
                                                         "quantizer.lsq_lr=1e-3", "trainer.lr_scheduler=constant"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["train/loss"] == resumed["train/loss"] and full["eqnet/kd"] == resumed["eqnet/kd"]
    sa, sb = (torch.load(tmp_path / f"{r}/checkpoints/last/trainer_state.pt", weights_only=False)["hooks"]["quantizer"]
              for r in ("full", "cut"))
    steps = lambda s: [t for layer in s["layers"].values() for part in ("weight", "act")
                       for pair in layer[part].values() for t in pair if t is not None]
    assert all(torch.equal(x, y) for x, y in zip(steps(sa), steps(sb)))
    moved = torch.load(tmp_path / "cut/checkpoints/step_000002/trainer_state.pt", weights_only=False)
    assert not all(torch.equal(x, y) for x, y in zip(steps(sa), steps(moved["hooks"]["quantizer"])))


def test_points_of_the_space_are_evaluated_after_training_without_retraining(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = small_config("quantizer=eqnet")
    summary = run_training(cfg, tmp_path)
    folder = tmp_path / "checkpoints/last"
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)  # no rlx needed
    assert not info["missing_keys"] and not info["unexpected_keys"]

    policy = load_supernet(tmp_path, device="cpu")
    examples = list(build(cfg.data).split(cfg.trainer.eval_split))[: cfg.trainer.eval_samples]
    ppl = lambda m: perplexity(m, policy.tokenizer, examples, cfg.trainer.eval_batch_size, cfg.trainer.eval_max_length)
    results = evaluate_space(policy.model, {
        "largest": QConfig(8, per_channel=True, symmetric=False),
        "w2": QConfig(2, per_channel=False, symmetric=True),
        "mixed": {name: QConfig(4, True, True) for name in list(lsq.elastic_layers(policy.model))[:3]},
    }, ppl)
    # the largest point is what the loop evaluated: the steps came back with the checkpoint
    assert results["largest"]["eval/loss"] == pytest.approx(summary["eval/loss"], abs=1e-5)
    assert results["w2"]["eval/loss"] != pytest.approx(results["largest"]["eval/loss"], abs=1e-4)
    assert results["mixed"]["eval/loss"] != pytest.approx(results["largest"]["eval/loss"], abs=1e-6)
    assert {layer.config for layer in lsq.elastic_layers(policy.model).values()} == {QConfig(8, True, False)}
    with pytest.raises(RlxError, match="not trained with quantizer=eqnet"):
        load_supernet(run_training(small_config(), tmp_path / "plain")["run_dir"])
