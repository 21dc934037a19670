"""FTWT: train per-token mask predictors on each MLP's channels as a self-supervised binary
classification (the heads, targets, gated MLP and FLOPs count are in rlx/compress/ftwt.py).

    rlx train algo=ftwt                                   # decoupled: backbone frozen, heads by BCE only
    rlx train algo=ftwt algo.tau=0.9                      # keep 90% of each token's activation mass
    rlx train algo=ftwt algo.mode=joint optimizer.lr=1e-5 # task CE + BCE, the backbone trains too
    rlx train algo=ftwt algo.rank=null                    # the paper's full FC head (a third of the MLP's cost)

Elkerdawy et al., "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised
Mask Prediction", CVPR 2022, arXiv 2110.08232 (official code selkerdawy/FTWT).

Per step, on the SFT base (model=tiny_sft, built on first use), one forward with every block's
MLP gated by its head's mask (sigmoid > 0.5), as the official training does; each block's targets
come from the dense activation h of that forward (rlx.compress.ftwt.mass_targets at `tau`):

    decoupled (default): L = BCE, the backbone frozen (no gradient reaches it, and its parameters
                         are set requires_grad=False), the heads read the block input detached;
    joint:               L = CE + BCE, unweighted (the official `loss += mask_loss`): the backbone
                         trains on the gated forward's CE and the heads' BCE flows into it too.

The BCE is the official one (per layer: summed over channels, averaged over tokens; averaged over
layers), over the batch's real tokens (not padding). The masks are hard in the forward; neither
loss reaches a head through them (the official binarizer runs under no_grad).

Defaults and their sources:
* tau 0.95: the paper sweeps the mass fraction per model (its script's default 1.0 keeps every
  active filter); 0.95 is one point of the sweep scripts/bench_ftwt.py runs (0.9-0.99).
* head LR 1e-3 with weight decay 0 (the official heads have decay 0 and their own LR, 0.1 with SGD);
  AdamW here, at the loop's schedule. 200 steps of 32 problems.
* train_gated true: the official code applies the predicted masks while training, so each head
  learns on the inputs the pruned earlier blocks give it; false trains on the dense model's.
Deviations (beside the LM transfer in rlx/compress/ftwt.py): no "cooldown" (the official second
half of a joint run with the BCE off) and no head warm-up to all-ones (`--headinit`, off by default
there too).

The heads are checkpointed in `state_dict` (trainer_state.pt, `algo.ftwt`: settings and weights),
so a run resumes exactly and `rlx.compress.ftwt.load_gated(<checkpoint>)` rebuilds the gated
model. The model's own weights stay a plain transformers checkpoint (the dense model). The heads'
sizes come from `algo.hidden_size`, `intermediate_size` and `num_layers` (model=tiny's keys, or the
SFT base's 192, 512, 4); another model needs them set.
"""
from __future__ import annotations

import torch

from rlx.compress.ftwt import FTWTGate, mask_bce
from rlx.data.collate import IGNORE, lm_batch, token_nll
from rlx.errors import RlxError

MODES = ("decoupled", "joint")


class FTWT:
    needs_trained_model = True

    def __init__(self, hidden_size: int, intermediate_size: int, num_layers: int, tau: float = 0.95,
                 mode: str = "decoupled", rank: int | None = 32, rule: str = "reach", train_gated: bool = True,
                 head_lr: float = 1e-3, head_seed: int = 0, max_length: int = 256):
        if mode not in MODES:
            raise RlxError(f"unknown algo.mode={mode!r}; valid: {', '.join(MODES)}")
        self.gate = FTWTGate(hidden_size, intermediate_size, num_layers, tau=tau, rank=rank, rule=rule, seed=head_seed)
        self.mode, self.train_gated, self.head_lr, self.max_length = mode, train_gated, head_lr, max_length

    def param_groups(self) -> list[dict]:
        return [{"params": [(f"ftwt.{n}", p) for n, p in self.gate.named_parameters()], "lr": self.head_lr,
                 "weight_decay": 0.0}]

    def state_dict(self) -> dict:
        return {"ftwt": {"settings": self.gate.settings(), "heads": self.gate.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        if "ftwt" in state:
            self.gate.load_state_dict(state["ftwt"]["heads"])

    def make_batch(self, examples, state) -> dict:
        if not self.gate.attached:
            self.gate.attach(state.model)
            if self.mode == "decoupled":
                state.model.requires_grad_(False)
        batch = lm_batch(examples, state.tokenizer, self.max_length)
        batch = {k: v.to(state.model.device) for k, v in batch.items()}
        batch["num_targets"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    def loss(self, batch: dict, state):
        gate = self.gate
        gate.mode, gate.recording, gate.records = ("gated" if self.train_gated else "dense"), True, []
        gate.reset_stats()
        try:
            if self.mode == "decoupled":
                with torch.no_grad():
                    nll, n = token_nll(state.model, batch)
            else:
                nll, n = token_nll(state.model, batch)
        finally:
            gate.recording, gate.mode = False, "gated"
        real = batch["attention_mask"].bool()
        logits, targets, masks = [], [], []
        for layer, (x, h, z, mask) in enumerate(gate.records):
            if self.mode == "decoupled":  # the forward ran without grad: the head again, on the detached input
                z = gate.heads[layer](x.detach())
            logits.append(z[real])
            targets.append(gate.targets(h[real]))
            masks.append(mask[real])
        gate.records = []
        bce = mask_bce(logits, targets)
        ce = nll / n
        loss = bce if self.mode == "decoupled" else ce + bce
        with torch.no_grad():
            hit = torch.cat([(m == t.bool()).float().mean(1) for m, t in zip(masks, targets)]).mean()
            metrics = {"train/loss": loss.detach(), "train/ce": ce.detach(), "ftwt/bce": bce.detach(),
                       "ftwt/mask_acc": hit,
                       "ftwt/target_share": torch.cat([t.mean(1) for t in targets]).mean(),
                       **gate.flops()}
        return loss, metrics
