"""`plan-memory`: its arguments, the RunSpec they describe (from the flags alone, or a run config with --config, as
`train` reads it, the flags overriding it), and the readable table and JSON object of a plan, on one GPU or (--gpus)
per GPU of a multi-GPU run."""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from qlora_trainer.engine.adapters import SHORTHANDS
from qlora_trainer.engine.base import settle_auto_attention
from qlora_trainer.errors import ConfigError, UserError
from qlora_trainer.hardware import GpuSpec, Hardware, budget_gpu, detect_gpu, lookup_gpu
from qlora_trainer.planner import LONGEST_SEQ_LEN
from qlora_trainer.planner.distributed import MAX_GPUS, DistributedPlan, fewest_gpus, search_distributed_plan
from qlora_trainer.planner.memory import estimate_memory
from qlora_trainer.planner.search import PlanResult, longest_multiple, search_plan
from qlora_trainer.planner.shapes import ModelShape, load_model_config, model_shape
from qlora_trainer.spec.load import load_spec
from qlora_trainer.spec.resolve import Budget, ResolvedRun, resolve
from qlora_trainer.spec.sections import RunSpec

GIB = 2**30
# The one mapping of plan-memory's flags (argparse names) to spec keys. A flag with a value sets its key and makes
# it explicit, so the search keeps it; the searched keys whose flags are left out are the planner's to choose (or
# the run config's, with --config). --batch-size is the effective batch the search keeps: micro-batch 1 (or
# --micro-batch-size) x accumulation (see spec_from_args).
FLAG_KEYS = {
    "seq_len": "training.max_seq_len",
    "micro_batch_size": "training.micro_batch_size",
    "rank": "adapter.r",
    "alpha": "adapter.lora_alpha",
    "targets": "adapter.target_modules",
    "grad_ckpt": "training.gradient_checkpointing",
    "optimizer": "training.optimizer",
    "quant": "quantization.mode",
    "adapter": "adapter.type",
    "adapter_dtype": "adapter.dtype",
}
# Without --config, the values of the flags left out that are not the planner's to choose (set, so explicit)
WITHOUT_CONFIG = {"seq_len": 2048, "quant": "nf4", "adapter": "lora", "adapter_dtype": "float32"}
DEFAULT_BATCH = 16  # --batch-size without --config
LONGEST_STEP = 1024  # --seq-len longest answers in multiples of this many tokens


def _gpu(args: argparse.Namespace) -> GpuSpec:
    if args.gpu is not None:
        return lookup_gpu(args.gpu)
    if args.vram is not None:
        return budget_gpu(args.vram)
    detected = detect_gpu()
    if detected is None:
        raise UserError("--gpu/--vram: no GPU here; name one (--gpu T4) or give its memory (--vram 15.5)")
    return detected


def _targets(text: str) -> Union[str, list[str]]:
    if text in SHORTHANDS:
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--targets {text!r}: use attn, mlp, all-linear or module names such as q_proj,v_proj")
    return names


def _flag_value(dest: str, value: Any) -> Any:
    """A flag's value in its spec key's type; None for a flag left out (--grad-ckpt auto included)."""
    if value is None:
        return None
    if dest == "targets":
        return _targets(value)
    if dest == "grad_ckpt":
        return {"on": True, "off": False}.get(value)
    return value


def _base_spec(args: argparse.Namespace) -> RunSpec:
    """The run config --config names (read and checked as `train` reads it), or RunSpec's defaults."""
    if args.config is None:
        if args.model is None:
            raise UserError("plan-memory: name the model (--model FOLDER or preset) or a run config (--config FILE)")
        return RunSpec()
    return load_spec(Path(args.config))


def effective_batch(args: argparse.Namespace, base: RunSpec) -> int:
    """Sequences per optimizer step the plan keeps: --batch-size, else the config's, else DEFAULT_BATCH."""
    if args.batch_size is not None:
        return args.batch_size
    training = base.training
    return training.micro_batch_size * training.gradient_accumulation_steps if args.config else DEFAULT_BATCH


