"""FTWT's gated MLP: per-token mask predictors on each block's MLP channels, their self-supervised
targets, the gated (channel-skipping) MLP and the count of the multiply-adds it spends.

Elkerdawy, Elhoushi, Zhang, Ray, "Fire Together Wire Together: A Dynamic Pruning Approach with
Self-Supervised Mask Prediction", CVPR 2022, arXiv 2110.08232; official code selkerdawy/FTWT
(`utils/layers.py`, `utils/utils.py`, `cifar.py`). The training is rlx/algorithms/ftwt.py:

    rlx train algo=ftwt                                  # heads on the SFT base, backbone frozen
    rlx train algo=ftwt algo.tau=0.9 algo.mode=joint     # task CE + BCE, the backbone trains too

Transfer to a Llama-style MLP, y = down(act(gate(x)) * up(x)): the "filters" of layer l are the
I intermediate channels of block l's MLP, h = act(gate(x)) * up(x) (I values per token), and the
"previous layer's output" the head reads is that block's MLP input x (the normed residual stream
that gate and up see). Per block l and per token:

    mass_c   = |h_c|                                   the channel's activation magnitude
    target   = the smallest top-k channels by mass whose cumulative mass reaches tau * sum_c mass_c
               (k >= 1; `mass_targets`)                                        paper Sec. 3.2
    logits   = head_l(x) = B_l (A_l x) + b_l           A_l: r x H, B_l: I x r  (`MaskHead`)
    loss     = mean_l  sum_c  mean_tokens BCE(logits_c, target_c)              (`mask_bce`)
    inference: keep c iff sigmoid(logits_c) > 0.5;  y = down[:, K] (h_K)      (`gated_mlp`)

Choices and deviations:
* Granularity: per token. An LM's "input" for a next-token prediction is its own position; a
  per-sequence mask (the paper's global pooling over the image) would need the future tokens of a
  causal model, or a mask frozen at the prompt during generation, and a pad mask the MLP never
  sees. That is not implemented (not cheap here); per-token gating is the causal analogue.
* The head is low-rank (`rank`, default 32) where the paper's is one FC / 1x1 conv after pooling:
  per token a full H x I head costs a third of the MLP (H*I against 3*H*I), the paper's is
  negligible only because it runs once per image. r(H + I) multiply-adds are counted against the
  savings. `rank: null` gives the paper's full FC. The official head's softmax over the pooled
  input is left out (x is already RMS-normed).
* Mass: |h| per token. The official code scores a filter by the max over positions of |output|
  (its `get_fmap_criteria`); per token the max over one position is |h| itself.
* Target rule `reach` (default, the paper's text and the note's check: [5,3,1,1], tau 0.8 ->
  [1,1,0,0]) keeps channel i (in descending mass) while the mass before it is below tau * total,
  so tau = 1 keeps every non-zero channel and tau -> 0 exactly one. `within` is the official
  code's rule: keep channels whose normalised cumulative mass stays within tau + 1e-5 (a floor,
  not a ceiling; at tau = 1 it drops channels of normalised mass <= 1e-5); here it also keeps at
  least one channel, where the official code may keep none.
* Skipping: the gated path multiplies h by the 0/1 mask before `down` (`gated_mlp`), so a dropped
  channel adds exactly 0 to the output; it still computes gate and up densely, so time is not
  saved on this path, and the FLOPs are counted, not timed: `gathered_mlp` computes each token
  from only its kept rows of gate/up and columns of down (really skipping them; the tests check
  it equals the masked path, and its FLOPs by torch's counter), and `GateStats` counts, per
  token, 3*H*|K| + r*(H + I) against the dense 3*H*I (and against the whole model's linear
  layers, `linear_macs`). Attention's score products (context-length dependent), norms,
  activations and biases are left out of every count.
* Every channel kept (tau = 1 on a model without exact zeros, or `mode="dense"`) gives the dense
  model bit for bit: the dense path is the stock MLP's own expression.

Saving: the heads are not modules of the model (its checkpoint stays a plain transformers model,
which loads anywhere as the dense model); the algorithm's `state_dict` holds them, so every
checkpoint's `trainer_state.pt` carries them under `algo.ftwt` with the settings.
`load_gated(checkpoint)` rebuilds the gated model from a checkpoint folder (the benchmark uses it),
and `apply_ftwt(model, checkpoint=None)` does the same to a model already loaded from one (its
`name_or_path`), in the form of a `model.parameterization` surgery.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlx.errors import RlxError

RULES = ("reach", "within")
MODES = ("gated", "dense", "static")
DELTA = 1e-5  # the official code's tolerance on normalised mass


# ---------------------------------------------------------------------------- pure functions


def mass_targets(mass: Tensor, tau: float, rule: str = "reach") -> Tensor:
    """0/1 target mask over the last dim of `mass` (>= 0): the top channels by mass whose cumulative
    share reaches `tau` (`reach`) or stays within it (`within`, the official code's); at least one."""
    ordered, order = mass.sort(-1, descending=True)
    ordered = ordered.double()  # the sums in float64, so tau = 1 meets the total exactly
    cum = ordered.cumsum(-1)
    total = cum[..., -1:]
    if rule == "reach":  # keep i while the mass before it has not reached tau * total
        keep = (cum - ordered) < tau * total
    elif rule == "within":
        share = cum / total.clamp_min(1e-300)
        keep = (ordered / total.clamp_min(1e-300) > DELTA) if tau >= 1 else share - tau <= DELTA
    else:
        raise RlxError(f"unknown FTWT target rule {rule!r}; valid: {', '.join(RULES)}")
    keep[..., 0] = True  # k >= 1: the largest channel always fires
    return torch.zeros_like(mass).scatter(-1, order, keep.to(mass.dtype))


def mask_bce(logits: list[Tensor], targets: list[Tensor]) -> Tensor:
    """The official loss: per layer, BCE summed over channels and averaged over inputs (rows);
    averaged over layers. Each entry is (rows, channels)."""
    per_layer = [F.binary_cross_entropy_with_logits(z.float(), t.float(), reduction="none").mean(0).sum()
                 for z, t in zip(logits, targets, strict=True)]
    return torch.stack(per_layer).mean()


def mlp_hidden(mlp: nn.Module, x: Tensor) -> Tensor:
    """h = act(gate(x)) * up(x), the I channels a mask selects."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def gated_mlp(mlp: nn.Module, h: Tensor, mask: Tensor) -> Tensor:
    """down(h * mask): a dropped channel contributes exactly zero."""
    return mlp.down_proj(h * mask.to(h.dtype))


def gathered_mlp(mlp: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """The same output computed from only the kept channels of each row of `x` (rows, H): gate and
    up rows and down columns are gathered per row, so dropped channels are never multiplied."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    out = []
    for row, keep in zip(x, mask.bool()):
        idx = keep.nonzero().squeeze(1)
        g = F.linear(row, gate.weight[idx], None if gate.bias is None else gate.bias[idx])
        u = F.linear(row, up.weight[idx], None if up.bias is None else up.bias[idx])
        out.append(F.linear(mlp.act_fn(g) * u, down.weight[:, idx], down.bias))
    return torch.stack(out)


def head_macs(hidden: int, intermediate: int, rank: int | None) -> int:
    """Multiply-adds of one head per token: r(H + I) low-rank, H*I full."""
    return hidden * intermediate if rank is None else rank * (hidden + intermediate)


def linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer of `model` (attention, MLP, LM head): the sum of
    their weights' sizes. The heads are not modules of the model, so they are not in it."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------- the heads


class MaskHead(nn.Module):
    """x (H) -> I mask logits: B(A x) + b, or one H x I linear map at rank None (the paper's FC)."""

    def __init__(self, hidden: int, intermediate: int, rank: int | None):
        super().__init__()
        self.net = (nn.Linear(hidden, intermediate) if rank is None else
                    nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, intermediate)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class GateStats:
    """Per layer: tokens seen and channels computed; `macs` turns them into the multiply-adds spent."""

    tokens: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)

    def add(self, layer: int, tokens: int, kept: int) -> None:
        while len(self.tokens) <= layer:
            self.tokens.append(0)
            self.kept.append(0)
        self.tokens[layer] += tokens
        self.kept[layer] += kept


