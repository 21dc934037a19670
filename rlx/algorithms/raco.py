"""RACO: reward-free alignment for conflicting objectives (Chen, Li, Chen and Lin, ICML 2026, arXiv
2602.02495; official code PeterLauLukChen/RACO, a TRL fork): one DPO loss per objective on the same
pairs, combined by CAGrad's conflict-averse direction with the mixing weights clipped by the user's
preference weights.

    rlx train algo=raco                                   # correctness vs brevity, weights (0.8, 0.2)
    rlx train algo=raco algo.weights=[0.5,0.5] algo.c=0.25
    rlx train algo=raco algo.clip=false                   # vanilla CAGrad;  algo.use_cagrad=false: DPO-LW

Each objective i labels every pair with a sign s_i in {+1, -1, 0} (chosen better, worse, tie), from
the pair itself (`OBJECTIVES`): `label` the data set's preference (+1), `correct` the task's checker
(score(chosen) - score(rejected)), `short` the shorter response in lines. With the DPO margin
Delta = [log pi(y_c) - log pi(y_r)] - [log pi_ref(y_c) - log pi_ref(y_r)] (summed log-probs),

    L_i  = mean_pairs -log sigmoid(beta s_i Delta)            (a tie: log 2, no gradient)
    g_i  = grad L_i,   g0 = sum_i w_i g_i,   H_ij = <g_i, g_j>,   s = c ||g0||
    p*   = argmin_{p in simplex} <G_p, g0> + s ||G_p||,   G_p = sum_i p_i g_i      (CAGrad's subproblem)
    p~   = min(p*, w)                                        (RACO's clipping, elementwise)
    G0   = g0 + s G~ / ||G~||,   G~ = sum_i p~_i g_i,    i.e.  G0 = sum_i a_i g_i,  a_i = w_i + s p~_i / ||G~||

The subproblem depends on H only: for two objectives its closed form, for three the exact search
over vertices, edges, interior KKT points and the zero-norm point (the official code's solvers,
`solve_simplex`). The loop's backward of `sum_i a_i L_i` (a detached) is then exactly G0, so the
loop, its accumulation and clipping stay as they are; the g_i cost one extra backward pass each.

As the official code: the direction is per micro-batch (and per rank under data parallelism, before
DDP averages), beta 0.2, c 0.4, clipping on. With c = 0 or use_cagrad=false it is DPO-LW
(sum_i w_i L_i); with one objective, or identical ones, G0 = (1 + c) g: DPO with its step scaled by
1 + c (tested). The user weights are normalised to sum to 1. More than three objectives are refused
(the paper's exact solvers stop at three).

Metrics: raco/loss_<objective>, raco/a_<objective> (the coefficient of its gradient in G0),
raco/cos (cosine of the first two objectives' gradients: < 0 is a conflict), and DPO's implicit
reward metrics under raco/.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, policy_logps, reward_metrics
from rlx.errors import RlxError

OBJECTIVES = ("label", "correct", "short")


# ---------------------------------------------------------------------------- the subproblem


def _phi(p: Tensor, H: Tensor, b: Tensor, s: float) -> float:
    return float(b @ p + s * (p @ H @ p).clamp(min=0).sqrt())


def _solve_pair(H: Tensor, b: Tensor, s: float) -> float:
    """lambda in [0, 1] minimising b2 + (b1 - b2) lambda + s sqrt(q2 lambda^2 + q1 lambda + q0), p = (lambda, 1 - lambda)."""
    delta = float(b[0] - b[1])
    q2, q1, q0 = float(H[0, 0] + H[1, 1] - 2 * H[0, 1]), float(2 * (H[0, 1] - H[1, 1])), float(H[1, 1])
    # stationary points: (delta^2 q2 - s^2 q2^2) l^2 + (delta^2 q1 - s^2 q1 q2) l + delta^2 q0 - s^2 q1^2 / 4 = 0
    A, B, C = delta**2 * q2 - s**2 * q2**2, delta**2 * q1 - s**2 * q1 * q2, delta**2 * q0 - s**2 * q1**2 / 4
    candidates = [0.0, 1.0]
    if abs(A) > 1e-14:
        disc = B * B - 4 * A * C
        if disc >= 0:
            candidates += [(-B + sign * math.sqrt(disc)) / (2 * A) for sign in (1, -1)]
    elif abs(B) > 1e-14:
        candidates.append(-C / B)
    h = lambda lam: delta * lam + s * math.sqrt(max(q2 * lam * lam + q1 * lam + q0, 0.0))
    return min((c for c in candidates if 0.0 <= c <= 1.0), key=h)


def solve_simplex(H: Tensor, b: Tensor, s: float) -> Tensor:
    """p* = argmin over the simplex of Phi(p) = b^T p + s sqrt(p^T H p), for 1, 2 or 3 objectives
    (float64): 2 in closed form, 3 by the exact candidate search."""
    H, b = H.double(), b.double()
    m = b.numel()
    if m == 1:
        return torch.ones(1, dtype=torch.float64)
    if m == 2:
        lam = _solve_pair(H, b, s)
        return torch.tensor([lam, 1 - lam], dtype=torch.float64)
    if m != 3:
        raise RlxError(f"RACO's exact solvers handle up to 3 objectives, not {m}")
    candidates = list(torch.eye(3, dtype=torch.float64))  # the vertices
    for i, j in itertools.combinations(range(3), 2):  # each edge: the pair problem on (i, j)
        idx = [i, j]
        lam = _solve_pair(H[idx][:, idx], b[idx], s)
        p = torch.zeros(3, dtype=torch.float64)
        p[i], p[j] = lam, 1 - lam
        candidates.append(p)
    inv, ones = torch.linalg.pinv(H), torch.ones(3, dtype=torch.float64)
    A, B, C = float(ones @ inv @ ones), float(ones @ inv @ b), float(b @ inv @ b)
    disc = B * B - A * (C - s * s)
    if A > 1e-14 and disc >= 0:  # interior KKT points: p ~ H^-1 (nu 1 - b), A nu^2 - 2 B nu + C - s^2 = 0
        for nu in ((B + math.sqrt(disc)) / A, (B - math.sqrt(disc)) / A):
            v = inv @ (nu * ones - b)
            if abs(float(v.sum())) > 1e-14:
                candidates.append(v / v.sum())
    eigenvalues, vectors = torch.linalg.eigh(H)  # an interior point where G_p = 0
    for k in range(3):
        v = vectors[:, k]
        if eigenvalues[k] < 1e-12 * max(float(eigenvalues.abs().max()), 1e-30) and (v.abs().sum() > 0):
            v = v if v.sum() > 0 else -v
            if (v >= -1e-12).all():
                candidates.append(v.clamp(min=0) / v.clamp(min=0).sum())
    feasible = [p for p in candidates if (p >= -1e-9).all() and abs(float(p.sum()) - 1) < 1e-6]
    return min(feasible, key=lambda p: _phi(p, H, b, s))


def raco_coefficients(H: Tensor, w: Tensor, c: float, clip: bool = True, use_cagrad: bool = True) -> Tensor:
    """a with G0 = sum_i a_i g_i, from the Gram matrix H [m, m] of the objectives' gradients and the
    preference weights w (summing to 1): w itself for DPO-LW (c = 0, use_cagrad off, or g0 = 0)."""
    H, w = H.double(), w.double()
    g0_norm = float((w @ H @ w).clamp(min=0).sqrt())
    if not use_cagrad or c == 0 or g0_norm == 0:
        return w
    s = c * g0_norm
    p = solve_simplex(H, H @ w, s)
    p = torch.minimum(p, w) if clip else p
    tilde_norm = float((p @ H @ p).clamp(min=0).sqrt())
    if tilde_norm <= 1e-12 * g0_norm:
        return w
    return w + s * p / tilde_norm


# ---------------------------------------------------------------------------- labels


def _lines(text: str) -> int:
    return text.strip().count("\n") + 1


def pair_signs(examples: list[dict], objectives: list[str], task) -> Tensor:
    """[m, B] each objective's sign per pair: +1 chosen better, -1 worse, 0 a tie."""
    rows = []
    for name in objectives:
        if name == "label":
            rows.append([1.0] * len(examples))
        elif name == "correct":
            rows.append([float(task.score(ex["chosen"], ex) - task.score(ex["rejected"], ex)) for ex in examples])
        elif name == "short":
            rows.append([float((_lines(ex["rejected"]) > _lines(ex["chosen"])) - (_lines(ex["rejected"]) < _lines(ex["chosen"])))
                         for ex in examples])
        else:
            raise RlxError(f"unknown RACO objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return torch.tensor(rows)


# ---------------------------------------------------------------------------- the algorithm


class RACO:
    needs_trained_model = True

    def __init__(self, reference=None, objectives=("correct", "short"), weights=(0.8, 0.2), beta: float = 0.2,
                 c: float = 0.4, clip: bool = True, use_cagrad: bool = True, max_length: int = 256):
        objectives, weights = list(objectives), [float(x) for x in weights]
        if not 1 <= len(objectives) <= 3 or len(weights) != len(objectives):
            raise RlxError(f"algo.objectives ({objectives}) and algo.weights ({weights}) need 1 to 3 entries each, "
                           "one weight per objective")
        if set(objectives) - set(OBJECTIVES):
            raise RlxError(f"unknown RACO objectives {sorted(set(objectives) - set(OBJECTIVES))}; valid: {', '.join(OBJECTIVES)}")
        if min(weights) < 0 or sum(weights) <= 0:
            raise RlxError(f"algo.weights={weights} must be >= 0 with a positive sum (they are normalised)")
        if beta <= 0 or c < 0:
            raise RlxError(f"algo.beta={beta} must be > 0 and algo.c={c} >= 0")
        self.objectives, self.beta, self.c, self.clip, self.use_cagrad = objectives, beta, c, clip, use_cagrad
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.pairs = PairBatcher(reference, max_length)

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference cache is recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = self.pairs.make_batch(examples, state)
        batch["signs"] = pair_signs(list(examples), self.objectives, state.task).to(state.model.device)
        return batch

    def loss(self, batch: dict, state):
        chosen, rejected, _, _ = policy_logps(state.model, batch)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        losses = [-F.logsigmoid(self.beta * signs * margin).mean() for signs in batch["signs"]]
        params = [p for p in state.model.parameters() if p.requires_grad]
        grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
        flat = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                                       for g, p in zip(gs, params)]) for gs in grads])
        H = flat @ flat.T
        a = raco_coefficients(H.cpu(), self.weights, self.c, self.clip, self.use_cagrad)
        loss = sum(float(a_i) * loss_i for a_i, loss_i in zip(a, losses))
        metrics = {"train/loss": loss.detach()}
        for name, loss_i, a_i in zip(self.objectives, losses, a):
            metrics[f"raco/loss_{name}"] = loss_i.item()
            metrics[f"raco/a_{name}"] = float(a_i)
        if len(losses) > 1:
            norms = H.diagonal().clamp(min=1e-30).sqrt()
            metrics["raco/cos"] = float(H[0, 1] / (norms[0] * norms[1]))
        beta_margin = self.beta * (chosen - ref_chosen).detach(), self.beta * (rejected - ref_rejected).detach()
        return loss, {**metrics, **reward_metrics("raco", *beta_margin)}
