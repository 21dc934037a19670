"""Data parallelism inside the one loop: `torchrun --nproc-per-node N -m rlx train trainer.strategy=ddp`.

torchrun is the outer process; each rank composes the same config and runs the same loop. (A
submitit job of several tasks, `hydra/launcher=slurm_ddp`, is the same: Slurm starts the ranks.) rlx
uses PyTorch's own engines, applied to the model in place so that algorithms keep calling the
plain transformers model (sampling, `get_decoder`, LoRA's adapter switch):

* `ddp`   `torch.distributed._composable.replicate` (DistributedDataParallel's reducer: bucketed
          all-reduce overlapped with the backward), with no buffer sync in the forward, since ranks sample
          responses of different lengths and a collective per forward would deadlock them;
* `fsdp2` `fully_shard` on each decoder layer and the root: parameters, gradients and optimizer
          state sharded across ranks, gathered layer by layer in the forward; sampling and
          evaluation run with the parameters gathered once (`gathered`), for the same reason.

The loop asks this module for the rank's share of the data (micro-batches dealt round-robin
from the one global stream, so the order is that of one process with `grad_accum x N`), the
global token count that weighs the micro-batches, metric and statistic reductions, and whether
this rank is the one that logs and writes. Parameters trained outside the model (PPO's critic)
have their gradients all-reduced here after the backward.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from rlx.errors import RlxError

STRATEGIES = ("single", "ddp", "fsdp2")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def launched_world() -> int:
    """How many processes torchrun (or a submitit job of several tasks) started; 1 otherwise."""
    _export_submitit_ranks()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _export_submitit_ranks() -> None:
    """In a submitit job of several tasks (hydra/launcher=slurm_ddp; submitit's local executor), set
    torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) from the job's, so each task is a rank."""
    if "RANK" in os.environ or not ("SLURM_JOB_ID" in os.environ or "SUBMITIT_LOCAL_JOB_ID" in os.environ):
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def across_ranks(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's 1-d `t` concatenated in rank order, and where this rank's part sits in it: what
    batch statistics (a batch std, a top-k over groups) are taken over under data parallelism, so
    they equal one process's over the same rollouts. Outside torchrun: `t` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t, slice(0, t.numel())
    par = Parallel("ddp", dist.get_rank(), dist.get_world_size())
    sizes = par.gather_sizes(t.numel())
    start = sum(sizes[: par.rank])
    return par.gather_cat(t, sizes), slice(start, start + t.numel())


def batch_concat(t: torch.Tensor) -> torch.Tensor:
    """`across_ranks(t)` without the slice: the whole batch's values."""
    return across_ranks(t)[0]


def join_group() -> None:
    """Join torchrun's process group (NCCL with GPUs, else gloo), once."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=30))


def torchrun_overrides(args: list[str]) -> list[str]:
    """The Hydra arguments of one rank under torchrun: every rank composes the same config into
    the same run folder (rank 0's timestamp, broadcast: Hydra's `${now:}` differs by rank), and
    only rank 0 writes Hydra's own files there. A multirun is refused: torchrun is the outer
    process of one run (hydra#2231); sweep with launchers instead."""
    if launched_world() == 1:
        return args
    if any(a in ("-m", "--multirun") for a in args):
        raise RlxError("rlx train -m under torchrun: torchrun runs one job; sweep with a launcher "
                       "(hydra/launcher=submitit_slurm, see docs/scaling.md) whose jobs call torchrun")
    if any(a.startswith("hydra.run.dir=") for a in args):
        run_dir = None
    else:
        join_group()
        stamp = [datetime.datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S")]
        dist.broadcast_object_list(stamp, src=0)
        run_dir = stamp[0]
    extra = [f"hydra.run.dir={run_dir}"] if run_dir else []
    if int(os.environ.get("RANK", "0")) > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*args, *extra]


class Parallel:
    """One process's place in the run: rank, world size, strategy, and the collectives the loop uses.
    `Parallel()` is the single process (`SINGLE`): every method is then a no-op or an identity."""

    def __init__(self, strategy: str = "single", rank: int = 0, world: int = 1, local_rank: int = 0):
        self.strategy, self.rank, self.world, self.local_rank = strategy, rank, world, local_rank

    @classmethod
    def start(cls, strategy: str) -> Parallel:
        """This process's place, from torchrun's environment; joins the process group."""
        if strategy not in STRATEGIES:
            raise RlxError(f"unknown trainer.strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")
        world = launched_world()
        if strategy == "single":
            if world > 1:
                raise RlxError(f"{world} processes were started for this run (torchrun, or a launcher's tasks) but "
                               "trainer.strategy=single: add trainer.strategy=ddp (or fsdp2)")
            return cls()
        if "RANK" not in os.environ:
            raise RlxError(f"trainer.strategy={strategy} runs under torchrun: "
                           f"torchrun --nproc-per-node N -m rlx train trainer.strategy={strategy} ...")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # model.device=auto ("cuda") then means this rank's GPU
        join_group()
        return cls(strategy, int(os.environ["RANK"]), world, local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the model

    def prepare(self, model: torch.nn.Module) -> None:
        """Apply the strategy to `model` in place (it stays the same transformers object)."""
        if self.strategy == "ddp":
            from torch.distributed._composable import replicate

            device_ids = [self.local_rank] if torch.cuda.is_available() else None
            replicate(model, device_ids=device_ids, forward_sync_buffers=False)
            # DDP itself is built at the first forward unless asked now; now, it broadcasts rank 0's weights
            # before any hook has swapped them (ECO leaves one-element placeholders that cannot be broadcast)
            replicate.state(model).lazy_init()
        elif self.strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(model):
                fully_shard(layer)
            fully_shard(model)

    @contextlib.contextmanager
    def gradient_sync(self, model: torch.nn.Module, enabled: bool):
        """Gradient accumulation: only the last micro-batch's backward communicates."""
        if self.strategy == "single" or not hasattr(model, "set_requires_gradient_sync"):
            yield
            return
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def gathered(self, model: torch.nn.Module):
        """FSDP2: the full parameters on every rank for the duration (sampling, evaluation), so a
        forward is local and ranks may run different numbers of them. Elsewhere a no-op."""
        if self.strategy != "fsdp2":
            yield
            return
        modules = [m for m in model.modules() if hasattr(m, "unshard")]
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def sync_extra_grads(self, params: list[torch.nn.Parameter], model: torch.nn.Module) -> None:
        """Average the gradients of trained parameters that are not the model's (PPO's critic)."""
        if self.world == 1:
            return
        own = {id(p) for p in model.parameters()}
        grads = [p.grad for p in params if id(p) not in own and p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    # ------------------------------------------------------------------ collectives

    def sum(self, values: list[float] | torch.Tensor, device=None) -> torch.Tensor:
        """The element-wise sum over ranks (float64 for counts and metric sums)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=device or self.comm_device)
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def max(self, values: list[float]) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.comm_device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_sizes(self, n: int) -> list[int]:
        sizes = [torch.zeros(1, dtype=torch.long, device=self.comm_device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n], device=self.comm_device))
        return [int(s.item()) for s in sizes]

    def gather_cat(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's 1-d `tensor` (of `sizes[rank]` elements) concatenated in rank order, on every rank."""
        padded = torch.zeros(max(sizes), dtype=tensor.dtype, device=self.comm_device)
        padded[: tensor.numel()] = tensor.detach().flatten().to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """A step's metrics over all ranks: each rank's are already weighted by its share of the
        global targets, so they sum; times (`time/...`) take the slowest rank's."""
        if self.world == 1:
            return metrics
        every = [None] * self.world
        dist.all_gather_object(every, metrics)
        out: dict[str, float] = {}
        for rank_metrics in every:
            for k, v in rank_metrics.items():
                out[k] = max(out.get(k, v), v) if k.startswith("time/") else out.get(k, 0.0) + v
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
            dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.strategy != "single" and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- FSDP2's limits


def check_shardable(optimizer, hooks: dict, extra_groups: list, algo_name: str) -> None:
    """Under FSDP2 each rank holds a shard (rows) of every weight. Methods that need whole weight
    matrices or parameters outside the sharded model stop the run with one line."""
    if extra_groups:
        raise RlxError(f"{algo_name} trains parameters beside the policy (a critic); trainer.strategy=fsdp2 shards "
                       "the policy only: use trainer.strategy=ddp")
    if not type(optimizer).__module__.startswith("torch.optim"):
        raise RlxError(f"optimizer {type(optimizer).__name__} works on whole weight matrices (projections, "
                       "SVDs), and under trainer.strategy=fsdp2 each rank holds a shard of each: use "
                       "trainer.strategy=ddp, or a torch.optim optimizer")
    from rlx.hooks import Hook

    for name, hook in hooks.items():
        if type(hook) is not Hook:
            raise RlxError(f"{name} ({type(hook).__name__}) transforms whole weights or gradients, and under "
                           "trainer.strategy=fsdp2 each rank holds a shard of each: use trainer.strategy=ddp")


# ---------------------------------------------------------------------------- FSDP2 checkpoints


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's weights gathered to rank 0, on the CPU (collective: every rank calls it;
    the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_optimizer(model: torch.nn.Module, optimizer, path) -> None:
    """Every rank writes its shard of the optimizer state into `path` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer, weights: dict, optimizer_path) -> None:
    """Full `weights` into this rank's parameter shards, and its optimizer shard from `optimizer_path`
    (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(optimizer_path))
    set_optimizer_state_dict(model, optimizer, state)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (a transformers causal LM's `model.layers`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RlxError(f"trainer.strategy=fsdp2 shards a model's decoder layers; {type(base).__name__} has no "
                       "model.layers")
    return list(layers)


SINGLE = Parallel()
