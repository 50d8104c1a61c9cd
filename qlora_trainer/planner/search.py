"""Choose a run that fits its memory budget, keeping every choice the user made.

The search changes only the keys of SEARCHED_KEYS that are not in `run.spec.explicit_keys` (what the user wrote in
the config, with --set, or as a plan-memory flag); everything else comes from the spec as it is.
Objective, in order (the first of 1-3 for which a run fits wins, then 4-6 choose among its runs):
  1. adapt all linear layers, then the MLP only, then attention only: the QLoRA paper (Dettmers et al. 2023,
     sec. 4) found adapters on every linear layer necessary to match 16-bit finetuning;
  2. the highest rank (64, 32, 16, 8), adapter.lora_alpha = 2 x rank unless fixed;
  3. 32-bit AdamW, then paged 8-bit AdamW (QLoRA's optimizer; its paged states can move to CPU RAM);
  4. the micro-batch and checkpointing that recompute the fewest layers in backward (checkpointing off: none; on:
     as few checkpointed layers as the memory left over allows, each layer that keeps its activations is not
     recomputed), among micro-batches whose tokens x a layer's weights reach MIN_MICRO_BATCH_LAYER_WORK (4,096
     tokens of a Llama-2-7B layer); then the largest such micro-batch, with gradient accumulation making up the
     effective batch. Smaller micro-batches leave finer steps of memory to spend on layers that keep their
     activations (at 2,048 tokens a Llama-3-8B layer keeps about 0.4 GiB per sequence: on an L4, one layer of 32
     keeps them at micro-batch 8, eleven at micro-batch 2), and above that much work a step is bound by the GPU,
     not by the host launching it. When no micro-batch that large fits, the largest that fits;
  5. only when no micro-batch fits with every layer checkpointed: checkpointed inputs offloaded to CPU memory
     (it needs host RAM, but it keeps the adapter's targets and rank);
  6. only when that does not fit either and the sequence is longer than MLP_CHUNK_TOKENS: MLPs that many tokens
     at a time (engine/token_chunks.py: one more MLP forward per layer in backward);
  7. only when that does not fit either, the sequence is longer than ATTENTION_CHUNK_TOKENS and the run can take
     it (`attention_chunks_possible`): besides, each checkpointed layer's backward that many queries at a time
     (engine/chunked_attention.py: the keys and values recomputed once more per layer);
  8. only when that does not fit either: besides, each block of keys and values made where the layer backward
     uses it, never the row's (training.recompute_keys: the key projections run about chunks/2 times more, twice).
A run fits when PyTorch's predicted reserved peak fits its budget (`run.budget.fits`: the budget less the safety
margin and the CUDA context, spec/resolve.py). When nothing fits, the result carries the leanest run, the smallest
budget it fits and the longest sequence it fits at this budget.
"""

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from transformers import PretrainedConfig

from qlora_trainer.planner.memory import CALIBRATION, Calibration, MemoryEstimate, estimate_memory
from qlora_trainer.planner.shapes import ModelShape, model_shape
from qlora_trainer.spec.resolve import PACKED_VARLEN, Budget, ResolvedRun, resolve

GIB = 2**30
TARGET_ORDER = ("all-linear", "mlp", "attn")
RANKS = (64, 32, 16, 8)
OPTIMIZER_ORDER = ("adamw", "paged_adamw8bit")
SEQ_LEN_STEP = 64  # granularity of the longest-sequence advice
# measured on an H100 (benchmarks/results/vs-reference-h100.md): 4,096-token chunks kept Qwen2.5-7B at seq 8192
# faster than 2,048-token ones (10,641 against 10,169 tokens/s) and still under Unsloth's memory
MLP_CHUNK_TOKENS = 4096
# the query chunks of a layer backward taken a chunk at a time (objective 7); as many tokens as the MLP's chunks
ATTENTION_CHUNK_TOKENS = 4096
# The matmul work per decoder layer (tokens x weights) of a micro-batch above which a step's time is its GPU work,
# not the host's launching of it: 4,096 tokens of a Llama-2-7B layer (4 x 4096^2 + 3 x 4096 x 11008 weights).
# Measured on an H100 (benchmarks/results/defaults-h100/): micro-batch 1 x 2,048 tokens of Llama-2-7B ran at 9,690
# tokens/s, half of its matmul ceiling (~19,000), so at twice the tokens the GPU's work reaches the host's time;
# the host's time per layer hardly depends on the layer's size, so a smaller model needs more tokens (TinyLlama's
# layers about 4.6 times as many), a larger one fewer, and every slower card (T4, L4, A10G) gets there sooner.
MIN_MICRO_BATCH_TOKENS = 4096
MIN_MICRO_BATCH_LAYER_WORK = MIN_MICRO_BATCH_TOKENS * (4 * 4096 * 4096 + 3 * 4096 * 11008)
# What the search asks of a candidate: its predicted peak on one GPU. estimate_memory for a run on one GPU;
# planner/distributed.py gives one for each rank of a multi-GPU run.
Estimator = Callable[[ModelShape, ResolvedRun, Calibration], MemoryEstimate]
# The choices of objective 1-3 and 5 (offloading); objective 4 chooses among the runs that share them.
GROUP_KEYS = ("adapter.target_modules", "adapter.r", "adapter.lora_alpha", "training.optimizer",
              "training.offload_checkpoints")