def spec_from_args(args: argparse.Namespace, base: Optional[RunSpec] = None) -> RunSpec:
    """The run the command line describes: the run config's keys (--config) or RunSpec's defaults, then the flags'
    values (explicit), model.path = --model where given."""
    base = base or _base_spec(args)
    flags = {dest: getattr(args, dest) for dest in FLAG_KEYS}
    if args.config is None:
        flags = {dest: WITHOUT_CONFIG.get(dest) if value is None else value for dest, value in flags.items()}
    given = {key: value for dest, key in FLAG_KEYS.items() if (value := _flag_value(dest, flags[dest])) is not None}
    micro = given.get("training.micro_batch_size", base.training.micro_batch_size if args.config else 1)
    values = {"training.micro_batch_size": micro,
              "training.gradient_accumulation_steps": max(1, math.ceil(effective_batch(args, base) / micro)),
              **given, **({"model.path": args.model} if args.model is not None else {})}
    return dataclasses.replace(base.with_values(values), explicit_keys=base.explicit_keys | frozenset(given))


@dataclass(frozen=True)
class PlannedRun:
    """What plan-memory plans: the card, the model (its shape and its name for people), the run as resolved for the
    card, and the effective batch the search keeps."""

    gpu: GpuSpec
    model: str
    shape: ModelShape
    run: ResolvedRun
    effective_batch: int
    max_positions: Optional[int]  # the model's max_position_embeddings, where its config gives one


def _planned_run(args: argparse.Namespace) -> PlannedRun:
    """The card, the model and the run the command line describes, resolved for that card."""
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--micro-batch-size", args.micro_batch_size), ("--rank", args.rank)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value}: not allowed; it must be a positive integer")
    if args.alpha is not None and not args.alpha > 0:
        raise UserError(f"--alpha {args.alpha:g}: not allowed; it must be > 0")
    base = _base_spec(args)
    gpu = _gpu(args)
    spec = spec_from_args(args, base)
    try:
        model_config = load_model_config(spec.model.path)
    except UserError as err:  # worded for --model; name the config's key when the path is the config's
        raise err if args.model is not None else UserError(str(err).replace("--model", "model.path", 1)) from None
    run = resolve(settle_auto_attention(spec, model_config), Hardware.planned(gpu))
    return PlannedRun(gpu, args.model or spec.model.path, model_shape(model_config), run, effective_batch(args, base),
                      getattr(model_config, "max_position_embeddings", None))


def _targets_error(err: ConfigError) -> UserError:
    """Target names that match no layer, worded for the command line."""
    return UserError(str(err).replace("adapter.target_modules", "--targets", 1))


def plan_result(args: argparse.Namespace) -> tuple[PlanResult, PlannedRun]:
    """Run the search the command line asks for; for a run config without training.plan: auto, the run as written.
    With --seq-len longest: that at the longest sequence that fits (longest_result)."""
    if args.seq_len == LONGEST_SEQ_LEN:
        return longest_result(args)
    planned = _planned_run(args)
    try:
        searched = search_plan(planned.shape, planned.run, planned.effective_batch)
    except ConfigError as err:
        raise _targets_error(err) from None
    if args.config is None or planned.run.spec.training.plan == "auto":
        return searched, planned
    return _as_configured(planned, searched), planned


def longest_result(args: argparse.Namespace) -> tuple[PlanResult, PlannedRun]:
    """--seq-len longest: the plan at the longest multiple of LONGEST_STEP tokens, up to the model's
    max_position_embeddings, at which plan-memory finds a run that fits (the search is monotone in the length: what
    fits a sequence fits a shorter one); the plan at LONGEST_STEP tokens where nothing fits."""
    results: dict[int, tuple[PlanResult, PlannedRun]] = {}

    def fits_at(seq_len: int) -> bool:
        if seq_len not in results:
            results[seq_len] = plan_result(argparse.Namespace(**{**vars(args), "seq_len": seq_len}))
        return results[seq_len][0].fits

    if not fits_at(LONGEST_STEP):
        return results[LONGEST_STEP]
    limit = (results[LONGEST_STEP][1].max_positions or 0) // LONGEST_STEP * LONGEST_STEP
    if limit <= LONGEST_STEP:
        raise UserError("--seq-len longest: the model's config gives no max_position_embeddings above "
                        f"{LONGEST_STEP}; give --seq-len N")
    good = longest_multiple(fits_at, LONGEST_STEP, limit)
    result, planned = results[good]
    reached = " (the model's max_position_embeddings)" if good == limit else ""
    note = (f"longest sequence that fits: {good:,} tokens{reached}, in steps of {LONGEST_STEP:,}, the planner's "
            f"estimate; at it, {result.advice}")
    return dataclasses.replace(result, advice=note, longest_seq_len=good), planned


