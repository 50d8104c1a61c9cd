"""Several training processes on torch.distributed: the process group from the launcher's environment (torchrun,
accelerate launch), the strategy (DDP or FSDP2), the model wrapped for it, and the few collectives a step needs.

One process (no WORLD_SIZE, or 1) gets `SINGLE`, whose collectives do nothing, so a single run computes exactly as
it always did, unless it asks for FSDP (`training.distributed: fsdp`): then it is a process group of one, for
FSDP's CPU offload of parameters, gradients and optimizer states on a single GPU. With W processes each takes its
own micro-batches; the gradients of the adapter are summed across processes (DDP and FSDP average them, and the
step undoes that: engine/step.py).
"""

import os
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Literal, Mapping

import torch
import torch.distributed as dist
from torch import nn

from qlora_trainer.engine.loss import LossModule
from qlora_trainer.errors import ConfigError

Strategy = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its machine
    strategy: Strategy = "single"
    device_type: str = "cpu"  # "cuda": NCCL, tensors of collectives on the GPU; "cpu": gloo

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def largest(self, value: int) -> int:
        """The largest of the processes' `value`s."""
        if self.world_size == 1:
            return value
        largest = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest.item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process (pickled)."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Processes()


def launch_facts(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate launch set them; (0, 1, 0) when not launched."""
    return int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0))


def choose_strategy(setting: str) -> Strategy:
    """How several processes share the work, for `training.distributed` as the gate settled it
    (training/gate.py `launch_strategy`: auto became ddp or fsdp by the planner's prediction)."""
    return "fsdp" if setting == "fsdp" else "ddp"


@contextmanager
def process_group(device_type: str, setting: str, environ: Mapping[str, str] = os.environ) -> Iterator[Processes]:
    """Join the launcher's process group for the block (NCCL on CUDA, gloo on the CPU) and leave it after; a process
    that was not launched with several gets SINGLE, or for `fsdp` a group of its own. Ranks other than 0 print
    nothing to stdout."""
    rank, world_size, local_rank = launch_facts(environ)
    if world_size == 1 and setting != "fsdp":
        yield SINGLE
        return
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPUs; launch "
                              "at most that many processes per machine")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if world_size == 1:  # FSDP alone: no launcher to meet, so no address or port to need
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    processes = Processes(rank, world_size, local_rank, choose_strategy(setting), device_type)
    quiet = open(os.devnull, "w") if not processes.is_main else None
    try:
        with (redirect_stdout(quiet) if quiet else nullcontext()):
            yield processes
    finally:
        if quiet:
            quiet.close()
        dist.destroy_process_group()


def decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the FSDP units)."""
    for module in causal_lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == causal_lm.config.num_hidden_layers:
            return module
    raise ConfigError("training.distributed: fsdp needs a model with one list of decoder layers; use ddp")


# The wrapped modules of several-process runs, held until the process ends (cli.py `entry` leaves without
# destructors). Freeing one frees its gloo process group, whose destructor waits, holding the GIL, for a worker
# thread that needs the GIL to free a finished collective's tensors: a deadlock seen here when train() returned
# (the destructor's blocking is pytorch/pytorch#56297).
_HELD: list[nn.Module] = []


def wrap(loss_module: LossModule, processes: Processes, cpu_offload: bool) -> nn.Module:
    """`loss_module` ready for `processes`: as it is for one process; DDP over the trainable (adapter) parameters,
    the same on every rank from rank 0's; or FSDP2, each decoder layer and the rest sharded across the ranks."""
    if processes.strategy == "single":
        return loss_module
    if processes.strategy == "ddp":
        with torch.no_grad():  # the adapter starts from rank 0's; the frozen base is read from the same files
            for param in loss_module.parameters():
                if param.requires_grad:
                    dist.broadcast(param.data, src=0)
        device_ids = [processes.local_rank] if processes.device_type == "cuda" else None
        _HELD.append(nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids, init_sync=False))
        return _HELD[-1]
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    options = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    for layer in decoder_layers(loss_module.causal_lm):
        fully_shard(layer, **options)
    fully_shard(loss_module, **options)
    if processes.device_type == "cuda":  # the whole loaded tensors the shards replaced: back to the GPU's free memory
        torch.cuda.empty_cache()
    _HELD.append(loss_module)
    return loss_module


def accumulating(wrapped: nn.Module, last: bool):
    """The context of one micro-batch's backward: gradients are synchronised across processes only on the last of a
    step (one all-reduce per step, not per micro-batch)."""
    if last:
        return nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(wrapped)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(wrapped: nn.Module) -> Iterator[None]:
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole on every rank; any other tensor as it is. Collective."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def adapter_state(peft_model: nn.Module, processes: Processes) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the trainable parameters gathered whole on the CPU, named as the model names them (for peft's
    `save_pretrained(state_dict=...)`, which writes them in its standard format); every rank takes part, rank 0 gets
    them, the others None. Otherwise None: the model saves its own adapter. Only the adapter is gathered, never the
    base (get_model_state_dict's full state dict would gather that too)."""
    if processes.strategy != "fsdp":
        return None
    full = {name: full_tensor(param.detach()).cpu() for name, param in peft_model.named_parameters()
            if param.requires_grad}
    return full if processes.is_main else None


def optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, processes: Processes) -> dict | None:
    """Under FSDP, the optimizer's state gathered whole on the CPU (torch.distributed.checkpoint's full optimizer state
    dict: keyed by the names of `wrapped`'s parameters, exp_avg and exp_avg_sq at the parameters' full shapes); every
    rank takes part, rank 0 gets it, the others None. Otherwise None: the optimizer's own state_dict() is whole."""
    if processes.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if processes.is_main else None


def names_in_wrapped(peft_model: nn.Module, wrapped: nn.Module) -> dict[str, str]:
    """Each adapter weight's name in peft's adapter file -> the name of its parameter in `wrapped`. peft's own
    renaming (get_peft_model_state_dict, which save_pretrained writes through) is applied to the trainable parameters
    themselves, and each is found in `wrapped` by identity, so neither side's prefixes are spelled out here."""
    from peft import get_peft_model_state_dict

    in_wrapped = {id(param): name for name, param in wrapped.named_parameters()}
    trainable = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    return {file_name: in_wrapped[id(param)]
            for file_name, param in get_peft_model_state_dict(peft_model, state_dict=trainable).items()}


def load_sharded(wrapped: nn.Module, peft_model: nn.Module, optimizer: torch.optim.Optimizer,
                 adapter_weights: dict[str, torch.Tensor], full_optimizer_state: dict) -> list[str]:
    """Under FSDP, a checkpoint's whole adapter (named as peft's adapter file names it) and whole optimizer state
    (`optimizer_state`'s) into this rank's shards. Every rank passes what it read from the checkpoint's files
    (nothing is broadcast, as with DDP, where every rank loads the same files) and keeps its own shard. Collective.
    Returns the adapter file's names this model has no parameter for."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = names_in_wrapped(peft_model, wrapped)
    unexpected = [name for name in adapter_weights if name not in names]
    if unexpected:
        return unexpected
    options = StateDictOptions(full_state_dict=True, strict=False)  # the adapter only; the base stays as loaded
    set_model_state_dict(wrapped, {names[name]: weight for name, weight in adapter_weights.items()}, options=options)
    set_optimizer_state_dict(wrapped, optimizer, full_optimizer_state, options=options)
    return []
