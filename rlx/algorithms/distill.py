"""Distillation of an ensemble of teachers into one student, for the data-constrained recipe.

    rlx train experiment=infinite_compute algo=distill algo.teachers=[outputs/a,outputs/b,outputs/c]
    rlx train ... algo=distill algo.teachers=[...] algo.ce_weight=0.5          # mixed with the real-data CE
    rlx train ... algo=distill algo.teachers=[...] algo.synthetic_fraction=0.5 algo.ce_weight=1   # the paper's form

"Pre-training under Infinite Compute" (Kim, Kotha, Liang, Hashimoto; arXiv 2509.14786), section on
distillation: an ensemble (8 x 300M, loss 3.32) is distilled into a 300M student that reaches 3.36,
keeping 83% of the ensemble's gain over the best regularized single model; self-distillation
(300M -> 300M) also beats that model.

The teacher is the ensemble of rlx/ensemble.py: its distribution is q = softmax(z_bar), z_bar the
mean of the K teachers' logits. On every target token t of a batch (mask m_t):

    KL_t = sum_v q_t(v) (log q_t(v) - log p_t(v))            p = softmax(student logits)
    CE_t = -log p_t(x_{t+1})
    loss = sum_t m_t [(1 - ce_weight) KL_t + ce_weight CE_t] / sum_t m_t

so ce_weight = 1 is SFT's token-mean CE exactly, and a student equal to its teachers has KL = 0 and
a zero gradient of the KL term.

Deviations and options (defaults in conf/algo/distill.yaml):
* The default (`synthetic_fraction: 0`, `ce_weight: 0`) is token-level distillation on the real
  training text: the student matches the ensemble's full next-token distribution on the data it has.
  That is NOT the paper's method. The paper samples unconditional synthetic text from the ensemble
  and trains the student from scratch with the plain LM loss on real + synthetic tokens (sequence-
  level distillation; mixing in real data is what keeps self-distillation from collapsing).
* `synthetic_fraction: f > 0` adds that form: each micro-batch gets round(n f / (1 - f)) sampled rows
  beside its n real ones (a fraction f of the rows), drawn in order from a pool of `synthetic_samples`
  texts sampled once, at the start, from the ensemble at `synthetic_temperature`, each
  `max_length` tokens long. With `ce_weight: 1` the loss is then the plain CE on real + synthetic
  text, the paper's objective; below 1 the KL term applies to the synthetic rows too. Each sample
  starts from the first token of a training text (taken in order, cycling), not from a BOS token
  the teachers never saw: nearly, not exactly, unconditional. The paper's mixing ratio, pool size
  and epochs over the synthetic data are not in the note; the pool here is small and reused.
* Teachers are loaded once, frozen, and kept in fp32 beside the student (K forward passes a step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.data.collate import IGNORE, lm_batch
from rlx.ensemble import Ensemble
from rlx.errors import RlxError


def distill_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed KL(q || p) and CE over the target tokens, and their count. Logits are [B, T, V] at the
    positions that predict `labels[:, 1:]` (i.e. already shifted: logits[:, :-1] of a forward)."""
    mask = labels != IGNORE
    log_p = F.log_softmax(student_logits.float(), -1)[mask]
    log_q = F.log_softmax(teacher_logits.float(), -1)[mask]
    kl = (log_q.exp() * (log_q - log_p)).sum()
    ce = F.nll_loss(log_p, labels[mask], reduction="sum")
    return kl, ce, mask.sum()


def with_rows(batch: dict, rows: list[list[int]], pad: int) -> dict:
    """`batch` (lm_batch's right-padded tensors) with token `rows` appended, every token a target:
    sampled ids go in as they are, never through decode and re-tokenization."""
    if not rows:
        return batch
    width = max(batch["input_ids"].shape[1], *(len(r) for r in rows))
    grow = lambda t, value: F.pad(t, (0, width - t.shape[1]), value=value)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": torch.cat([grow(batch["input_ids"], pad), ids]),
            "attention_mask": torch.cat([grow(batch["attention_mask"], 0), mask]),
            "labels": torch.cat([grow(batch["labels"], IGNORE), ids.masked_fill(mask == 0, IGNORE)])}


