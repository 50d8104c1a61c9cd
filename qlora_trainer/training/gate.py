"""Before any weight is loaded: the planner fills the choices left open (`training.plan: auto`), offloaded
checkpoints are held to the host memory they may pin, and a run predicted not to fit its budget is refused, unless
forced. The same prediction and fits rule as `plan-memory`."""

import os
from typing import Mapping, Optional

import psutil
from transformers import PretrainedConfig

from qlora_trainer.errors import UserError
from qlora_trainer.planner.distributed import Parallelism, estimate_rank_memory, rank_estimator
from qlora_trainer.planner.memory import CALIBRATION, MemoryEstimate, estimate_memory, offloaded_input_bytes
from qlora_trainer.planner.search import search_plan
from qlora_trainer.planner.shapes import ModelShape, model_shape
from qlora_trainer.spec import ResolvedRun

GIB = 2**30
# Offloaded checkpoints may pin at most this share of the host memory available when training starts: the rest is
# the process's own (the dataset, the loader, Python) and the other programs'.
HOST_SHARE = 0.5


def launch_strategy(run: ResolvedRun, shape: ModelShape, world_size: int) -> Optional[Parallelism]:
    """How `world_size` processes share the run (None for one plain process): training.distributed as set, and for
    auto DDP where one GPU holds the whole run, FSDP where it does not (on the CPU, with no budget to judge by: DDP).
    One process asking for fsdp gets it (a process group of one, for FSDP's CPU offload)."""
    training = run.spec.training
    if world_size == 1 and training.distributed != "fsdp":
        return None
    strategy = training.distributed
    if strategy == "auto":
        fits_one = run.budget is None or run.budget.fits(estimate_memory(shape, run).predicted_peak_bytes)
        strategy = "ddp" if fits_one else "fsdp"
    if strategy == "fsdp" and run.loss_scaling:
        # each process holds a shard of the gradients, so each would decide alone whether an overflowing fp16 step
        # is skipped, and the processes would part ways without a word
        raise UserError("training.distributed: fsdp with float16 compute (loss scaling) is not supported yet: use "
                        "ddp, or bfloat16 on GPUs that have it")
    cpu_offload = strategy == "fsdp" and training.fsdp_cpu_offload
    if cpu_offload and run.device_type != "cuda":
        raise UserError("training.fsdp_cpu_offload: needs a GPU (FSDP offloads to pinned host memory for copies to "
                        "the GPU); set it to false on the CPU")
    return Parallelism(strategy, world_size, cpu_offload)


def training_estimate(run: ResolvedRun, shape: ModelShape, world_size: int = 1) -> MemoryEstimate:
    """What each GPU holds at its highest once training runs (after loading, which FSDP's `fit_to_budget` also
    judges): the one-GPU estimate, or each rank's under the strategy `world_size` processes share the run by.
    What metrics.jsonl's peaks measure, so the benchmarks compare with it."""
    parallelism = launch_strategy(run, shape, world_size)
    if parallelism is None:
        return estimate_memory(shape, run)
    return estimate_rank_memory(shape, run, parallelism).gpu


def processes_on_this_host(world_size: int, environ: Mapping[str, str] = os.environ) -> int:
    """How many of the run's processes share this machine's memory: LOCAL_WORLD_SIZE, as torchrun and accelerate
    launch set it; all of them where it is not set."""
    return int(environ.get("LOCAL_WORLD_SIZE", world_size))


def fsdp_within_host_memory(run: ResolvedRun, shape: ModelShape, parallelism: Parallelism, world_size: int) -> None:
    """A UserError where this machine's processes of an FSDP run would need more host memory than is available:
    each parks its whole 4-bit model there while loading (engine/layer_load.py), and under CPU offload keeps its
    shards, gradients and optimizer states there (planner/distributed.py)."""
    rank = estimate_rank_memory(shape, run, parallelism)
    here = processes_on_this_host(world_size)
    needed = rank.host_ram_bytes * here // parallelism.gpus
    available = psutil.virtual_memory().available
    if needed > available:
        raise UserError(f"training.distributed: fsdp needs {needed / GIB:.1f} GiB of host memory for this machine's "
                        f"{here} process{'es' if here > 1 else ''} (each parks its 4-bit model while loading"
                        f"{', then holds its offloaded shards' if parallelism.cpu_offload else ''}), more than the "
                        f"{available / GIB:.1f} GiB available; run fewer processes per machine or free memory")