def _as_configured(planned: PlannedRun, searched: PlanResult) -> PlanResult:
    """A run config without training.plan: auto, as `train` runs it: as written, nothing planned (training/gate.py),
    so its own estimate, then what training.plan: auto would run instead (`train`'s advice where it does not fit)."""
    run = planned.run
    estimate = estimate_memory(planned.shape, run)
    peak = estimate.predicted_peak_bytes
    fits = run.budget.fits(peak)
    advice = (f"as configured (training.plan: off): predicted {peak / GIB:.2f} GiB of "
              f"{searched.usable_bytes / GIB:.2f} GiB usable; with training.plan: auto: {searched.advice}")
    return dataclasses.replace(searched, fits=fits, run=run, estimate=estimate, longest_fitting_seq_len=None,
                               smallest_fitting_budget_bytes=Budget.needed_for(peak), advice=advice,
                               as_configured=True)


def _gpu_count(text: str) -> Optional[int]:
    """--gpus as a number of cards; None for auto."""
    if text.strip().lower() == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--gpus {text}: not allowed; give a number of GPUs, 1 or more, or auto")
    return count


def distributed_plan(args: argparse.Namespace) -> tuple[DistributedPlan, PlannedRun]:
    """Run the per-GPU search --gpus asks for: on N cards, or on the fewest that fit (--gpus auto)."""
    gpus = _gpu_count(args.gpus)
    if args.cpu_offload and args.strategy != "fsdp":
        raise UserError("--cpu-offload: only with --strategy fsdp (ddp keeps the whole model on every GPU)")
    planned = _planned_run(args)
    shape, run, batch = planned.shape, planned.run, planned.effective_batch
    if args.strategy == "fsdp" and run.loss_scaling:
        raise UserError(f"--strategy fsdp: not with float16 compute, which a {planned.gpu.name} needs (fsdp's loss "
                        "scaling is not supported yet); use --strategy ddp or a GPU with bfloat16")
    try:
        if gpus is None:
            plan = fewest_gpus(shape, run, args.strategy, args.cpu_offload, batch)
        else:
            plan = search_distributed_plan(shape, run, gpus, args.strategy, args.cpu_offload, batch)
    except ConfigError as err:
        raise _targets_error(err) from None
    if args.strategy == "ddp" and not plan.result.fits:
        raise UserError(f"--strategy ddp: every GPU holds the whole model, and {planned.model}'s leanest plan needs "
                        f"{plan.result.estimate.predicted_peak_bytes / GIB:.2f} GiB per GPU, more than the "
                        f"{plan.result.usable_bytes / GIB:.2f} GiB usable of a {planned.gpu.name}; use --strategy "
                        "fsdp (or leave --strategy out)")
    return plan, planned


def result_json(result: PlanResult, gpu: GpuSpec) -> dict:
    run, estimate = result.run, result.estimate
    adapter, training = run.spec.adapter, run.spec.training
    return {
        "fits": result.fits,
        "gpu": gpu.name,
        "budget_bytes": result.budget_bytes,
        "usable_bytes": result.usable_bytes,
        "predicted_peak_bytes": estimate.predicted_peak_bytes,
        "predicted_peak_allocated_bytes": estimate.predicted_peak_allocated_bytes,
        "cuda_context_bytes": estimate.cuda_context_bytes,
        "paged_optimizer_bytes": estimate.paged_optimizer_bytes,
        "pinned_host_bytes": estimate.pinned_host_bytes,
        "peak_phase": estimate.phase,
        "breakdown": estimate.breakdown,
        "plan": {  # these names are read by users and tests: they stay as they are
            "rank": adapter.r,
            "lora_alpha": adapter.lora_alpha,
            "target_modules": adapter.target_modules if isinstance(adapter.target_modules, str)
            else list(adapter.target_modules),
            "gradient_checkpointing": training.gradient_checkpointing,
            "checkpointed_layers": training.checkpointed_layers,
            "offload_checkpoints": training.offload_checkpoints,
            "mlp_chunk_tokens": training.mlp_chunk_tokens,
            "attention_chunk_tokens": training.attention_chunk_tokens,
            "recompute_keys": training.recompute_keys,
            "micro_batch_size": training.micro_batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "seq_len": training.max_seq_len,
            "optimizer": training.optimizer,
            "packing": run.spec.data.packing,
            "attention": run.attention,
            "loss": "fused" if run.fused_loss else "chunked",
            "compute_dtype": run.compute_dtype,
            "adapter_dtype": adapter.dtype,
            "adapter_type": adapter.type,
            "quant": run.spec.quantization.mode,
            "distributed": training.distributed,
            "fsdp_cpu_offload": training.fsdp_cpu_offload,
        },
        "trainable_params": estimate.trainable_params,
        "total_params": estimate.total_params,
        "smallest_fitting_budget_bytes": result.smallest_fitting_budget_bytes,
        "longest_fitting_seq_len": result.longest_fitting_seq_len,
        **({"longest_seq_len": result.longest_seq_len} if result.longest_seq_len else {}),
        "advice": result.advice,
        "as_configured": result.as_configured,
    }


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f}"


