"""Peak memory of each GPU of a multi-GPU run (DDP or FSDP-QLoRA), its host RAM, and the fewest cards that fit.

A pure function of (model shape, resolved run, parallelism), built on the one-GPU component model of memory.py:
the activations and logits of a rank are those of one GPU running the same per-rank micro-batch; what changes is
where the stored state lives.
  ddp   every rank holds the whole 4-bit base, adapter, gradients and optimizer states (one GPU's estimate), plus
        DDP's gradient buckets.
  fsdp  FSDP2 `fully_shard` on each decoder layer and on the root (embeddings, final norm, lm_head), the packed
        4-bit codes stored in the compute dtype (`bnb_4bit_quant_storage`) so they shard like any tensor: each rank
        holds 1/N of every parameter (base and adapter), of the gradients and of the optimizer states, plus the
        parameters gathered in full for the layer being computed and the one prefetched, and the root's.
  fsdp with CPU offload: the sharded parameters, gradients and optimizer states live in host RAM (FSDP2's
        CPUOffloadPolicy, the optimizer step runs on the CPU); the GPU keeps the gathered parameters, the
        activations and what FSDP does not manage (bitsandbytes' quantization states, buffers).
  fsdp loading (engine/layer_load.py): each rank reads the files a tensor at a time onto its GPU, quantizes
        there, keeps the quantization states on the GPU and parks the rest in host RAM; `fully_shard` then brings
        one unit at a time back to the GPU to cut its shards. A GPU holds the quantization states, the shards cut
        so far (none under offload) and one unit whole; the host holds every rank's whole 4-bit model meanwhile.
All ranks are assumed to share one host; host RAM counts the state the ranks put there (the parked model while
loading; then sharded state under offload, offloaded checkpoint inputs), not the processes' own libraries.
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional

from qlora_trainer.errors import UserError
from qlora_trainer.planner.memory import (CALIBRATION, DTYPE_BYTES, Calibration, MemoryEstimate,
                                          adapter_tensor_shapes, cuda_block_bytes, estimate_memory,
                                          offloaded_input_bytes, optimizer_state_tensors, quantized_weight_tensor_bytes)
from qlora_trainer.planner.search import PlanResult, search_plan
from qlora_trainer.planner.shapes import ModelShape
from qlora_trainer.spec.resolve import ResolvedRun

STRATEGIES = ("ddp", "fsdp")
MAX_GPUS = 8  # the most cards of one host the fewest-cards search tries
# FSDP2 gathers the layer it computes and, by its implicit prefetch, the next one (forward and backward alike)
FSDP_GATHERED_LAYERS = 2
# GPU breakdown keys beyond one GPU's (memory.py), in every per-rank estimate so that all read alike
GATHERED, BUCKETS = "gathered parameters", "gradient buckets"
LOADING = "model load"  # the phase in which each FSDP rank loads the model and cuts its shards
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Parallelism:
    strategy: str  # "ddp" (each GPU holds the whole model) or "fsdp" (parameters and state sharded)
    gpus: int  # ranks, one per GPU, all on one host
    cpu_offload: bool  # fsdp only: sharded parameters, gradients and optimizer states in host RAM


@dataclass(frozen=True)
class RankEstimate:
    parallelism: Parallelism
    gpu: MemoryEstimate  # one rank's GPU while training: breakdown and peaks as for one GPU, with GATHERED, BUCKETS
    host_breakdown: dict[str, int]  # host RAM the training state needs, all ranks of the host together
    # FSDP: a rank's GPU while it loads and cuts its shards (module docstring), a peak before training begins; 0
    # where training holds as much
    load_bytes: int = 0
    load_host_bytes: int = 0  # FSDP: every rank's whole 4-bit model and adapter parked in host RAM while loading

    @property
    def host_ram_bytes(self) -> int:
        """Host RAM at its highest: the training state, or the parked model while loading where that is more."""
        return max(sum(self.host_breakdown.values()), self.load_host_bytes)

    @property
    def peak(self) -> MemoryEstimate:
        """What the rank's GPU must hold at its highest: training's estimate, or loading's where that is higher."""
        if self.load_bytes <= self.gpu.predicted_peak_bytes:
            return self.gpu
        return dataclasses.replace(self.gpu, predicted_peak_bytes=self.load_bytes,
                                   predicted_peak_allocated_bytes=self.load_bytes, phase=LOADING)


