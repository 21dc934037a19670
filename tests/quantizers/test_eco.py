"""ECO and its baselines: the paper's scalar checks, the limiting case, the corrections by hand,
the memory actually held, and runs through the loop."""
import math
from types import SimpleNamespace

import pytest
import torch

from rlx.memory import memory_report
from rlx.quantizers.eco import ECO, MasterWeights, NoMaster, adam_correction, sgd_correction
from rlx.tasks import run_training
from tests.support import small_config, straight_and_resumed

TARGET, LR, BETA = 0.537, 0.01, 0.9


def scalar_run(hook, steps: int, schedule=lambda step: 1.0, w0: float = 0.0, weight_decay: float = 0.0):
    """f(w) = ½(w - 0.537)², w0 = 0 unless given, SGD momentum in EMA form (dampening = β), float64,
    the LR scaled by `schedule`. Returns the weight after each optimizer step (before re-quantization)."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False)).double()
    model[0].weight.data.fill_(w0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=BETA, dampening=BETA, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    state = SimpleNamespace(model=model, optimizer=opt)
    hook.on_train_start(state)
    proposed = []
    for _ in range(steps):
        (0.5 * (model(torch.ones(1, 1, dtype=torch.float64)) - TARGET) ** 2).sum().backward()
        hook.on_before_optimizer_step(state)
        opt.step()
        sched.step()  # before on_step_end, as in the loop
        opt.zero_grad()
        proposed.append(model[0].weight.data.item())
        hook.on_step_end(state)
    return proposed, model


GRID = dict(format="grid", step=0.05, skip=())


@pytest.mark.parametrize("schedule", [lambda s: 1.0, lambda s: 1.0 - s / 250], ids=["constant", "decaying"])
def test_exact_eco_follows_the_master_weight_trajectory(schedule):
    eco, _ = scalar_run(ECO(**GRID, exact=True), 200, schedule)
    master, _ = scalar_run(MasterWeights(**GRID), 200, schedule)
    assert max(abs(a - b) for a, b in zip(eco, master)) < 1e-12
    assert master[-1] > 0.3  # the run moves (it is not trivially static at 0)


@pytest.mark.parametrize("schedule", [lambda s: 1.0, lambda s: 1.0 - s / 250], ids=["constant", "decaying"])
def test_exact_eco_needs_an_on_grid_start_and_no_weight_decay(schedule):
    gap = lambda **kw: max(abs(a - b) for a, b in zip(scalar_run(ECO(**GRID, exact=True), 200, schedule, **kw)[0],
                                                      scalar_run(MasterWeights(**GRID), 200, schedule, **kw)[0]))
    assert gap(w0=0.1) < 1e-12  # on the grid (0.05 spacing): the master iterates, as from 0
    assert gap(w0=0.12) > 1e-2  # off it: E_0 = 0.02 has no earlier step to carry it
    assert gap(weight_decay=0.1) > 1e-5  # SGD's decay is taken at the quantized weights (measured ~1e-4)


def test_naive_removal_stalls_and_eco_reaches_the_nearest_grid_point():
    # every step is smaller than half the grid spacing, so naive removal rounds back to 0.0
    _, naive = scalar_run(NoMaster(**GRID), 2000)
    _, eco = scalar_run(ECO(**GRID), 2000)
    master, mmodel = scalar_run(MasterWeights(**GRID), 2000)
    assert naive(torch.ones(1, 1, dtype=torch.float64)).item() == 0.0
    assert eco(torch.ones(1, 1, dtype=torch.float64)).item() == pytest.approx(0.55, abs=1e-12)
    assert mmodel(torch.ones(1, 1, dtype=torch.float64)).item() == pytest.approx(0.55, abs=1e-12)


def test_corrections_by_hand():
    E = torch.tensor([0.02, -0.01])
    # constant LR: the paper's (1/η)(1 - 1/β)E = 100 · (-1/9) · E
    assert torch.allclose(sgd_correction(E, 0.01, 0.01, 0.9), torch.tensor([-0.2 / 0.9, 0.1 / 0.9]))
    # a halving LR: E (1/0.01 - 1/(0.9 · 0.005)) = E (100 - 222.2...)
    assert torch.allclose(sgd_correction(E, 0.01, 0.005, 0.9), E * (100 - 1 / 0.0045))
    # Adam after step 2 (β1 = 0.9, β2 = 0.99): bc1 = 0.19, bc2 = 0.0199, so sqrt(V/bc2) = [2, 1];
    # the next step's denominator is predicted from that same bias-corrected moment, with bc1(3) = 0.271
    V = torch.tensor([4.0, 1.0]) * 0.0199
    d2 = 0.19 * (torch.tensor([2.0, 1.0]) + 0.5)
    d3 = 0.271 * (torch.tensor([2.0, 1.0]) + 0.5)
    got = adam_correction(E, V, lr=0.1, next_lr=0.05, beta1=0.9, beta2=0.99, eps=0.5, step=2, decay=0.5)
    expected = E * (d2 * (1 - 0.1 * 0.5) / 0.1 - d3 * (1 - 0.05 * 0.5) / (0.9 * 0.05))
    assert torch.allclose(got, expected)
    # at a constant LR and late in training (bias corrections ~1) it is the paper's Algorithm 3 form
    late = adam_correction(E, V, lr=0.1, next_lr=0.1, beta1=0.9, beta2=0.99, eps=0.5, step=10_000, decay=0.0)
    assert torch.allclose(late, E * (V.sqrt() + 0.5) * (1 - 1 / 0.9) / 0.1, rtol=1e-4)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _adamw_run(hook, steps=6):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.9), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    state = SimpleNamespace(model=model, optimizer=opt)
    if hook:
        hook.on_train_start(state)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4)
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        if hook:
            hook.on_before_optimizer_step(state)
        opt.step()
        sched.step()
        opt.zero_grad()
        if hook:
            hook.on_step_end(state)
    return model, opt


def test_eco_adamw_with_an_identity_quantizer_is_torch_adamw():
    plain, popt = _adamw_run(None)
    eco, eopt = _adamw_run(ECO(format="identity", skip=()))
    for a, b in zip(plain.state_dict().values(), eco.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(plain.parameters(), eco.parameters()):
        assert torch.equal(popt.state[p]["exp_avg"], eopt.state[q]["exp_avg"])


def test_eco_changes_momentum_and_no_master_does_not():
    # same start and same first step: only the residual's fate differs
    eco, eopt = _adamw_run(ECO(format="int", bits=4, group_size=8, skip=()), steps=1)
    naive, nopt = _adamw_run(NoMaster(format="int", bits=4, group_size=8, skip=()), steps=1)
    p, q = next(eco.parameters()), next(naive.parameters())
    assert not torch.equal(eopt.state[p]["exp_avg"], nopt.state[q]["exp_avg"])
    assert torch.equal(eopt.state[p]["exp_avg_sq"], nopt.state[q]["exp_avg_sq"])


def test_eco_rejects_an_optimizer_without_momentum():
    model = _mlp()
    state = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(Exception, match="momentum"):
        ECO(skip=()).on_train_start(state)


# bytes per weight: fp8 codes plus an fp32 scale per row of 256; int4 codes plus a scale per group of 32
@pytest.mark.parametrize("fmt,per_weight", [(dict(format="fp8"), 1 + 4 / 256),
                                            (dict(format="int", bits=4, group_size=32), 0.5 + 4 / 32)])
def test_the_weights_held_between_steps_are_the_codes(fmt, per_weight):
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256, bias=False))
    opt = torch.optim.AdamW(model.parameters())
    assert memory_report(model, opt)["weights_MB"] * 2**20 == 2 * 256 * 256 * 4
    ECO(**fmt, skip=()).on_train_start(SimpleNamespace(model=model, optimizer=opt))
    placeholders = 2 * 4  # each parameter keeps one fp32 element
    assert memory_report(model, opt)["weights_MB"] * 2**20 == 2 * 256 * 256 * per_weight + placeholders


# ---------------------------------------------------------------------------- through the loop

def test_eco_checkpoint_holds_weights_on_the_grid_and_resumes_exactly(tmp_path):
    from rlx.quantizers.formats import FP8

    full, resumed, a, b = straight_and_resumed(tmp_path, ["quantizer=eco", "quantizer.rounding=stochastic",
                                                         "optimizer=sgd", "trainer.lr_scheduler=constant"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["train/loss"] == resumed["train/loss"]
    w = a["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(FP8("channel").decode(FP8("channel").encode(w)), w)


def test_the_loop_reports_the_memory_eco_saves(tmp_path):
    held = {q: run_training(small_config(*q.split()), tmp_path / q.replace(" ", "_"))
            for q in ("quantizer=none", "quantizer=master", "quantizer=eco",
                      "quantizer=eco quantizer.format=int quantizer.group_size=16")}
    none, master = held["quantizer=none"], held["quantizer=master"]
    fp8, int4 = held["quantizer=eco"], held["quantizer=eco quantizer.format=int quantizer.group_size=16"]
    assert master["memory/weights_MB"] == none["memory/weights_MB"]
    assert int4["memory/weights_MB"] < fp8["memory/weights_MB"] < 0.5 * none["memory/weights_MB"]
    assert fp8["memory/optimizer_MB"] == none["memory/optimizer_MB"]  # ECO adds no buffer
    assert fp8["memory/scratch_MB"] > 0


# ---------------------------------------------------------------------------- ECO-Adam's trajectory

def _least_squares_run(hook, schedule: str, steps: int = 600, every: int = 10) -> list[float]:
    """A noisy least-squares problem: y = W*x + 0.5·noise, 512 examples, minibatches of 16, one
    16x32 linear layer held as int4 (a scale per row of 32), AdamW at lr 0.01 without decay, constant
    or cosine LR (to 1% of the peak). Returns the full-data loss of the held weights every `every` steps."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, 32, generator=g)
    x = torch.randn(512, 32, generator=g)
    y = x @ target.T + 0.5 * torch.randn(512, 16, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16, bias=False))
    model[0].weight.data = 0.1 * torch.randn(16, 32, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    cosine = lambda s: 0.01 + 0.495 * (1 + math.cos(math.pi * s / steps))
    factor = (lambda s: 1.0) if schedule == "constant" else cosine
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    state = SimpleNamespace(model=model, optimizer=opt)
    hook.on_train_start(state)
    losses = []
    for t in range(1, steps + 1):
        batch = torch.randint(0, 512, (16,), generator=g)
        ((model(x[batch]) - y[batch]) ** 2).mean().backward()
        hook.on_before_optimizer_step(state)
        opt.step()
        sched.step()
        opt.zero_grad()
        hook.on_step_end(state)
        if t % every == 0:
            with torch.no_grad():
                losses.append(((model(x) - y) ** 2).mean().item())
    return losses


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_eco_adam_stays_near_the_master_weight_run_and_far_below_naive_removal(schedule):
    # Measured (final loss / mean over the trajectory): constant LR: master 0.75 / 5.6, ECO 2.14 / 9.3,
    # no master 41.4 / 37.8; cosine: master 1.77 / 6.3, ECO 3.28 / 10.4, no master 38.2 / 36.5. The
    # adam_correction before b6f29d0 (the next step's V divided by bc2(t+1)) gave ECO 3.41 / 14.5 at
    # constant LR and 12.8 / 18.7 under cosine: it fails both ratios below, under either schedule.
    fmt = dict(format="int", bits=4, group_size=32, skip=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and the figures do not depend on it
    try:
        master = _least_squares_run(MasterWeights(**fmt), schedule)
        eco = _least_squares_run(ECO(**fmt), schedule)
        naive = _least_squares_run(NoMaster(**fmt), schedule)
    finally:
        torch.set_num_threads(threads)
    mean = lambda losses: sum(losses) / len(losses)
    assert mean(eco) < 2.0 * mean(master)  # the whole trajectory, not only where it ends
    assert eco[-1] < 3.5 * master[-1]
    assert eco[-1] < 0.1 * naive[-1] and mean(eco) < 0.4 * mean(naive)
    assert master[-1] < 0.1 * master[0]  # the run learns