def _component_lines(result: PlanResult) -> list[str]:
    estimate = result.estimate
    lines = [f"{'component':<34}{'GiB':>8}"]
    lines += [f"  {name:<32}{_gib(value)}" for name, value in estimate.breakdown.items()]
    margin = result.budget_bytes - result.usable_bytes - estimate.cuda_context_bytes
    lines += [f"{'peak reserved by PyTorch':<34}{_gib(estimate.predicted_peak_bytes)}   (at the {estimate.phase})",
              f"{'PyTorch may reserve':<34}{_gib(result.usable_bytes)}   ({result.budget_bytes / GIB:.2f} GiB less "
              f"{margin / GIB:.2f} GiB margin and {estimate.cuda_context_bytes / GIB:.2f} GiB CUDA context)"]
    if estimate.paged_optimizer_bytes:
        lines.append(f"  + {estimate.paged_optimizer_bytes / GIB:.2f} GiB of paged optimizer states in unified "
                     "memory (moved to CPU RAM when the GPU runs short)")
    if estimate.pinned_host_bytes:
        lines.append(f"  + {estimate.pinned_host_bytes / GIB:.2f} GiB of checkpointed layers' inputs in pinned host "
                     "memory (training.offload_checkpoints)")
    return lines


def _plan_lines(result: PlanResult) -> list[str]:
    estimate, run = result.estimate, result.run
    adapter, training = run.spec.adapter, run.spec.training
    targets = adapter.target_modules if isinstance(adapter.target_modules, str) else ",".join(adapter.target_modules)
    checkpointed = "all" if training.gradient_checkpointing and training.checkpointed_layers is None else (
        training.checkpointed_layers if training.gradient_checkpointing else 0)
    heading = ("run as configured:" if result.as_configured else "plan:" if result.fits
               else "leanest plan (does not fit):")
    return [heading,
            f"  adapter.type / target_modules        {adapter.type} / {targets}",
            f"  adapter.r / adapter.lora_alpha       {adapter.r} / {adapter.lora_alpha:g}",
            f"  training.gradient_checkpointing      {str(training.gradient_checkpointing).lower()}",
            f"  training.checkpointed_layers         {checkpointed}",
            f"  training.offload_checkpoints         {str(training.offload_checkpoints).lower()}",
            f"  training.mlp_chunk_tokens            {training.mlp_chunk_tokens}",
            f"  training.attention_chunk_tokens      {training.attention_chunk_tokens}",
            f"  training.recompute_keys              {str(training.recompute_keys).lower()}",
            f"  training.micro_batch_size            {training.micro_batch_size}",
            f"  training.gradient_accumulation_steps {training.gradient_accumulation_steps}",
            f"  training.max_seq_len                 {training.max_seq_len}",
            f"  training.optimizer                   {training.optimizer}",
            f"  data.packing / attention             {str(run.spec.data.packing).lower()} / {run.attention}",
            f"  loss (training.loss_kernel)          {'fused (liger-kernel)' if run.fused_loss else 'chunked'}",
            f"  quantization.mode                    {run.spec.quantization.mode}",
            f"  compute / adapter dtype              {run.compute_dtype} / {adapter.dtype}",
            f"  trainable params                     {estimate.trainable_params:,} of {estimate.total_params:,}"]


def result_table(result: PlanResult, gpu: GpuSpec, model: str) -> str:
    lines = [f"{model} on {gpu.name} ({result.budget_bytes / GIB:.2f} GiB)", ""]
    lines += _component_lines(result) + [""] + _plan_lines(result)
    lines += ["", ("fits: " if result.fits else "does not fit: ") + result.advice]
    return "\n".join(lines)


def _cards(plan: DistributedPlan, gpu: GpuSpec) -> str:
    """E.g. "2 x L4 with FSDP and CPU offload"."""
    parallelism = plan.parallelism
    if parallelism.gpus == 1 and parallelism.strategy != "fsdp":
        return f"1 x {gpu.name}"
    return f"{parallelism.gpus} x {gpu.name} with {parallelism.strategy.upper()}" + (
        " and CPU offload" if parallelism.cpu_offload else "")