@dataclass(frozen=True)
class ShardedTensor:
    """One parameter as FSDP2 shards it: on its first dimension, in N equal chunks of ceil(rows / N) rows (the
    last padded)."""

    rows: int
    row_numel: int
    element_bytes: int
    group: Optional[int]  # its fully_shard unit: a decoder layer's index, or None for the root

    @property
    def full_bytes(self) -> int:
        return self.rows * self.row_numel * self.element_bytes

    def shard_numel(self, ranks: int) -> int:
        return -(-self.rows // ranks) * self.row_numel

    def shard_bytes(self, ranks: int) -> int:
        return self.shard_numel(ranks) * self.element_bytes


def pinned_bytes(nbytes: int) -> int:
    """Host bytes of a pinned tensor: torch's CachingHostAllocator rounds every pinned block up to a power of two
    (ATen/core/CachingHostAllocator.h, `roundSize`; the default round threshold is unlimited)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def fsdp_base_tensors(shape: ModelShape, run: ResolvedRun) -> tuple[list[ShardedTensor], list[int]]:
    """The base's parameters as FSDP shards them, and the bytes of every tensor it leaves whole on each rank: the
    quantization states (attributes of the packed weight, not parameters) and the buffers."""
    quant, double_quant = run.spec.quantization.mode, run.spec.quantization.double_quant
    if quant == "int8":
        raise UserError("fsdp cannot shard bitsandbytes int8 weights (their row scales are not parameters); use "
                        "--quant nf4, or ddp")
    compute = DTYPE_BYTES[run.compute_dtype]
    other = 4 if run.spec.model.upcast_non_quantized else compute
    sharded, whole = [], list(shape.buffer_bytes)
    quantized_names = set()
    for linear in shape.linears:
        quantized_names.add(f"{linear.name}.weight")
        if quant == "none":
            sharded.append(ShardedTensor(linear.d_out, linear.d_in, other, linear.layer_index))
            continue
        codes, *states = quantized_weight_tensor_bytes(linear.d_in, linear.d_out, quant, double_quant)
        # the packed codes stored as a column of compute-dtype elements (bnb_4bit_quant_storage), so each row
        # is one element and the shards are exact
        sharded.append(ShardedTensor(-(-codes // compute), 1, compute, linear.layer_index))
        whole.extend(states)
    for name, param in shape.meta_model.named_parameters():
        if name in quantized_names:
            continue
        rows = param.shape[0] if param.dim() else 1
        index = _LAYER_INDEX.search(name)
        sharded.append(ShardedTensor(rows, param.numel() // rows, other, int(index.group(1)) if index else None))
    return sharded, whole


def fsdp_adapter_tensors(shape: ModelShape, run: ResolvedRun) -> list[ShardedTensor]:
    """The adapter's trainable tensors, each in the fully_shard unit of the layer it adapts."""
    adapter = run.spec.adapter
    element_bytes = DTYPE_BYTES[adapter.dtype]
    return [ShardedTensor(dims[0], math.prod(dims[1:]), element_bytes, target.layer_index)
            for target in shape.targets(adapter.target_modules)
            for dims in adapter_tensor_shapes(adapter.type, adapter.r, target.d_in, target.d_out, adapter.use_dora)]


def _with_breakdown(single: MemoryEstimate, breakdown: dict[str, int], phase: str, paged: int) -> MemoryEstimate:
    peak = sum(breakdown.values())
    return dataclasses.replace(single, breakdown=breakdown, predicted_peak_bytes=peak,
                               predicted_peak_allocated_bytes=peak - breakdown["overhead"], phase=phase,
                               paged_optimizer_bytes=paged)


def _ddp(single: MemoryEstimate, parallelism: Parallelism, inputs: int) -> RankEstimate:
    # DDP allocates its buckets once, when the model is wrapped, and keeps them: together they hold every trainable
    # gradient (bucket_cap_mb, 25 MiB, bounds each bucket, not their sum). gradient_as_bucket_view=True makes the
    # gradients views of the buckets and saves this copy; counting it is the conservative choice. One process
    # (gpus == 1) has no DDP and no buckets.
    buckets = single.breakdown["adapter"] if parallelism.gpus > 1 else 0
    breakdown = dict(single.breakdown)
    breakdown = {**{key: breakdown.pop(key) for key in ("weights", "adapter", "gradients", "optimizer")},
                 GATHERED: 0, BUCKETS: buckets, **breakdown}
    gpu = _with_breakdown(single, breakdown, single.phase, single.paged_optimizer_bytes)
    return RankEstimate(parallelism, gpu, {"offloaded layer inputs": parallelism.gpus * inputs})


def _fsdp(shape: ModelShape, run: ResolvedRun, single: MemoryEstimate, parallelism: Parallelism, inputs: int,
          calibration: Calibration) -> RankEstimate:
    ranks, offload = parallelism.gpus, parallelism.cpu_offload
    base, whole = fsdp_base_tensors(shape, run)
    adapter = fsdp_adapter_tensors(shape, run)
    # at rest: 1/N of every parameter, each shard its own tensor in the caching allocator; the rest whole
    base_shard = sum(cuda_block_bytes(t.shard_bytes(ranks)) for t in base)
    whole_bytes = sum(cuda_block_bytes(b) for b in whole)
    adapter_shard = sum(cuda_block_bytes(t.shard_bytes(ranks)) for t in adapter)
    # the optimizer keeps state per sharded tensor, sized like the shard (memory.py's rules, on the shards)
    states = optimizer_state_tensors(run.spec.training.optimizer, [t.shard_numel(ranks) for t in adapter],
                                     DTYPE_BYTES[run.spec.adapter.dtype], run.fused_optimizer and not offload)
    optimizer_shard = sum(cuda_block_bytes(b) for b in states.pooled)
    step_shard = sum(cuda_block_bytes(b) for b in states.step_temporaries)
    # gathered: the root's parameters stay unsharded from its forward to the end of backward (FSDP2 sets the root's
    # post_forward_mesh_info to None, fully_shard/_fsdp_state.py: _lazy_init), plus FSDP_GATHERED_LAYERS layers
    # in full; in backward one layer's unsharded adapter gradients wait for their reduce-scatter
    group_bytes: dict[Optional[int], int] = {}
    group_gradients: dict[Optional[int], int] = {}
    largest_shard: dict[Optional[int], int] = {}
    for tensor in base + adapter:
        group_bytes[tensor.group] = group_bytes.get(tensor.group, 0) + cuda_block_bytes(tensor.full_bytes)
        largest_shard[tensor.group] = max(largest_shard.get(tensor.group, 0),
                                          cuda_block_bytes(tensor.shard_bytes(ranks)))
    for tensor in adapter:
        group_gradients[tensor.group] = group_gradients.get(tensor.group, 0) + cuda_block_bytes(tensor.full_bytes)
    layer_bytes = max(b for group, b in group_bytes.items() if group is not None)
    # under offload FSDP cuts each shard on the GPU before it moves it to the host: one shard more at a time
    unit_load = {group: b + (largest_shard[group] if offload else 0) for group, b in group_bytes.items()}
    load = _fsdp_loading(shape, run, single, unit_load, whole_bytes, 0 if offload else base_shard + adapter_shard)
    # a 4-bit base is parked whole in each rank's host RAM until its shards are cut
    parked = sum(t.full_bytes for t in base + adapter) if load_by_layer(run) else 0
    gathered = group_bytes.get(None, 0) + FSDP_GATHERED_LAYERS * layer_bytes
    reduce_scatter = max(group_gradients.values(), default=0)

    # one GPU's gradients at each phase (a share of all of them while backward runs), sharded the same way
    full_gradients = single.breakdown["adapter"]
    best: Optional[tuple[int, str, dict[str, int]]] = None
    for name, phase in single.phases.items():
        gradients = phase.gradients * adapter_shard // full_gradients if full_gradients else 0
        stepping = name == "optimizer step"
        on_gpu = {
            "weights": whole_bytes + (0 if offload else base_shard),
            "adapter": 0 if offload else adapter_shard,
            "gradients": 0 if offload else gradients,
            "optimizer": 0 if offload else optimizer_shard + (step_shard if stepping else 0),
            GATHERED: 0 if stepping else gathered + (reduce_scatter if name == "layer backward" else 0),
            BUCKETS: 0,
            "activations": phase.activations,
            "logits": phase.logits,
        }
        total = sum(on_gpu.values())
        if best is None or total > best[0]:
            best = (total, name, on_gpu)
    _, phase_name, breakdown = best
    # memory.py's allocator overhead holds the optimizer step's temporaries: a shard's on the GPU, none when the
    # step runs on the CPU
    step_on_gpu = 0 if offload else step_shard
    breakdown["overhead"] = single.breakdown["overhead"] - int(
        calibration.allocator_step_factor * (single.phases["optimizer step"].step_temporaries - step_on_gpu))
    gpu = _with_breakdown(single, breakdown, phase_name, 0 if offload else sum(states.paged))
    host = {"offloaded layer inputs": ranks * inputs}
    if offload:
        # FSDP2 pins the sharded parameters and copies the sharded gradients to pinned memory (_fsdp_param.py,
        # _fsdp_collectives.py); the optimizer creates its states, and the step its temporaries, in pageable memory
        host = {
            "parameter shards": ranks * sum(pinned_bytes(t.shard_bytes(ranks)) for t in base + adapter),
            "gradient shards": ranks * sum(pinned_bytes(t.shard_bytes(ranks)) for t in adapter),
            "optimizer states": ranks * (sum(states.pooled) + sum(states.paged) + sum(states.step_temporaries)),
            **host,
        }
    return RankEstimate(parallelism, gpu, host, load, parked * ranks)


def load_by_layer(run: ResolvedRun) -> bool:
    """Whether FSDP loads `run`'s base a tensor at a time (engine/layer_load.py: 4-bit bases)."""
    return run.spec.quantization.mode in ("nf4", "fp4")


def _fsdp_loading(shape: ModelShape, run: ResolvedRun, single: MemoryEstimate, unit_bytes: dict[Optional[int], int],
                  whole_bytes: int, shards_bytes: int) -> int:
    """A rank's GPU at its highest while loading. A 4-bit base loads a tensor at a time (module docstring): the
    states left whole, the shards cut so far (at most all of them), and one unit whole being cut (`unit_bytes`,
    with the shard on its way to the host under offload), or one weight read in 16 bits beside its packed codes.
    Any other base loads whole on each GPU before it is sharded."""
    quant = run.spec.quantization
    if not load_by_layer(run):
        return single.breakdown["weights"] + single.breakdown["adapter"]
    read = max(cuda_block_bytes(linear.d_in * linear.d_out * DTYPE_BYTES[run.compute_dtype])
               + cuda_block_bytes(quantized_weight_tensor_bytes(linear.d_in, linear.d_out, quant.mode,
                                                                 quant.double_quant)[0])
               for linear in shape.linears)
    return whole_bytes + shards_bytes + max(max(unit_bytes.values()), read)


def estimate_rank_memory(shape: ModelShape, run: ResolvedRun, parallelism: Parallelism,
                         calibration: Calibration = CALIBRATION) -> RankEstimate:
    """Each rank's predicted GPU peak (all ranks alike) and the host RAM of `run` under `parallelism`."""
    single = estimate_memory(shape, run, calibration)
    inputs = offloaded_input_bytes(shape, run)
    if parallelism.strategy == "ddp":
        return _ddp(single, parallelism, inputs)
    return _fsdp(shape, run, single, parallelism, inputs, calibration)


@dataclass(frozen=True)
class DistributedPlan:
    parallelism: Parallelism
    result: PlanResult  # the per-rank search: its estimate is one rank's GPU, its budget one card's
    rank: RankEstimate  # of result.run
    batch_per_rank: int  # sequences each rank takes of the effective batch per optimizer step


def rank_estimator(parallelism: Parallelism):
    """search.py's estimator for each rank under `parallelism`: its GPU at its highest, loading included."""
    def estimate(shape: ModelShape, run: ResolvedRun, calibration: Calibration) -> MemoryEstimate:
        return estimate_rank_memory(shape, run, parallelism, calibration).peak
    return estimate


def plan_for(shape: ModelShape, run: ResolvedRun, parallelism: Parallelism, effective_batch: int,
             calibration: Calibration = CALIBRATION) -> DistributedPlan:
    """search.py's search with each rank's estimate against one card's budget (the same `Budget.fits` rule). The
    effective batch is split over the ranks: each takes ceil(batch / gpus) sequences per optimizer step."""
    batch_per_rank = -(-effective_batch // parallelism.gpus)
    result = search_plan(shape, run, batch_per_rank, calibration, rank_estimator(parallelism))
    chosen = result.run.with_values({"training.distributed": parallelism.strategy,
                                     "training.fsdp_cpu_offload": parallelism.cpu_offload})
    result = dataclasses.replace(result, run=chosen)
    return DistributedPlan(parallelism, result, estimate_rank_memory(shape, chosen, parallelism, calibration),
                           batch_per_rank)


def strategies_to_try(run: ResolvedRun, gpus: int, strategy: Optional[str], cpu_offload: bool) -> list[Parallelism]:
    """The parallelisms to search, in order: the one asked for, or ddp (the fastest: no gathering) when it fits,
    then fsdp, then fsdp with its state in host RAM. One GPU is one plain process, else FSDP's CPU offload in a
    group of one (sharding over one rank alone saves nothing)."""
    if strategy is not None:
        return [Parallelism(strategy, gpus, cpu_offload)]
    order = [Parallelism("ddp", gpus, False)]
    # int8 weights cannot be sharded; fp16's loss scaling is refused under fsdp (training/gate.py)
    if run.spec.quantization.mode != "int8" and not run.loss_scaling:
        order += [Parallelism("fsdp", gpus, True)] if gpus == 1 else [Parallelism("fsdp", gpus, False),
                                                                        Parallelism("fsdp", gpus, True)]
    return order


def search_distributed_plan(shape: ModelShape, run: ResolvedRun, gpus: int, strategy: Optional[str],
                            cpu_offload: bool, effective_batch: int, calibration: Calibration = CALIBRATION
                            ) -> DistributedPlan:
    """The first of `strategies_to_try` whose per-rank search fits; when none does, the last one tried."""
    plan = None
    for parallelism in strategies_to_try(run, gpus, strategy, cpu_offload):
        plan = plan_for(shape, run, parallelism, effective_batch, calibration)
        if plan.result.fits:
            break
    return plan


def fewest_gpus(shape: ModelShape, run: ResolvedRun, strategy: Optional[str], cpu_offload: bool,
                effective_batch: int, calibration: Calibration = CALIBRATION) -> DistributedPlan:
    """The plan on the fewest cards of the run's kind, 1 to MAX_GPUS, that fits (fsdp without CPU offload from 2:
    on one card it saves nothing); when none does, the last plan tried."""
    first = 2 if strategy == "fsdp" and not cpu_offload else 1
    plan = None
    for gpus in range(first, MAX_GPUS + 1):
        plan = search_distributed_plan(shape, run, gpus, strategy, cpu_offload, effective_batch, calibration)
        # more ranks never shrink what each DDP rank holds: past 2 cards, ddp alone cannot start fitting
        if plan.result.fits or (strategy == "ddp" and gpus > 1):
            break
    return plan