class Distill:
    needs_trained_model = False  # the student may start from a random init (the paper's does)

    def __init__(self, teachers: list[str], ce_weight: float = 0.0, max_length: int = 256,
                 synthetic_fraction: float = 0.0, synthetic_samples: int = 256, synthetic_temperature: float = 1.0,
                 seed: int = 0):
        from rlx.state import find_checkpoint

        if isinstance(teachers, str) or not teachers:
            raise RlxError("algo.teachers must be a list of checkpoint or run folders: algo.teachers=[path1,path2]")
        if not 0.0 <= ce_weight <= 1.0:
            raise RlxError(f"algo.ce_weight={ce_weight} must be in [0, 1] (1: plain CE, 0: pure distillation)")
        if not 0.0 <= synthetic_fraction < 1.0:
            raise RlxError(f"algo.synthetic_fraction={synthetic_fraction} must be in [0, 1): real rows are kept")
        if synthetic_fraction > 0 and synthetic_samples < 1:
            raise RlxError("algo.synthetic_samples must be >= 1 when algo.synthetic_fraction > 0")
        paths = []
        for t in teachers:
            try:
                paths.append(str(find_checkpoint(t)))
            except RlxError as e:
                raise RlxError(f"algo.teachers: {e}") from None
        self.teacher = Ensemble.load(paths, device="cpu", dtype="float32")  # moved to the student's device later
        self.ce_weight, self.max_length = float(ce_weight), max_length
        self.synthetic_fraction, self.synthetic_samples = float(synthetic_fraction), synthetic_samples
        self.synthetic_temperature, self.seed = synthetic_temperature, seed
        self.pool: Tensor | None = None  # the synthetic texts, [synthetic_samples, max_length]
        self.drawn = 0  # synthetic rows used so far (the pool is cycled in order)

    # ------------------------------------------------------------------------ synthetic data

    def _make_pool(self, state) -> Tensor:
        texts = state.task.split("train")
        first = lambda ex: (ex["text"] if "text" in ex else ex["prompt"])[:1]  # a corpus or a prompt task
        starts = [state.tokenizer(first(texts[i % len(texts)]), add_special_tokens=False)["input_ids"][:1]
                  for i in range(self.synthetic_samples)]
        prompts = torch.tensor(starts, device=self.teacher.device)
        g = torch.Generator(device=self.teacher.device).manual_seed(self.seed)
        rows = [self.teacher.sample(prompts[i : i + 64], self.max_length - 1, self.synthetic_temperature, g)
                for i in range(0, len(prompts), 64)]
        return torch.cat(rows).cpu()

    def _synthetic_rows(self, n_real: int, state) -> list[list[int]]:
        if self.synthetic_fraction == 0:
            return []
        if self.pool is None:
            self.pool = self._make_pool(state)
        m = round(n_real * self.synthetic_fraction / (1 - self.synthetic_fraction))
        rows = [self.pool[(self.drawn + j) % len(self.pool)].tolist() for j in range(m)]
        self.drawn += m
        return rows

    # ------------------------------------------------------------------------ the contract

    def make_batch(self, examples, state) -> dict:
        if self.teacher.device != state.model.device:
            self.teacher.to(state.model.device)
        examples = list(examples)
        batch = with_rows(lm_batch(examples, state.tokenizer, self.max_length),
                          self._synthetic_rows(len(examples), state), state.tokenizer.pad_token_id)
        batch = {k: v.to(state.model.device) for k, v in batch.items()}
        batch["num_targets"] = int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    def param_groups(self) -> list[dict]:
        return []  # the student only; the teachers are frozen

    def state_dict(self) -> dict:
        return {"pool": self.pool, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.pool, self.drawn = state.get("pool"), state.get("drawn", 0)

    def loss(self, batch: dict, state):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = state.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        kl, ce, n = distill_terms(logits, teacher, labels)
        loss = ((1 - self.ce_weight) * kl + self.ce_weight * ce) / n
        with torch.no_grad():
            teacher_ce = F.cross_entropy(teacher.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        metrics = {"train/loss": loss.detach(), "distill/kl": (kl / n).detach(), "distill/ce": (ce / n).detach(),
                   "distill/teacher_ce": teacher_ce / n}
        return loss, metrics
