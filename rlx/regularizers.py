"""Regularizers: wrappers around an algorithm whose loss has a regularized gradient.

    rlx train regularizer=grad_norm                          # IGNITE: λ by dual ascent on ρ‖∇G‖ <= ε
    rlx train regularizer=grad_norm_fixed                    # IGNITE2: a fixed λ
    rlx train regularizer=grad_norm_fixed regularizer.lam=0.5 regularizer.rho=0.05 regularizer.r=0.05
    rlx train algo=dpo regularizer=grad_norm regularizer.of=neg_loss

rlx/tasks.py builds the algorithm, then the regularizer around it (`build(cfg.regularizer, algo=algo)`).
The wrapper hands make_batch and param_groups to the algorithm and returns, from `loss`, a tensor whose
value is the algorithm's loss and whose gradient is the regularized one; the loop backpropagates it,
clips and steps as for any loss.

GradNorm: the surrogate gradient-norm regularizer of IGNITE. Dao, Nguyen, Truong, Hoang, "Incorporating
Surrogate Gradient Norm to Improve Offline Optimization Techniques", arXiv 2503.04242; code
github.com/cuong-dm/IGNITE. The paper's text beyond its abstract and section titles could not be read
here, so no equation numbers are given: what follows is read from the official code
(design_baselines/gradient_ascent_IGNITE{,2}/trainers.py, `train_step`; defaults from
scripts/IGNITE{,2}/ga.py).

    IGNITE trains a surrogate (weights β) on its loss L while holding down the sharpness of G, the
    surrogate's mean prediction over the batch: to first order max_{‖γ‖<=ρ} G(β+γ) − G(β) ≈ ρ‖∇G(β)‖,
    with the constraint ρ‖∇G‖ <= ε and the Lagrangian L(β) + λ(ρ‖∇G(β)‖ − ε). Its gradient,
        ∇L + λρ H_G ∇G/‖∇G‖,
    is taken with a finite difference along the normalized gradient (no second derivatives):
        g = ∇G(β),  β' = β + r g/‖g‖,  g' = ∇G(β'),        d = ∇L(β) + (λρ/r)(g' − g).
    IGNITE then raises or lowers λ by dual ascent after each step (the step used the old λ):
        λ <- λ + η_λ (ρ‖g‖ − ε);
    IGNITE2 keeps λ fixed.

Defaults: grad_norm.yaml is IGNITE's gradient-ascent setting, ε = 0.1, λ0 = 1e-3, η_λ = 1e-3,
ρ = 0.05, r = 0.05; grad_norm_fixed.yaml is IGNITE2's, λ = 0.01, ρ = r = 0.2 (η = 0). These are the
offline-optimization values, tuned for a small regression surrogate. On an LM they do next to nothing:
pretraining model=tiny on Shakespeare (micro-batches of 8 x 256 characters), IGNITE's values gave
‖d − g‖/‖g‖ of 0.06-0.35% and a penalty λρ‖g‖ of 1e-4 of the loss over 30 steps, with λ moving from
1e-3 to 3.6e-3. GNP's scale, λρ/r ≈ 0.5 (`lam=0.5 rho=0.05 r=0.05`), turns the gradient by 12-55%
(a penalty of 0.5-2.5% of the loss) over 20 steps: the values to start an LM from.

Deviations and choices:
* G, transferred to an LM (not the paper's setting). IGNITE's G is a regression surrogate's mean
  prediction, a quantity distinct from its training loss; an LM has no such scalar. `of=loss` (the
  default) takes G = L, the wrapped algorithm's own loss: then ‖∇G‖ = ‖∇L‖ and d = g + (λρ/r)(g' − g)
  is the gradient-norm penalty L + λρ‖∇L‖ of GNP (Zhao, Zhang, Hu, arXiv 2202.03599), computed as the
  forward-difference F-GR of Karakida et al. (arXiv 2210.02720), with IGNITE's constraint and dual
  ascent on λ. `of=neg_loss` takes G = −L (for SFT: the mean log-likelihood of the targets, the
  nearest an LM has to a "mean prediction"): the same penalty ρ‖∇L‖, but the probe steps downhill,
  d = g + (λρ/r)(∇L(β) − ∇L(β − r g/‖g‖)), Karakida's backward difference (B-GR). IGNITE's offline
  black-box optimization benchmark (Design-Bench tasks, and the search that follows the surrogate's
  training) is outside rlx.
* λ stays >= 0 (`project=true`): projected dual ascent, as for an inequality constraint's multiplier.
  The official code does not clip, so with ρ‖g‖ < ε its λ turns negative and rewards sharpness;
  `project=false` reproduces that.
* Per micro-batch: g, its norm and g' are those of each micro-batch (with trainer.grad_accum=1, the
  default, the step's). λ moves once per optimizer step, with ‖g‖ the step's num_targets-weighted mean
  of its micro-batches' norms; the update is applied at the first loss of the next step and is held,
  pending, in the checkpoint, so a resumed run continues exactly.
* The combined gradient d goes through the loop's clipping (trainer.max_grad_norm) and optimizer; the
  official code hands it to Adam unclipped.
* λρ/r = 0 (λ = 0) or ‖g‖ = 0: the probe is skipped and d = g, so λ = 0 is plain training bit for bit
  (with grad_accum=1; with accumulation the micro-batch weight is applied to g, not inside backward).
* Cost: two forward and backward passes per micro-batch, and one copy of the trained weights (they are
  restored from it exactly after the probe, not by subtracting the step).

Which algorithms it may wrap: the algorithm's loss is called twice per micro-batch (at β and at β'),
and only the first call's metrics are kept. That is right for every loss that is a pure function of
the batch and the weights: sft, dpo, rpo, rm, npo, inpo, sparsepo, madpo, smpo, and the RL losses
(grpo and its variants, ppo, tppo), which read a rollout held in the batch (where the old log-probs
default to the current ones, one minibatch, the probe's ratio is 1 at β': the same on-policy objective,
taken at β'). DPO's bco_pair with its
running reward mean updates that mean inside loss(), so the probe would count every batch twice: it
is refused. A model with dropout would draw other masks in the second call (the tiny model has none).

Metrics: reg/grad_norm (‖g‖), reg/lambda (the λ this micro-batch used), reg/penalty (λρ‖g‖, in the
loss's units), reg/correction_ratio (‖d − g‖/‖g‖, how far the regularizer turns the gradient).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlx.errors import RlxError

OF = ("loss", "neg_loss")

# ---------------------------------------------------------------------------- the math (pure functions)


def global_norm(tensors: Sequence[Tensor | None]) -> Tensor:
    """‖(t_1, ..., t_n)‖_2 over every entry of every tensor; None counts as zero."""
    norms = [torch.linalg.vector_norm(t.float()) for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def finite_difference_gradients(loss_fn: Callable[[], tuple[Tensor, dict]], params: list[Tensor], coef: float,
                                r: float, sign: float = 1.0):
    """The regularized gradient d = g + coef·(sign·∇L(β') − sign·g)/r, with g = ∇L(β) and
    β' = β + sign·r·g/‖g‖ (G = sign·L; coef = λρ). Returns (L, metrics of the first call, [d_p], ‖g‖,
    ‖d − g‖). The parameters are perturbed in place for the second call and restored exactly."""
    loss, metrics = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = global_norm(grads)
    step = norm.item()
    if coef == 0 or step == 0:  # nothing to regularize, or no direction to probe
        return loss, metrics, list(grads), norm, torch.zeros(())
    step = sign * r / step
    moved = [(p, g) for p, g in zip(params, grads) if g is not None]
    saved = [p.detach().clone() for p, _ in moved]
    try:
        with torch.no_grad():
            for p, g in moved:
                p.add_(g.to(p.dtype), alpha=step)
        probe, _ = loss_fn()
        probed = torch.autograd.grad(probe, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for (p, _), original in zip(moved, saved):
                p.copy_(original)
    scale = sign * coef / r
    out, correction = [], []
    for g, g2 in zip(grads, probed):
        if g is None and g2 is None:
            out.append(None)
            continue
        g = torch.zeros_like(g2) if g is None else g
        delta = scale * (g2 - g) if g2 is not None else -scale * g
        out.append(g + delta)
        correction.append(delta)
    return loss, metrics, out, norm, global_norm(correction)


def with_gradient(value: Tensor, params: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """A scalar equal to `value` whose gradient with respect to each parameter is its entry of `grads`
    (None: no gradient, as a parameter the loss does not reach)."""
    inner = sum(((p * d.to(p.dtype)).sum() for p, d in zip(params, grads) if d is not None),
                torch.zeros((), device=value.device))
    return value.detach() + (inner - inner.detach())  # the bracket is exactly 0, so the value is exactly L


def dual_ascent(lam: float, eta: float, rho: float, grad_norm: float, epsilon: float, project: bool) -> float:
    """IGNITE's multiplier update λ + η(ρ‖g‖ − ε), kept >= 0 when `project`."""
    lam = lam + eta * (rho * grad_norm - epsilon)
    return max(lam, 0.0) if project else lam


# ---------------------------------------------------------------------------- the wrapper


class GradNorm:
    """IGNITE's surrogate gradient-norm regularizer around `algo` (see the module docstring)."""

    def __init__(self, algo, lam: float = 1e-3, rho: float = 0.05, r: float = 0.05, eta: float = 1e-3,
                 epsilon: float = 0.1, project: bool = True, of: str = "loss"):
        if algo is None:
            raise RlxError("regularizer=grad_norm wraps an algorithm: build it with algo=...")
        if r <= 0:
            raise RlxError(f"regularizer.r={r}: the probe step must be > 0")
        if lam < 0 or rho < 0 or eta < 0:
            raise RlxError(f"regularizer.lam={lam}, rho={rho}, eta={eta}: each must be >= 0")
        if of not in OF:
            raise RlxError(f"unknown regularizer.of={of!r}; valid: {', '.join(OF)}")
        if getattr(algo, "bco_running_mean", False):
            raise RlxError("regularizer=grad_norm calls the loss twice per batch, and DPO's bco_pair running "
                           "reward mean would count each batch twice: use it without the running mean")
        self.algo = algo
        self.needs_trained_model = algo.needs_trained_model
        self.lam, self.rho, self.r, self.eta, self.epsilon, self.project = float(lam), rho, r, eta, epsilon, project
        self.sign = 1.0 if of == "loss" else -1.0
        # the dual update waiting for its step to end: (step, Σ n‖g‖, Σ n) over that step's micro-batches
        self.pending: tuple[int, float, float] | None = None

    def make_batch(self, examples, state) -> dict:
        return self.algo.make_batch(examples, state)

    def param_groups(self) -> list[dict]:
        return self.algo.param_groups()

    def state_dict(self) -> dict:
        return {"algo": self.algo.state_dict(), "grad_norm": {"lam": self.lam, "pending": self.pending}}

    def load_state_dict(self, state: dict) -> None:
        self.algo.load_state_dict(state.get("algo", {}))
        if "grad_norm" in state:
            mine = state["grad_norm"]
            self.lam = float(mine["lam"])
            self.pending = tuple(mine["pending"]) if mine["pending"] is not None else None

    def _settle(self, step: int) -> None:
        """Applies the finished step's dual update when the loop has moved on to another step."""
        if self.pending is None or self.pending[0] == step:
            return
        _, weighted, total = self.pending
        if self.eta and total > 0:
            self.lam = dual_ascent(self.lam, self.eta, self.rho, weighted / total, self.epsilon, self.project)
        self.pending = None

    def loss(self, batch: dict, state):
        self._settle(state.step)
        params = [p for group in state.optimizer.param_groups for p in group["params"] if p.requires_grad]
        lam = self.lam
        loss, metrics, grads, norm, correction = finite_difference_gradients(
            lambda: self.algo.loss(batch, state), params, lam * self.rho, self.r, self.sign)
        n, g_norm = float(batch.get("num_targets", 1)), norm.item()
        _, weighted, total = self.pending or (state.step, 0.0, 0.0)
        self.pending = (state.step, weighted + n * g_norm, total + n)
        metrics = {**metrics, "reg/grad_norm": g_norm, "reg/lambda": lam, "reg/penalty": lam * self.rho * g_norm,
                   "reg/correction_ratio": correction.item() / g_norm if g_norm > 0 else 0.0}
        return with_gradient(loss, params, grads), metrics