def distributed_summary(plan: DistributedPlan, gpu: GpuSpec, model: str) -> str:
    """One sentence: the cards a run needs, and the host RAM its training state takes."""
    seq_len = plan.result.run.spec.training.max_seq_len
    verb = "needs" if plan.result.fits else f"does not fit {MAX_GPUS} cards even with"
    host = plan.rank.host_ram_bytes
    return (f"{model} at seq {seq_len} {verb} {_cards(plan, gpu)}"
            + (f", {host / GIB:.1f} GiB host RAM" if host else ""))


def distributed_json(plan: DistributedPlan, gpu: GpuSpec) -> dict:
    """One card's plan (result_json: breakdown and peaks per GPU) with the parallelism and the host RAM."""
    parallelism = plan.parallelism
    return {**result_json(plan.result, gpu), "gpus": parallelism.gpus, "strategy": parallelism.strategy,
            "cpu_offload": parallelism.cpu_offload, "batch_per_gpu": plan.batch_per_rank,
            "host_ram_bytes": plan.rank.host_ram_bytes, "host_breakdown": plan.rank.host_breakdown,
            "load_peak_bytes": plan.rank.load_bytes, "load_host_bytes": plan.rank.load_host_bytes}


def distributed_table(plan: DistributedPlan, gpu: GpuSpec, model: str, fewest: bool) -> str:
    result, parallelism = plan.result, plan.parallelism
    lines = ([distributed_summary(plan, gpu, model), ""] if fewest else [])
    lines += [f"{model} on {_cards(plan, gpu)}: per GPU ({result.budget_bytes / GIB:.2f} GiB each), "
              f"{plan.batch_per_rank} sequences per GPU per optimizer step", ""]
    lines += _component_lines(result)
    if plan.rank.load_bytes > plan.rank.gpu.predicted_peak_bytes:
        how = ("each GPU holds the quantization states, its shards and one layer whole while FSDP cuts them"
               if plan.rank.load_host_bytes else "every GPU loads the whole model and adapter before FSDP shards them")
        lines.append(f"  (training needs {plan.rank.gpu.predicted_peak_bytes / GIB:.2f} GiB; loading needs more: "
                     f"{how})")
    host = plan.rank.host_breakdown
    parts = " + ".join(f"{name} {value / GIB:.2f}" for name, value in host.items() if value)
    if plan.rank.load_host_bytes > sum(host.values()):
        parts = f"while loading: every rank's 4-bit model and adapter, parked {plan.rank.load_host_bytes / GIB:.2f}"
    elif plan.rank.load_host_bytes:
        parts += f" GiB; while loading, less: {plan.rank.load_host_bytes / GIB:.2f}"
    lines.append(f"{'host RAM needed':<34}{_gib(plan.rank.host_ram_bytes)}   "
                 f"({parts + ' GiB, ' if parts else ''}"
                 f"{f'all {parallelism.gpus} ranks on one host' if parallelism.gpus > 1 else 'one rank'}; "
                 "beyond the processes' own memory)")
    lines += ["", *_plan_lines(result),
              f"  training.distributed                 {result.run.spec.training.distributed}",
              f"  training.fsdp_cpu_offload            {str(result.run.spec.training.fsdp_cpu_offload).lower()}",
              "", ("fits: " if result.fits else "does not fit: ") + result.advice]
    return "\n".join(lines)


def run_plan_memory(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 1 when nothing does. Bad input raises UserError (exit 2)."""
    if args.gpus is None:
        if args.strategy or args.cpu_offload:
            flag = f"--strategy {args.strategy}" if args.strategy else "--cpu-offload"
            raise UserError(f"{flag}: plans a multi-GPU run; add --gpus N (or --gpus auto)")
        result, planned = plan_result(args)
        print(json.dumps(result_json(result, planned.gpu), indent=1) if args.json
              else result_table(result, planned.gpu, planned.model))
        return 0 if result.fits else 1
    if args.seq_len == LONGEST_SEQ_LEN:
        raise UserError(f"--seq-len {LONGEST_SEQ_LEN}: plans one GPU; leave out --gpus, or give --seq-len N")
    plan, planned = distributed_plan(args)
    print(json.dumps(distributed_json(plan, planned.gpu), indent=1) if args.json
          else distributed_table(plan, planned.gpu, planned.model, fewest=_gpu_count(args.gpus) is None))
    return 0 if plan.result.fits else 1