# The keys the search may change unless the user set them, each with the word the advice uses for it. The
# accumulation is never a choice of its own: it makes up the effective batch for the micro-batch chosen.
SEARCHED_KEYS = {
    "adapter.r": "rank",
    "adapter.lora_alpha": "lora_alpha",
    "adapter.target_modules": "target_modules",
    "training.gradient_checkpointing": "gradient_checkpointing",
    "training.micro_batch_size": "micro_batch_size",
    "training.optimizer": "optimizer",
    "training.checkpointed_layers": "checkpointed_layers",
    "training.offload_checkpoints": "offload_checkpoints",
    "training.mlp_chunk_tokens": "mlp_chunk_tokens",
    "training.attention_chunk_tokens": "attention_chunk_tokens",
    "training.recompute_keys": "recompute_keys",
}
# the decoder layers engine/chunked_attention.py repeats (its LAYER_CLASSES), by model_type
CHUNKED_LAYER_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class PlanResult:
    fits: bool
    run: ResolvedRun  # the best run that fits; when none does, the leanest one
    estimate: MemoryEstimate  # of `run`
    budget_bytes: int
    usable_bytes: int  # what PyTorch's pool may reserve: the budget less the safety margin and the CUDA context
    smallest_fitting_budget_bytes: int  # the smallest budget `run` fits
    longest_fitting_seq_len: Optional[int]  # when nothing fits: the longest sequence the leanest run fits
    advice: str  # one or two sentences for people
    as_configured: bool = False  # `run` is a run config's own run, not a plan (planner/report.py, training.plan: off)
    longest_seq_len: Optional[int] = None  # plan-memory --seq-len longest: the longest sequence that fits


