"""Choose a plan that fits a memory budget, keeping every choice the user fixed.

Objective, in order (lexicographic; the first plan that fits wins):
  1. adapt all linear layers, then the MLP only, then attention only: the QLoRA paper (Dettmers et al. 2023,
     sec. 4) found adapters on every linear layer necessary to match 16-bit finetuning;
  2. the highest rank (64, 32, 16, 8), lora_alpha = 2 x rank unless fixed;
  3. 32-bit AdamW, then paged 8-bit AdamW (QLoRA's optimizer; its paged states can move to CPU RAM);
  4. gradient checkpointing off (a third less compute), then on;
  5. the largest micro-batch that divides the effective batch, with gradient accumulation making up the rest;
  6. with checkpointing on, as few checkpointed layers as the memory left over allows: each layer that keeps its
     activations is not recomputed in backward, so the budget the micro-batch leaves buys speed;
  7. only when no micro-batch fits with every layer checkpointed: checkpointed inputs offloaded to CPU memory
     (it needs host RAM, but it keeps the adapter's targets and rank);
  8. only when that does not fit either and the sequence is longer than MLP_CHUNK_TOKENS: MLPs that many tokens
     at a time (chunked_mlp.py: one more MLP forward per layer in backward).
A plan fits when PyTorch's predicted reserved peak stays within the budget less the safety margin and the
CUDA context (`usable`). When nothing fits, the result carries the leanest plan, the smallest budget it fits
and the longest sequence it fits at this budget.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from transformers import PretrainedConfig

from qlora_trainer.planner.memory import (CALIBRATION, Calibration, MemoryEstimate, ModelShape, TrainingPlan,
                                          estimate_memory, model_shape)

GIB = 2**30
TARGET_ORDER = ("all-linear", "mlp", "attn")
RANKS = (64, 32, 16, 8)
OPTIMIZER_ORDER = ("adamw", "paged_adamw8bit")
SEQ_LEN_STEP = 64  # granularity of the longest-sequence advice
# measured on an H100 (benchmarks/results/vs-reference-h100.md): 4,096-token chunks kept Qwen2.5-7B at seq 8192
# faster than 2,048-token ones (10,641 against 10,169 tokens/s) and still under Unsloth's memory
MLP_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class FixedChoices:
    """What the user fixed; None = the planner chooses."""

    rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    target_modules: Union[str, tuple[str, ...], None] = None
    gradient_checkpointing: Optional[bool] = None
    micro_batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    checkpointed_layers: Optional[int] = None
    offload_checkpoints: Optional[bool] = None
    mlp_chunk_tokens: Optional[int] = None


@dataclass(frozen=True)
class PlanResult:
    fits: bool
    plan: TrainingPlan  # the best plan that fits; when none does, the leanest one
    estimate: MemoryEstimate  # of `plan`
    budget_bytes: int
    usable_bytes: int  # what PyTorch's pool may reserve: the budget less the safety margin and the CUDA context
    smallest_fitting_budget_bytes: int  # the smallest budget `plan` fits
    longest_fitting_seq_len: Optional[int]  # when nothing fits: the longest sequence the leanest plan fits
    advice: str  # one or two sentences for people


def usable(budget_bytes: int, calibration: Calibration = CALIBRATION) -> int:
    """Bytes PyTorch may reserve under `budget_bytes` (a card's memory, or a cap)."""
    return int(budget_bytes * (1 - calibration.safety_margin_fraction)) - calibration.cuda_context_bytes


def fits(estimate: MemoryEstimate, budget_bytes: int, calibration: Calibration = CALIBRATION) -> bool:
    return estimate.predicted_peak_bytes <= usable(budget_bytes, calibration)


def budget_needed(estimate: MemoryEstimate, calibration: Calibration = CALIBRATION) -> int:
    """The smallest budget `estimate` fits."""
    need = estimate.predicted_peak_bytes + calibration.cuda_context_bytes
    return math.ceil(need / (1 - calibration.safety_margin_fraction))


def _batch_splits(effective_batch: int, fixed_micro: Optional[int]) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs, largest micro-batch first, that keep the effective batch."""
    if fixed_micro is not None:
        return [(fixed_micro, max(1, math.ceil(effective_batch / fixed_micro)))]
    return [(micro, effective_batch // micro) for micro in range(effective_batch, 0, -1)
            if effective_batch % micro == 0]


def _ranks(shape: ModelShape, base: TrainingPlan, targets: Union[str, tuple[str, ...]]) -> list[int]:
    """RANKS, less those a LoRA cannot have: above the smaller dimension of a target (adapters.check_rank)."""
    if base.adapter_type != "lora":
        return list(RANKS)
    limit = min(min(t.d_in, t.d_out) for t in shape.targets(targets))
    return [rank for rank in RANKS if rank <= limit] or [limit]


def candidate_plans(shape: ModelShape, base: TrainingPlan, fixed: FixedChoices, effective_batch: int
                    ) -> list[TrainingPlan]:
    """Every plan the search considers, best first under the objective above."""
    def choices(value, default):
        return [value] if value is not None else list(default)

    # (checkpointing, offloading, MLP chunk) in the objective's order: off, on, on with inputs in CPU memory,
    # that with chunked MLPs; a fixed MLP chunk applies to every mode
    chunk = fixed.mlp_chunk_tokens
    modes = [(False, False, chunk or 0), (True, False, chunk or 0), (True, True, chunk or 0)]
    if chunk is None and base.seq_len > MLP_CHUNK_TOKENS:
        modes.append((True, True, MLP_CHUNK_TOKENS))
    memory_modes = [(checkpointing, offload, mlp_chunk) for checkpointing, offload, mlp_chunk in modes
                    if fixed.gradient_checkpointing in (None, checkpointing)
                    and fixed.offload_checkpoints in (None, offload)]
    plans = []
    for targets in choices(fixed.target_modules, TARGET_ORDER):
        for rank in choices(fixed.rank, _ranks(shape, base, targets)):
            for optimizer in choices(fixed.optimizer, OPTIMIZER_ORDER):
                for checkpointing, offload, mlp_chunk in memory_modes:
                    for micro, accumulation in _batch_splits(effective_batch, fixed.micro_batch_size):
                        plans.append(dataclasses.replace(
                            base, target_modules=targets, rank=rank,
                            lora_alpha=fixed.lora_alpha if fixed.lora_alpha is not None else 2.0 * rank,
                            optimizer=optimizer, gradient_checkpointing=checkpointing, offload_checkpoints=offload,
                            mlp_chunk_tokens=mlp_chunk,
                            micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                            checkpointed_layers=fixed.checkpointed_layers if checkpointing else None,
                        ))
    return plans


def describe_checkpointing(plan: TrainingPlan) -> str:
    if not plan.gradient_checkpointing:
        return "off"
    layers = "on" if plan.checkpointed_layers is None else f"on for the first {plan.checkpointed_layers} layers"
    layers += ", inputs offloaded to CPU memory" if plan.offload_checkpoints else ""
    return layers + (f", MLPs {plan.mlp_chunk_tokens} tokens at a time" if plan.mlp_chunk_tokens else "")


def describe(plan: TrainingPlan) -> str:
    """The searched choices of a plan, in a few words."""
    targets = plan.target_modules if isinstance(plan.target_modules, str) else ",".join(plan.target_modules)
    return (f"targets {targets}, rank {plan.rank} (alpha {plan.lora_alpha:g}), "
            f"checkpointing {describe_checkpointing(plan)}, micro-batch {plan.micro_batch_size} "
            f"x {plan.gradient_accumulation_steps} accumulation, {plan.optimizer}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _longest_seq_len(shape: ModelShape, plan: TrainingPlan, budget_bytes: int, calibration: Calibration
                     ) -> Optional[int]:
    """The longest multiple of SEQ_LEN_STEP below plan.seq_len at which `plan` fits, or None."""
    def fits_at(seq_len: int) -> bool:
        return fits(estimate_memory(shape, dataclasses.replace(plan, seq_len=seq_len), calibration), budget_bytes,
                    calibration)

    low, high = 0, plan.seq_len // SEQ_LEN_STEP  # in steps; fits at `low` (0 = nothing), not known above
    while low < high:
        middle = (low + high + 1) // 2
        if fits_at(middle * SEQ_LEN_STEP):
            low = middle
        else:
            high = middle - 1
    return low * SEQ_LEN_STEP or None


def fewest_checkpointed_layers(shape: ModelShape, plan: TrainingPlan, limit: int, calibration: Calibration
                               ) -> tuple[TrainingPlan, MemoryEstimate]:
    """`plan` (which fits `limit` with every layer checkpointed) with as few checkpointed layers as still fit.

    Memory falls as more layers are checkpointed, so a binary search over the count finds the fewest.
    """
    def estimate_with(count: int) -> MemoryEstimate:
        return estimate_memory(shape, dataclasses.replace(plan, checkpointed_layers=count), calibration)

    low, high = 1, shape.num_layers  # fits with `high` layers checkpointed
    while low < high:
        middle = (low + high) // 2
        if estimate_with(middle).predicted_peak_bytes <= limit:
            high = middle
        else:
            low = middle + 1
    if high == shape.num_layers:
        return plan, estimate_memory(shape, plan, calibration)
    return dataclasses.replace(plan, checkpointed_layers=high), estimate_with(high)


def search_plan(model: Union[ModelShape, PretrainedConfig], budget_bytes: int, base: TrainingPlan,
                fixed: FixedChoices = FixedChoices(), effective_batch: Optional[int] = None,
                calibration: Calibration = CALIBRATION) -> PlanResult:
    """The best plan under the objective above that fits `budget_bytes`.

    `base` gives everything the search does not choose (seq_len, quant, dtypes, adapter type, dropout, ...);
    the effective batch to keep defaults to its micro_batch_size x gradient_accumulation_steps.
    """
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    effective_batch = effective_batch or base.micro_batch_size * base.gradient_accumulation_steps
    limit = usable(budget_bytes, calibration)
    leanest: Optional[tuple[TrainingPlan, MemoryEstimate]] = None
    for plan in candidate_plans(shape, base, fixed, effective_batch):
        estimate = estimate_memory(shape, plan, calibration)
        if estimate.predicted_peak_bytes <= limit:
            if plan.gradient_checkpointing and fixed.checkpointed_layers is None:
                plan, estimate = fewest_checkpointed_layers(shape, plan, limit, calibration)
            advice = (f"{describe(plan)}: predicted {_gib(estimate.predicted_peak_bytes)} of "
                      f"{_gib(limit)} usable")
            return PlanResult(True, plan, estimate, budget_bytes, limit, budget_needed(estimate, calibration), None,
                              advice)
        if leanest is None or estimate.predicted_peak_bytes < leanest[1].predicted_peak_bytes:
            leanest = (plan, estimate)
    plan, estimate = leanest
    smallest = budget_needed(estimate, calibration)
    longest = _longest_seq_len(shape, plan, budget_bytes, calibration)
    advice = (f"nothing fits {_gib(limit)} usable ({_gib(budget_bytes)} less the safety margin and CUDA context); "
              f"the leanest plan ({describe(plan)}) needs {_gib(estimate.predicted_peak_bytes)} at seq_len "
              f"{plan.seq_len}, so a GPU of at least {_gib(smallest)}")
    if longest:
        advice += f"; lower seq_len from {plan.seq_len} to {longest} to fit this one"
    fixed_names = [f.name for f in dataclasses.fields(fixed) if getattr(fixed, f.name) is not None]
    if fixed_names:
        free = search_plan(shape, budget_bytes, base, FixedChoices(), effective_batch, calibration)
        if free.fits:
            advice += f"; or let the planner choose {', '.join(fixed_names)}: {describe(free.plan)} fits"
    return PlanResult(False, plan, estimate, budget_bytes, limit, smallest, longest, advice)