class FTWTGate(nn.Module):
    """Every block's head and the settings; `attach` puts the gated forward on a model's MLPs.

    `mode`: gated (the heads' masks), dense (no mask: the stock MLP), static (one fixed channel set
    per layer, `static_masks`: a baseline, computed from gathered weights). `recording` keeps each
    layer's (input, dense h, logits, mask) of the last forward for the loss."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_layers: int, tau: float = 0.95,
                 rank: int | None = 32, rule: str = "reach", seed: int = 0):
        super().__init__()
        if not 0 <= tau <= 1:
            raise RlxError(f"algo.tau={tau}: the mass fraction must be in [0, 1]")
        if rule not in RULES:
            raise RlxError(f"unknown algo.rule={rule!r}; valid: {', '.join(RULES)}")
        if rank is not None and not 1 <= rank <= min(hidden_size, intermediate_size):
            raise RlxError(f"algo.rank={rank}: give 1..{min(hidden_size, intermediate_size)}, or null for a full head")
        self.hidden, self.intermediate, self.rank, self.tau, self.rule = hidden_size, intermediate_size, rank, tau, rule
        with torch.random.fork_rng(devices=[]):  # the heads' init depends on `seed` only
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(MaskHead(hidden_size, intermediate_size, rank) for _ in range(num_layers))
        self.mode, self.recording, self.records = "gated", False, []
        self.static_masks: list[Tensor] | None = None
        self.stats = GateStats()
        self.mlps: list[nn.Module] = []

    def settings(self) -> dict:
        return {"hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_layers": len(self.heads),
                "tau": self.tau, "rank": self.rank, "rule": self.rule}

    # -------------------------------------------------------------- attaching

    def attach(self, model: nn.Module) -> None:
        """Give each block's MLP the gated forward (an instance attribute: the model's modules and
        state dict are unchanged)."""
        mlps = [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
        if len(mlps) != len(self.heads):
            raise RlxError(f"FTWT has heads for {len(self.heads)} blocks; the model has {len(mlps)} Llama-style MLPs "
                           "(gate_proj, up_proj, down_proj): set algo.num_layers to the model's")
        for m in mlps:
            if (m.gate_proj.in_features, m.gate_proj.out_features) != (self.hidden, self.intermediate):
                raise RlxError(f"FTWT heads are for hidden {self.hidden} x intermediate {self.intermediate}, the model's "
                               f"MLP is {m.gate_proj.in_features} x {m.gate_proj.out_features}: set algo.hidden_size, "
                               "algo.intermediate_size and algo.num_layers to the model's")
        self.to(mlps[0].gate_proj.weight.device)
        for i, m in enumerate(mlps):
            m.forward = _GatedForward(self, m, i)
        self.mlps = mlps

    def detach_from_model(self) -> None:
        for m in self.mlps:
            del m.forward  # back to the class's forward
        self.mlps = []

    @property
    def attached(self) -> bool:
        return bool(self.mlps)

    # -------------------------------------------------------------- the forward of block `layer`

    def mlp_forward(self, layer: int, mlp: nn.Module, x: Tensor) -> Tensor:
        if self.mode == "dense" and not self.recording:
            return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # the stock MLP's expression
        if self.mode == "static":
            return self._static(layer, mlp, x)
        h = mlp_hidden(mlp, x)
        logits = self.heads[layer](x)
        mask = (torch.sigmoid(logits) > 0.5) if self.mode == "gated" else torch.ones_like(h, dtype=torch.bool)
        if self.recording:
            self.records.append((x, h.detach(), logits, mask))
        kept = int(mask.sum())
        self.stats.add(layer, mask[..., 0].numel(), kept)
        if self.mode == "dense":
            return mlp.down_proj(h)
        return gated_mlp(mlp, h, mask)

    def _static(self, layer: int, mlp: nn.Module, x: Tensor) -> Tensor:
        keep = self.static_masks[layer]
        idx = keep.nonzero().squeeze(1)
        self.stats.add(layer, x[..., 0].numel(), x[..., 0].numel() * idx.numel())
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        h = mlp.act_fn(F.linear(x, g.weight[idx], None if g.bias is None else g.bias[idx]))
        h = h * F.linear(x, u.weight[idx], None if u.bias is None else u.bias[idx])
        return F.linear(h, d.weight[:, idx], d.bias)

    # -------------------------------------------------------------- the targets and the count

    def targets(self, h: Tensor) -> Tensor:
        return mass_targets(h.abs(), self.tau, self.rule)

    def flops(self, model: nn.Module | None = None) -> dict:
        """Multiply-adds per token spent in the MLPs (channels computed + heads) since the last
        `stats` reset, as shares skipped of the dense MLPs' and, with `model`, the whole model's."""
        s = self.stats
        tokens = sum(s.tokens)
        if not tokens:
            return {}
        per_channel = 3 * self.hidden
        heads = 0 if self.mode == "static" else head_macs(self.hidden, self.intermediate, self.rank)
        spent = sum(per_channel * k + heads * n for k, n in zip(s.kept, s.tokens))
        dense = per_channel * self.intermediate * tokens
        out = {"ftwt/kept_share": sum(s.kept) / (self.intermediate * tokens),
               "ftwt/mlp_flops_skipped": 1 - spent / dense}
        if model is not None:  # per token: every layer's linear maps, once per token of each layer
            per_token_total = linear_macs(model) * tokens / len(s.tokens)
            out["ftwt/model_flops_skipped"] = (dense - spent) / per_token_total
        return out

    def reset_stats(self) -> None:
        self.stats = GateStats()


class _GatedForward:
    """What an MLP's `forward` becomes: its block's gated forward (kept off the module tree)."""

    def __init__(self, gate: FTWTGate, mlp: nn.Module, layer: int):
        self.gate, self.mlp, self.layer = gate, mlp, layer

    def __call__(self, x: Tensor) -> Tensor:
        return self.gate.mlp_forward(self.layer, self.mlp, x)


# ---------------------------------------------------------------------------- static baseline


@torch.no_grad()
def mean_mass(model: nn.Module, gate: FTWTGate, batches) -> list[Tensor]:
    """Each layer's mean |h| per channel over the real tokens of `batches` (dense forward)."""
    mode, gate.mode, gate.recording = gate.mode, "dense", True
    sums = [torch.zeros(gate.intermediate) for _ in gate.heads]
    count = 0
    try:
        for batch in batches:
            gate.records = []
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            real = batch["attention_mask"].bool()
            for i, (_, h, _, _) in enumerate(gate.records):
                sums[i] += h[real].abs().sum(0).float().cpu()
            count += int(real.sum())
    finally:
        gate.mode, gate.recording, gate.records = mode, False, []
    return [s / max(count, 1) for s in sums]