def changed(run: ResolvedRun, values: dict[str, Any]) -> ResolvedRun:
    """`run.with_values(values)` for a candidate the search only estimates: the sections that change are copied,
    the others are shared with `run` rather than deep-copied (hundreds of candidates per search). The run the search
    returns is built with `with_values` instead, so it shares nothing with its input."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    spec = dataclasses.replace(run.spec, **{section: dataclasses.replace(getattr(run.spec, section), **names)
                                            for section, names in sections.items()})
    return resolve(spec, run.hardware)


def _fixed(run: ResolvedRun, key: str) -> bool:
    return key in run.spec.explicit_keys


def _batch_splits(effective_batch: int, fixed_micro: Optional[int]) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs, largest micro-batch first, that keep the effective batch."""
    if fixed_micro is not None:
        return [(fixed_micro, max(1, math.ceil(effective_batch / fixed_micro)))]
    return [(micro, effective_batch // micro) for micro in range(effective_batch, 0, -1)
            if effective_batch % micro == 0]


def _ranks(shape: ModelShape, run: ResolvedRun, targets: Union[str, list[str]]) -> list[int]:
    """RANKS, less those a LoRA cannot have: above the smaller dimension of a target (adapters.check_rank)."""
    if run.spec.adapter.type != "lora":
        return list(RANKS)
    limit = min(min(t.d_in, t.d_out) for t in shape.targets(targets))
    return [rank for rank in RANKS if rank <= limit] or [limit]


def attention_chunks_possible(shape: ModelShape, run: ResolvedRun) -> bool:
    """Whether the search may take a layer's backward a chunk of queries at a time (objective 7): decoder layers
    engine/chunked_attention.py repeats, no sliding window, an attention kernel it reproduces (its
    check_attention_chunking), and no adapter dropout, without which only attention would go in chunks
    (`ResolvedRun.layer_backward_chunked`: the rest of the layer would stay whole)."""
    return (shape.model_type in CHUNKED_LAYER_MODEL_TYPES and not shape.sliding_layers
            and run.attention in ("sdpa", "eager", PACKED_VARLEN) and run.spec.adapter.lora_dropout == 0)


def candidate_values(shape: ModelShape, run: ResolvedRun, effective_batch: int) -> Iterator[dict[str, Any]]:
    """The changes to `run` the search considers, best first under the objective above (the user's explicit keys
    keep their values)."""
    spec = run.spec

    def choices(key: str, default) -> list:
        return [spec.value(key)] if _fixed(run, key) else list(default)

    def allowed(key: str, value) -> bool:
        return not _fixed(run, key) or spec.value(key) == value

    # (checkpointing, offloading, MLP chunk, attention chunk, keys recomputed) in the objective's order: off, on, on
    # with inputs in CPU memory, that with chunked MLPs, that with chunked layer backwards, that with keys
    # recomputed; a fixed chunk applies to every mode
    chunk = spec.training.mlp_chunk_tokens if _fixed(run, "training.mlp_chunk_tokens") else None
    queries = spec.training.attention_chunk_tokens if _fixed(run, "training.attention_chunk_tokens") else None
    keys = spec.training.recompute_keys if _fixed(run, "training.recompute_keys") else False
    modes = [(False, False, chunk or 0, queries or 0, keys), (True, False, chunk or 0, queries or 0, keys),
             (True, True, chunk or 0, queries or 0, keys)]
    if chunk is None and spec.training.max_seq_len > MLP_CHUNK_TOKENS:
        modes.append((True, True, MLP_CHUNK_TOKENS, queries or 0, keys))
    if queries is None and spec.training.max_seq_len > ATTENTION_CHUNK_TOKENS and attention_chunks_possible(shape, run):
        modes.append((True, True, chunk if chunk is not None else MLP_CHUNK_TOKENS, ATTENTION_CHUNK_TOKENS, keys))
    if modes[-1][3] and not _fixed(run, "training.recompute_keys"):  # the leanest mode chunks the layer backward
        modes.append((*modes[-1][:4], True))
    memory_modes = [mode for mode in modes if allowed("training.gradient_checkpointing", mode[0])
                    and allowed("training.offload_checkpoints", mode[1])]
    fixed_micro = spec.training.micro_batch_size if _fixed(run, "training.micro_batch_size") else None
    fixed_layers = spec.training.checkpointed_layers if _fixed(run, "training.checkpointed_layers") else None
    # the modes that keep everything on the GPU for every micro-batch first; offloading only when none of them fits
    mode_groups = [[mode for mode in memory_modes if not mode[1]], [mode for mode in memory_modes if mode[1]]]
    for targets in choices("adapter.target_modules", TARGET_ORDER):
        for rank in choices("adapter.r", _ranks(shape, run, targets)):
            alpha = spec.adapter.lora_alpha if _fixed(run, "adapter.lora_alpha") else 2.0 * rank
            for optimizer in choices("training.optimizer", OPTIMIZER_ORDER):
                for modes, (micro, accumulation) in itertools.product(
                        mode_groups, _batch_splits(effective_batch, fixed_micro)):
                    for checkpointing, offload, mlp_chunk, attention_chunk, recompute_keys in modes:
                        yield {
                            "adapter.target_modules": targets, "adapter.r": rank, "adapter.lora_alpha": alpha,
                            "training.optimizer": optimizer, "training.gradient_checkpointing": checkpointing,
                            "training.offload_checkpoints": offload, "training.mlp_chunk_tokens": mlp_chunk,
                            "training.attention_chunk_tokens": attention_chunk,
                            "training.recompute_keys": recompute_keys,
                            "training.micro_batch_size": micro, "training.gradient_accumulation_steps": accumulation,
                            "training.checkpointed_layers": fixed_layers if checkpointing else None,
                        }


def candidate_runs(shape: ModelShape, run: ResolvedRun, effective_batch: int) -> list[ResolvedRun]:
    """Every run the search considers, best first (built as `changed` builds them)."""
    return [changed(run, values) for values in candidate_values(shape, run, effective_batch)]


def describe_checkpointing(run: ResolvedRun) -> str:
    training = run.spec.training
    if not training.gradient_checkpointing:
        return "off"
    layers = ("on" if training.checkpointed_layers is None
              else f"on for the first {training.checkpointed_layers} layers")
    layers += ", inputs offloaded to CPU memory" if training.offload_checkpoints else ""
    layers += f", MLPs {training.mlp_chunk_tokens} tokens at a time" if training.mlp_chunk_tokens else ""
    layers += (f", layer backward {training.attention_chunk_tokens} queries at a time"
               if training.attention_chunk_tokens else "")
    return layers + (", keys and values recomputed per block" if run.keys_recomputed else "")


def describe(run: ResolvedRun) -> str:
    """The searched choices of a run, in a few words."""
    adapter, training = run.spec.adapter, run.spec.training
    targets = adapter.target_modules if isinstance(adapter.target_modules, str) else ",".join(adapter.target_modules)
    return (f"targets {targets}, rank {adapter.r} (alpha {adapter.lora_alpha:g}), "
            f"checkpointing {describe_checkpointing(run)}, micro-batch {training.micro_batch_size} "
            f"x {training.gradient_accumulation_steps} accumulation, {training.optimizer}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def longest_seq_len_within(shape: ModelShape, run: ResolvedRun, fits: Callable[[int], bool],
                           calibration: Calibration = CALIBRATION, estimator: Estimator = estimate_memory
                           ) -> Optional[int]:
    """The longest multiple of SEQ_LEN_STEP up to training.max_seq_len at which `run`'s predicted peak `fits` (a
    budget's rule, or a benchmark's), or None."""
    def fits_at(seq_len: int) -> bool:
        return fits(estimator(shape, changed(run, {"training.max_seq_len": seq_len}), calibration).predicted_peak_bytes)

    return longest_multiple(fits_at, SEQ_LEN_STEP, run.spec.training.max_seq_len) or None


def longest_multiple(holds: Callable[[int], bool], step: int, limit: int, known: int = 0) -> int:
    """The longest multiple of `step` up to `limit` at which `holds` (true up to some length, false beyond), or 0;
    `known`: a multiple at which it is already known to hold, so that only longer ones are tried."""
    low, high = known // step, limit // step  # in steps; holds at `low` (0 = nowhere)
    while low < high:
        middle = (low + high + 1) // 2
        if holds(middle * step):
            low = middle
        else:
            high = middle - 1
    return low * step


def fewest_checkpointed_layers(shape: ModelShape, run: ResolvedRun, budget: Budget, calibration: Calibration,
                               estimator: Estimator = estimate_memory) -> tuple[Optional[int], MemoryEstimate]:
    """For `run` (which fits `budget` with every layer checkpointed): the fewest checkpointed layers that still
    fit (None: all of them), and the estimate with that many.

    Memory falls as more layers are checkpointed, so a binary search over the count finds the fewest.
    """
    def estimate_with(count: int) -> MemoryEstimate:
        return estimator(shape, changed(run, {"training.checkpointed_layers": count}), calibration)

    low, high = 1, shape.num_layers  # fits with `high` layers checkpointed
    while low < high:
        middle = (low + high) // 2
        if budget.fits(estimate_with(middle).predicted_peak_bytes):
            high = middle
        else:
            low = middle + 1
    if high == shape.num_layers:
        return None, estimator(shape, run, calibration)
    return high, estimate_with(high)


def _recomputed_layers(values: dict[str, Any], num_layers: int) -> int:
    if not values["training.gradient_checkpointing"]:
        return 0
    layers = values["training.checkpointed_layers"]
    return num_layers if layers is None else layers


def layer_weights(shape: ModelShape) -> int:
    """The weights of one decoder layer's linear layers (the largest layer's, where they differ)."""
    per_layer: dict[int, int] = {}
    for linear in shape.linears:
        if linear.layer_index is not None:
            per_layer[linear.layer_index] = per_layer.get(linear.layer_index, 0) + linear.d_in * linear.d_out
    return max(per_layer.values(), default=0)


def _fastest(fitting: list[tuple[dict[str, Any], MemoryEstimate]], shape: ModelShape,
             seq_len: int) -> tuple[dict[str, Any], MemoryEstimate]:
    """Objective 4 (and 6) among runs that fit, one per micro-batch: of those whose micro-batches hold enough work
    per layer (MIN_MICRO_BATCH_LAYER_WORK), the one without chunked layer backwards, then without recomputed keys,
    then without chunked MLPs, that recomputes the fewest layers, then the largest micro-batch; when none holds that
    much, the largest micro-batch."""
    micro = lambda item: item[0]["training.micro_batch_size"]  # noqa: E731
    weights = layer_weights(shape)
    large = [item for item in fitting if micro(item) * seq_len * weights >= MIN_MICRO_BATCH_LAYER_WORK]
    if not large:
        return max(fitting, key=micro)
    return min(large, key=lambda item: (bool(item[0]["training.attention_chunk_tokens"]),
                                        item[0]["training.recompute_keys"],
                                        bool(item[0]["training.mlp_chunk_tokens"]),
                                        _recomputed_layers(item[0], shape.num_layers), -micro(item)))


def search_plan(model: Union[ModelShape, PretrainedConfig], run: ResolvedRun, effective_batch: Optional[int] = None,
                calibration: Calibration = CALIBRATION, estimator: Estimator = estimate_memory) -> PlanResult:
    """The best run under the objective above that fits `run.budget`, its peak predicted by `estimator` (one GPU's
    by default; planner/distributed.py passes one rank's of a multi-GPU run).

    `run` gives everything the search does not choose (max_seq_len, quantization, dtypes, adapter type, dropout,
    ...) and, through `run.spec.explicit_keys`, which searched keys the user fixed; the effective batch to keep
    defaults to its micro_batch_size x gradient_accumulation_steps. The result's run is `run` with the chosen
    values (`with_values`: a new spec, the same hardware and explicit keys).
    """
    budget = run.budget
    if budget is None:
        raise ValueError("search_plan: the run has no memory budget (resolved for the CPU); resolve it for a GPU")
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    training = run.spec.training
    effective_batch = effective_batch or training.micro_batch_size * training.gradient_accumulation_steps
    limit = budget.usable_bytes
    leanest: Optional[tuple[dict[str, Any], ResolvedRun, MemoryEstimate]] = None
    fitting: list[tuple[dict[str, Any], MemoryEstimate]] = []  # objective 1-3's first group that fits, by micro-batch
    group: Optional[list] = None
    for values in candidate_values(shape, run, effective_batch):
        if (key := [values[name] for name in GROUP_KEYS]) != group:
            if fitting:
                break
            group = key
        micro = values["training.micro_batch_size"]
        if any(other["training.micro_batch_size"] == micro for other, _ in fitting):
            continue  # this micro-batch's first mode that fits is its best
        candidate = changed(run, values)
        estimate = estimator(shape, candidate, calibration)
        if budget.fits(estimate.predicted_peak_bytes):
            if values["training.gradient_checkpointing"] and not _fixed(run, "training.checkpointed_layers"):
                layers, estimate = fewest_checkpointed_layers(shape, candidate, budget, calibration, estimator)
                values = dict(values, **{"training.checkpointed_layers": layers})
            fitting.append((values, estimate))
        elif leanest is None or estimate.predicted_peak_bytes < leanest[2].predicted_peak_bytes:
            leanest = (values, candidate, estimate)
    if fitting:
        values, estimate = _fastest(fitting, shape, training.max_seq_len)
        chosen = run.with_values(copy.deepcopy(values))
        advice = f"{describe(chosen)}: predicted {_gib(estimate.predicted_peak_bytes)} of {_gib(limit)} usable"
        return PlanResult(True, chosen, estimate, budget.budget_bytes, limit,
                          Budget.needed_for(estimate.predicted_peak_bytes), None, advice)
    values, candidate, estimate = leanest
    chosen = run.with_values(copy.deepcopy(values))
    seq_len = chosen.spec.training.max_seq_len
    smallest = Budget.needed_for(estimate.predicted_peak_bytes)
    longest = longest_seq_len_within(shape, candidate, budget.fits, calibration, estimator)
    advice = (f"nothing fits {_gib(limit)} usable ({_gib(budget.budget_bytes)} less the safety margin and CUDA "
              f"context); the leanest plan ({describe(chosen)}) needs {_gib(estimate.predicted_peak_bytes)} at "
              f"seq_len {seq_len}, so a GPU of at least {_gib(smallest)}")
    if longest:
        advice += f"; lower seq_len from {seq_len} to {longest} to fit this one"
    fixed_names = [name for key, name in SEARCHED_KEYS.items() if _fixed(run, key)]
    if fixed_names:
        unfixed = dataclasses.replace(run.spec, explicit_keys=run.spec.explicit_keys.difference(SEARCHED_KEYS))
        free = search_plan(shape, resolve(unfixed, run.hardware), effective_batch, calibration, estimator)
        if free.fits:
            advice += f"; or let the planner choose {', '.join(fixed_names)}: {describe(free.run)} fits"
    return PlanResult(False, chosen, estimate, budget.budget_bytes, limit, smallest, longest, advice)
