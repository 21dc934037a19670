"""Training objectives, one module each, all built to one contract (`Algorithm`): the loop calls
exactly these five methods and nothing else, so a new algorithm is a class with them, a config
whose `_target_` names it, and a test.

`make_batch` must put `num_targets` (how many units the loss averages over, e.g. target
tokens) in the batch: the loop weights micro-batches by it, so 1 x 8 and 8 x 1 accumulation
give the same gradient. Where those units are not tokens (pairs, sequences), `num_tokens`
tells the loop how many tokens the batch trained on, for `train/tokens` and throughput.
An algorithm with nothing to add writes the no-op one-liners (`return []`, `return {}`, `...`).
Shared pieces are composed, not inherited; no algorithm subclasses or overrides another:
    _rl.py        the math as pure functions (advantages, policy/value losses, KL, aggregation)
    _sampling.py  sample and score a micro-batch of prompts (`Scored`), the shared rollout metrics
    _group.py     GRPO and its variants: settings checks, group selection and dynamic sampling,
                  the rollout's tensors, GRPO's loss around a per-token policy term
    _replay.py    the replay queue of a rollout's minibatches and the minibatch cutter (all online RL)
    _critic.py    the value model of PPO and T-PPO
Where a variant repeats a few lines of GRPO (its rollout, its loss call) the copy is word for
word, and tests/algorithms/test_contract.py checks that it stays so.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Algorithm(Protocol):
    # False for an objective that makes sense from a random init (SFT: pretraining). True for the
    # rest (RL, preferences), which refine a model that can already do the task: a run of one on a
    # random init gets a one-line note at its start.
    needs_trained_model: bool

    def make_batch(self, examples, state) -> dict:
        """Tensors for one micro-batch (RL: run the rollout here). `examples` is the stream's next
        micro-batch (`NextBatch`), drawn only when indexed, so replaying a held rollout consumes no
        data; an algorithm that needs more prompts draws them with `rlx.data.stream.draw_more`."""

    def loss(self, batch: dict, state) -> tuple[Tensor, dict]:
        """(scalar loss averaged over the batch's `num_targets`, metrics)."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups of what the algorithm trains beside the policy (PPO's critic), with
        named parameters: `{"params": [(name, p), ...], **options}`."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume exactly (a critic, a rollout being replayed)."""

    def load_state_dict(self, state: dict) -> None: ...
