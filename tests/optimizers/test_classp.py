"""CLASSP: AdaGrad as its p = 2 limit, the threshold, the accumulator's two options by hand, state
round-trips, and runs through the loop."""
from __future__ import annotations

import io
import math

import pytest
import torch

from rlx.optimizers.classp import CLASSP
from rlx.tasks import run_training
from tests.support import small_config, straight_and_resumed


def steps(grads: list[list[float]], w0: list[float] | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the given gradients in turn; returns the weights and the accumulator."""
    w = torch.nn.Parameter(torch.tensor(w0 or [1.0] * len(grads[0])))
    opt = CLASSP([w], **kw)
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    return w.detach(), opt.state[w]["sum"]


def quadratic(seed: int = 0):
    """f(W) = ½‖A W − B‖² for a fixed 8×4 A and 8×3 B: gradients never vanish on the way."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    return w, lambda w: 0.5 * ((a @ w - b) ** 2).sum()


def test_p2_threshold0_eps0_is_adagrad():
    # ε differs in placement (CLASSP: inside the root; torch: added to the root), so compare at ε = 0
    w, f = quadratic()
    twin = torch.nn.Parameter(w.detach().clone())
    ours = CLASSP([w], lr=0.1, p=2, eps=0.0, threshold=0.0, include_current=True)
    ref = torch.optim.Adagrad([twin], lr=0.1, eps=0.0, initial_accumulator_value=0.0, lr_decay=0.0)
    start = f(w).item()
    for _ in range(10):
        for p, opt in ((w, ours), (twin, ref)):
            opt.zero_grad()
            f(p).backward()
            opt.step()
        torch.testing.assert_close(w, twin, rtol=0, atol=1e-6)
    assert f(w).item() < 0.5 * start


def test_infinite_threshold_never_moves():
    w, acc = steps([[0.3, -2.0], [5.0, 1e3]], lr=0.1, threshold=math.inf)
    assert torch.equal(w, torch.tensor([1.0, 1.0])) and torch.equal(acc, torch.zeros(2))


def test_only_weights_whose_squared_gradient_clears_the_threshold_move():
    # g² = (0.01, 4.0) against 1.0: the second moves by α·g/(|g|^p)^{1/p} = 0.1·2/2 = 0.1
    w, _ = steps([[0.1, 2.0]], lr=0.1, p=1, eps=0.0, threshold=1.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.9]))


@pytest.mark.parametrize("accumulate,acc1,step2", [
    # step 1: g = (0.1, 2), threshold 1 → only weight 2 moves (by 0.1); `updated` skips weight 1's |0.1|
    # step 2: g = (3, 2) → both move; weight 1 by 0.1·3/3 (updated) or 0.1·3/3.1 (all), weight 2 by 0.1·2/4
    ("updated", [0.0, 2.0], [0.1 * 3 / 3.0, 0.1 * 2 / 4.0]),
    ("all", [0.1, 2.0], [0.1 * 3 / 3.1, 0.1 * 2 / 4.0]),
])
def test_accumulator_counts_what_the_option_says(accumulate, acc1, step2):
    kw = dict(lr=0.1, p=1, eps=0.0, threshold=1.0, accumulate=accumulate)
    _, acc = steps([[0.1, 2.0]], **kw)
    torch.testing.assert_close(acc, torch.tensor(acc1))
    w, acc = steps([[0.1, 2.0], [3.0, 2.0]], **kw)
    torch.testing.assert_close(acc, torch.tensor(acc1) + torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(w, torch.tensor([1.0 - step2[0], 0.9 - step2[1]]))


@pytest.mark.parametrize("include_current,moves", [
    # p = 2, ε = 0.01, g = 0.5 twice, α = 0.1. Including g_t: 0.05/√0.26, then 0.05/√0.51.
    # Past gradients only (the paper's k < t): 0.05/√0.01 = 0.5 first, then 0.05/√0.26.
    (True, [0.05 / math.sqrt(0.26), 0.05 / math.sqrt(0.51)]),
    (False, [0.5, 0.05 / math.sqrt(0.26)]),
])
def test_include_current_sets_the_sum_range(include_current, moves):
    kw = dict(lr=0.1, p=2, eps=0.01, include_current=include_current)
    w1, _ = steps([[0.5]], **kw)
    w2, acc = steps([[0.5], [0.5]], **kw)
    assert w1.item() == pytest.approx(1 - moves[0], abs=1e-7)  # from w = 1; the move to 1e-6 of itself
    assert w1.item() - w2.item() == pytest.approx(moves[1], rel=1e-6)
    assert acc.item() == pytest.approx(0.5, rel=1e-6)  # 0.25 + 0.25 either way


def test_bad_options_are_refused():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="valid: updated, all"):
        CLASSP(w, accumulate="some")
    with pytest.raises(ValueError, match="eps must be > 0"):
        CLASSP(w, include_current=False, eps=0.0)


def test_state_dict_round_trips():
    w, f = quadratic()
    w0 = w.detach().clone()
    opt = CLASSP([{"params": [("w", w)]}], lr=0.05, threshold=0.5)
    for _ in range(3):
        opt.zero_grad()
        f(w).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = torch.nn.Parameter(w.detach().clone())
    restored = CLASSP([{"params": [("w", twin)]}], lr=0.05, threshold=0.5)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(restored.state[twin]["sum"], opt.state[w]["sum"])
    for p, o in ((w, opt), (twin, restored)):
        for _ in range(2):
            o.zero_grad()
            f(p).backward()
            o.step()
    assert torch.equal(w, twin) and not torch.equal(w, w0)


# ---------------------------------------------------------------------------- through the loop

LOOP = ["algo=sft", "optimizer=classp", "optimizer.lr=3e-3", "optimizer.threshold=1e-12"]


def test_classp_trains_in_the_loop(tmp_path):
    summary = run_training(small_config(*LOOP), tmp_path)
    assert summary["steps"] == 2 and math.isfinite(summary["train/loss"])


def test_classp_resumes_exactly(tmp_path):
    # a constant LR: the cut run's schedule would otherwise end at its own (shorter) max_steps
    full, resumed, a, b = straight_and_resumed(tmp_path, [*LOOP, "trainer.lr_scheduler=constant"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["train/loss"] == resumed["train/loss"]
