"""Data-parallel training through torch.distributed: the process group torchrun describes, DDP or FSDP2.

`torchrun --nproc_per_node=N train.py ...` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set; `init_from_env` joins them into one process group (gloo for CPU tensors,
nccl for CUDA ones). Each rank reads its block of every global batch (`TokenBatches.shard`), gradients are
averaged by DDP (or reduce-scattered by FSDP2's `fully_shard`, one unit per block), evaluation statistics are
gathered from every rank, and rank 0 alone writes files. Under the submitit launcher on SLURM, submitit's
`TorchDistributedEnvironment` exports the same variables from SLURM's.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("ease.distributed")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the ranks; one process (world_size 1) makes every call a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    kind: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks, in float64 (token counts and loss sums stay exact enough to compare runs)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=cpu_group())
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop signal reaching one rank stops all together)."""
        if not self.enabled:
            return flag
        return self.all_reduce_sum([float(flag)])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=cpu_group())
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=cpu_group())
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=cpu_group())


SINGLE = DistContext()
_cpu_group: Any = None
_current: DistContext = SINGLE


def current() -> DistContext:
    """This process's context: what `init_from_env` joined, else one process."""
    return _current


def cpu_group() -> Any:
    """The group for CPU-side collectives (counts, objects): gloo, also when the default group is nccl."""
    return _cpu_group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun (or submitit's TorchDistributedEnvironment) sets it; 1 outside them."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def export_submitit_env() -> None:
    """Under the submitit launcher (SLURM) with several tasks, set torchrun's variables from SLURM's."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    TorchDistributedEnvironment().export()


def init_from_env(kind: str = "ddp") -> DistContext:
    """Join the process group described by the environment (once per process); world size 1: SINGLE."""
    global _cpu_group, _current
    export_submitit_env()
    world = env_world_size()
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if torch.cuda.is_available() else dist.group.WORLD
    _current = DistContext(rank, world, local_rank, kind)
    return _current


def configure(kind: str) -> DistContext:
    """This process's context with the run's engine (train.distributed: ddp | fsdp)."""
    global _current
    _current = dataclasses.replace(_current, kind=kind)
    return _current


def shutdown() -> None:
    global _cpu_group, _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group, _current = None, SINGLE


def check_setup(kind: str, batch_size: int, world_size: int, strategy: str) -> None:
    """Settings data parallelism refuses before training starts; each one line naming the key."""
    if kind == "fsdp" and world_size <= 1:
        raise ValueError(
            "train.distributed: fsdp shards the model over several processes; start them with "
            "torchrun --nproc_per_node=N train.py ... (WORLD_SIZE is 1 here)"
        )
    if world_size > 1 and batch_size % world_size:
        raise ValueError(
            f"train.batch_size: the global batch {batch_size} must divide evenly over the {world_size} processes "
            f"(each reads batch_size / world_size sequences)"
        )
    if world_size > 1 and strategy == "ashem":
        raise ValueError("strategy: ashem trains on one process; run it without torchrun")


def wrap(
    module: nn.Module, ctx: DistContext, device: torch.device, blocks: list[nn.Module], find_unused: bool
) -> nn.Module:
    """DDP around `module`, or FSDP2: `fully_shard` on each block, then on `module` for the rest."""
    if not ctx.enabled:
        return module
    if ctx.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def _sharded(ctx: DistContext, root: nn.Module | None) -> bool:
    return ctx.enabled and ctx.kind == "fsdp" and root is not None


def full_state_dict(model: nn.Module, ctx: DistContext, root: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights, on CPU; under FSDP2 gathered through `root`, the fully_shard-ed
    module holding `model` as its `model` child (collective: every rank calls it; rank 0 gets the weights)."""
    if not _sharded(ctx, root):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key.removeprefix("model."): value for key, value in state.items()}


def load_full_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], ctx: DistContext, root: nn.Module | None = None
) -> None:
    if not _sharded(ctx, root):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # With cpu_offload only rank 0 holds the gathered weights: it sends them to the others.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(root, {f"model.{key}": value for key, value in state.items()}, options=options)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """The optimizer's state; under FSDP2 (`model` the fully_shard-ed root) gathered in full to rank 0."""
    if not _sharded(ctx, model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ctx: DistContext
) -> None:
    if not _sharded(ctx, model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)