def static_masks(mass: list[Tensor], kept: list[int]) -> list[Tensor]:
    """Per layer, the fixed top-`kept` channels by mean mass (the static cut FTWT is compared with)."""
    return [torch.zeros_like(m, dtype=torch.bool).scatter(0, m.topk(max(1, min(k, m.numel()))).indices, True)
            for m, k in zip(mass, kept, strict=True)]


# ---------------------------------------------------------------------------- saved heads


def saved_gate(folder: str | Path) -> FTWTGate:
    """The heads and settings FTWT left in a checkpoint's trainer_state.pt."""
    from rlx.state import STATE_FILE, find_checkpoint

    folder = find_checkpoint(folder)
    try:
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)["algo"]["ftwt"]
    except (FileNotFoundError, KeyError, TypeError):
        raise RlxError(f"{folder} holds no FTWT heads (a checkpoint of `rlx train algo=ftwt` does)") from None
    gate = FTWTGate(**saved["settings"])
    gate.load_state_dict(saved["heads"])
    return gate


def apply_ftwt(model: nn.Module, checkpoint: str | None = None) -> FTWTGate:
    """The `model.parameterization` form: attach the heads saved in `checkpoint` (default: the folder
    the model was loaded from) to `model`, in gated mode; returns the gate (its `flops`)."""
    where = checkpoint or getattr(model, "name_or_path", None)
    if not where:
        raise RlxError("model.parameterization=ftwt needs the checkpoint of an algo=ftwt run")
    gate = saved_gate(where)
    gate.attach(model)
    gate.eval()
    return gate


def load_gated(checkpoint: str | Path, device: str = "cpu"):
    """(Policy, gate): the checkpoint's model in float32 with its FTWT heads attached."""
    from rlx.models import hf
    from rlx.state import find_checkpoint

    folder = find_checkpoint(checkpoint)
    policy = hf(str(folder), dtype="float32", device=device)
    gate = saved_gate(folder)
    gate.attach(policy.model)
    gate.eval()
    return policy, gate
