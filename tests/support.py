"""What tests share: the shrunken configs, hooks that tests inject by `_target_` string
(`tests.support.InterruptAt`), and small fixtures of models, gradients and layers."""
from __future__ import annotations

import json

import torch

from rlx.config import compose_config
from rlx.data.reasoning import ReasoningTask
from rlx.hooks import EVENTS, Hook
from rlx.lowrank.trp import TRP
from rlx.models import tiny
from rlx.optimizers.splitting import GradientSplitting
from rlx.rewards import WeightedSum
from rlx.state import TrainState

# ---------------------------------------------------------------------------- from tests/conftest.py


# A model and data set small enough that a training step takes milliseconds.
SMALL = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.num_train=256",
    "data.num_validation=8",
    "data.num_test=8",
    "trainer.max_steps=2",
    "trainer.micro_batch_size=4",
    "trainer.log_every=1",
    "trainer.warmup_steps=0",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.eval_samples=4",
    "trainer.eval_max_new_tokens=8",
    "trainer.progress=false",
]


def small_config(*overrides: str):
    """SMALL plus `overrides` on `model=tiny` (which RL and preference algorithms would otherwise swap
    for the SFT base); choosing another group option (`model=hf`) drops SMALL's keys for that group."""
    chosen = {o.split("=")[0] for o in overrides if "." not in o.split("=")[0]}
    base = [o for o in ["model=tiny", *SMALL] if o.split(".")[0].split("=")[0] not in chosen]
    return compose_config("train", [*base, *overrides])


def straight_and_resumed(tmp_path, overrides: list[str], steps: int = 4, cut: int = 2):
    """Run `steps` steps straight, and `cut` steps then a resume to `steps` (save every `cut`):
    both summaries and both final weights, to compare for exact resume."""
    from safetensors.torch import load_file

    from rlx.tasks import run_training

    over = [*overrides, f"trainer.save_every={cut}"]
    full = run_training(small_config(*over, f"trainer.max_steps={steps}"), tmp_path / "full")
    run_training(small_config(*over, f"trainer.max_steps={cut}"), tmp_path / "cut")
    resumed = run_training(small_config(*over, f"trainer.max_steps={steps}", "trainer.resume=auto"), tmp_path / "cut")
    weights = [load_file(tmp_path / run / "checkpoints/last/model.safetensors") for run in ("full", "cut")]
    return full, resumed, *weights


# ---------------------------------------------------------------------------- from tests/test_loop.py


EVENT_LOG: list[str] = []


class Recorder(Hook):
    """Records every event; changes nothing."""

    def __getattribute__(self, name):
        if name in EVENTS:
            EVENT_LOG.append(name)
        return object.__getattribute__(self, name)


class InterruptAt(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, state):
        if state.step == self.step:
            raise KeyboardInterrupt


class PoisonAt(Hook):
    """Writes a NaN into the weights at `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, state):
        if state.step == self.step:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def hook(name: str, target: str, **kwargs) -> list[str]:
    return [f"+hooks.{name}._target_={target}", *(f"+hooks.{name}.{k}={v}" for k, v in kwargs.items())]


# ---------------------------------------------------------------------------- from tests/optimizers/test_splitting.py


def small_model(seed=0):
    return tiny(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=40, device="cpu").model


def grads(model, seed):
    """A fixed pseudo-gradient per parameter and step (no forward pass needed)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def splitting(model, **kw):
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), **kw}
    return GradientSplitting(model.named_parameters(), **kw)


def assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tol)


# ---------------------------------------------------------------------------- from tests/compress/test_gptq.py


def layer(out=32, inp=64, samples=512, seed=0):
    """A weight and a Hessian from correlated inputs (as activations are): H = X Xᵀ."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = mix @ torch.randn(inp, samples, generator=g)
    return w, x @ x.T


def output_error(w, q, h):
    """‖(W − Q) X‖² = trace((W − Q) H (W − Q)ᵀ), relative to ‖W X‖²."""
    d = w - q
    return (torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T)).item()


# ---------------------------------------------------------------------------- from tests/compress/test_ptq.py


SMALL_COMPRESS = ["model=tiny", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",  # rlx quantize/prune
                  "model.intermediate_size=64", "data.num_train=64", "data.num_validation=8", "data.num_test=8",
                  "calib.samples=32", "eval.samples=4", "eval.max_new_tokens=8", "progress=false"]


# ---------------------------------------------------------------------------- from tests/lowrank/test_trp.py


SUBSTITUTIONS: list = []


class ProbedTRP(TRP):
    """TRP that records, after backward (the weights are as the step's forward saw them), on each
    substitution step: every target's numerical rank and the rank TRP kept."""

    def on_train_start(self, state):
        SUBSTITUTIONS.clear()
        super().on_train_start(state)

    def on_step_start(self, state):
        self.kept = None
        super().on_step_start(state)

    def substitute(self):
        self.kept = super().substitute()
        return self.kept

    def on_after_backward(self, state):
        super().on_after_backward(state)
        if self.kept is not None:
            ranks = {n: int(torch.linalg.matrix_rank(state.model.get_submodule(n).weight.detach())) for n in self.kept}
            SUBSTITUTIONS.append((state.step, ranks, dict(self.kept)))


# ---------------------------------------------------------------------------- from tests/quantizers/test_qat.py


FAKE_QUANT_STATES: list = []


class RecordFakeQuant(Hook):
    """Records, at each step's start (after the quantizer's), whether fake quantization is on."""

    def on_train_start(self, state):
        FAKE_QUANT_STATES.clear()

    def on_step_start(self, state):
        layer = state.model.get_submodule("model.layers.0.mlp.down_proj")
        FAKE_QUANT_STATES.append((state.step, state.tokens, layer.weight_fake_quantizer.enabled))


# ---------------------------------------------------------------------------- from tests/algorithms/test_grpo.py


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


TASK = ReasoningTask(num_train=16, num_validation=2, num_test=2)


class Constant:
    def __call__(self, responses, examples, task, lengths=None):
        return torch.ones(len(responses))


class Alternating:
    """Rewards 1, 0, 1, 0, ... so every group has a spread and a non-zero advantage."""

    def __call__(self, responses, examples, task, lengths=None):
        return torch.tensor([float(i % 2 == 0) for i in range(len(responses))])


# ---------------------------------------------------------------------------- from tests/algorithms/test_dler.py


def eos_policy():
    """A tiny model that always answers with EOS at once: every response finished, length 1."""
    policy = tiny(**TINY, device="cpu")
    eos = policy.tokenizer.eos_token_id

    def favour_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 50.0
        return logits

    policy.model.lm_head.register_forward_hook(favour_eos)
    return policy


def loss_of(algo_cls, reward, **kwargs):
    policy = eos_policy()
    state = TrainState(policy.model, policy.tokenizer, torch.optim.SGD(policy.model.parameters(), lr=0.1), None, TASK)
    algo = algo_cls(WeightedSum({"r": reward}, {"r": 1.0}), group_size=4, max_new_tokens=8, **kwargs)
    torch.manual_seed(0)
    batch = algo.make_batch(TASK.split("train")[:2], state)
    return algo.loss(batch, state)[0], batch