def offload_within_host_memory(run: ResolvedRun, shape: ModelShape, processes: int = 1) -> ResolvedRun:
    """`run`, its checkpointed inputs offloaded only where the host can pin them (HOST_SHARE of its available
    memory, shared by `processes` ranks on this host). Where it cannot: a UserError when the user
    asked for offloading, else offloading turned off, said in one line (the GPU then keeps the inputs, and the
    budget check that follows judges that)."""
    needed = processes * offloaded_input_bytes(shape, run)
    if not needed:  # nothing offloaded (the CPU, or no checkpointed layer)
        return run
    available = psutil.virtual_memory().available
    if needed <= HOST_SHARE * available:
        return run
    words = (f"the checkpointed layers' inputs need {needed / GIB:.1f} GiB of pinned host memory, more than "
             f"{HOST_SHARE:.0%} of the {available / GIB:.1f} GiB available here")
    if "training.offload_checkpoints" in run.spec.explicit_keys:
        raise UserError(f"training.offload_checkpoints: {words}; set it to false (the GPU keeps them) or lower "
                        f"training.max_seq_len or training.micro_batch_size")
    print(f"training.offload_checkpoints: off, {words}")
    return run.with_values({"training.offload_checkpoints": False})


def fit_to_budget(run: ResolvedRun, model_config: PretrainedConfig, force: bool, world_size: int = 1) -> ResolvedRun:
    """`run`, planned where asked; a UserError when its predicted peak does not fit (unless `force`). With several
    processes the prediction is each GPU's under the strategy they share the run by (planner/distributed.py), and
    the run returned names that strategy in training.distributed."""
    shape = model_shape(model_config)
    parallelism = launch_strategy(run, shape, world_size)
    if parallelism is not None:
        run = run.with_values({"training.distributed": parallelism.strategy})
    if run.budget is None:  # the CPU: no budget to plan for
        return run

    estimator = estimate_memory if parallelism is None else rank_estimator(parallelism)
    if run.spec.training.plan == "auto":
        run = search_plan(shape, run, estimator=estimator).run
    run = offload_within_host_memory(run, shape, processes_on_this_host(world_size))
    if parallelism is not None and parallelism.strategy == "fsdp" and not force:
        fsdp_within_host_memory(run, shape, parallelism, world_size)
    estimate = estimator(shape, run, CALIBRATION)
    peak, pinned = estimate.predicted_peak_bytes, estimate.pinned_host_bytes
    budget = run.budget
    per_gpu = f" per GPU ({parallelism.strategy}, {world_size} processes)" if parallelism else ""
    host = f"; checkpoint inputs in pinned host memory: {pinned / GIB:.2f} GiB" if pinned else ""
    print(f"planner: predicted peak {peak / GIB:.2f} GiB{per_gpu} of {budget.budget_bytes / GIB:.2f} GiB on "
          f"{budget.device_name}{host}")
    if not budget.fits(peak) and not force:
        advice = search_plan(shape, run, estimator=estimator).advice
        raise UserError(f"training: predicted peak {peak / GIB:.2f} GiB{per_gpu} does not fit {budget.device_name} "
                        f"({budget.budget_bytes / GIB:.2f} GiB); planner: {advice}; --force trains anyway")
    return run


def fallback_warning(run: ResolvedRun, model_config: PretrainedConfig) -> str:
    """After compiled layers fell back to eager (recipe.py, one process): where the planner predicts the eager run not
    to fit its budget, the words that say so; else nothing. The prediction is training's (the model is loaded), under
    FSDP that of the process group of one."""
    if run.budget is None:
        return ""
    peak = training_estimate(run, model_shape(model_config)).predicted_peak_bytes
    if run.budget.fits(peak):
        return ""
    return (f"; eager layers are predicted at {peak / GIB:.2f} GiB, more than the {run.budget.usable_bytes / GIB:.2f} "
            f"GiB usable, so a later step may run out of memory (training.oom_retry: halve-micro-batch would go on)")
