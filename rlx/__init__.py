"""rlx: one training loop, Hydra config groups and hooks for efficient LLM training research."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import on CPU-only machines about optional kernels rlx does not use.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
# So does torchao (which transformers imports when it is installed) about CUDA kernels and triton,
# and torch's pytree registry about the enums torchao registers at import.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
