"""`plan-memory`: its arguments, and the readable table and JSON object of a plan."""

import argparse
import json
from typing import Optional, Union

from qlora_trainer.adapters import SHORTHANDS
from qlora_trainer.errors import ConfigError, UserError
from qlora_trainer.hardware import GPU_CATALOGUE, GpuSpec, budget_gpu, detect_gpu, lookup_gpu
from qlora_trainer.planner import load_model_config, preset_names
from qlora_trainer.planner.memory import TrainingPlan, model_shape
from qlora_trainer.planner.search import FixedChoices, PlanResult, search_plan

GIB = 2**30


def add_plan_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"model folder (config.json is enough) or preset: {', '.join(preset_names())}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu", help=f"a catalogue GPU: {', '.join(GPU_CATALOGUE)} (default: the GPU here)")
    budget.add_argument("--vram", type=float, metavar="GIB", help="the GPU's memory in GiB, for any card")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="effective batch: sequences per optimizer step, kept through accumulation (default 16)")
    parser.add_argument("--micro-batch-size", type=int, help="fix the micro-batch (default: chosen)")
    parser.add_argument("--rank", type=int, help="fix the adapter rank (default: chosen)")
    parser.add_argument("--alpha", type=float, help="fix lora_alpha (default 2 x rank)")
    parser.add_argument("--targets", help="fix the targets: attn | mlp | all-linear | q_proj,v_proj,... "
                                          "(default: chosen)")
    parser.add_argument("--grad-ckpt", choices=("on", "off", "auto"), default="auto",
                        help="gradient checkpointing (default auto: chosen)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"),
                        help="fix the optimizer (default: chosen)")
    parser.add_argument("--quant", choices=("nf4", "fp4", "int8", "none"), default="nf4",
                        help="how the base is stored (default nf4)")
    parser.add_argument("--adapter", choices=("lora", "loha", "lokr"), default="lora", help="adapter type")
    parser.add_argument("--adapter-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _gpu(args: argparse.Namespace) -> GpuSpec:
    if args.gpu is not None:
        return lookup_gpu(args.gpu)
    if args.vram is not None:
        return budget_gpu(args.vram)
    detected = detect_gpu()
    if detected is None:
        raise UserError("--gpu/--vram: no GPU here; name one (--gpu T4) or give its memory (--vram 15.5)")
    return detected


def _targets(text: Optional[str]) -> Union[str, tuple[str, ...], None]:
    if text is None or text in SHORTHANDS:
        return text
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise UserError(f"--targets {text!r}: use attn, mlp, all-linear or module names such as q_proj,v_proj")
    return names


def plan_result(args: argparse.Namespace) -> tuple[PlanResult, GpuSpec]:
    """Run the search the command line asks for."""
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--micro-batch-size", args.micro_batch_size), ("--rank", args.rank)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value}: not allowed; it must be a positive integer")
    if args.alpha is not None and not args.alpha > 0:
        raise UserError(f"--alpha {args.alpha:g}: not allowed; it must be > 0")
    gpu = _gpu(args)
    shape = model_shape(load_model_config(args.model))
    fixed = FixedChoices(
        rank=args.rank, lora_alpha=args.alpha, target_modules=_targets(args.targets),
        gradient_checkpointing={"on": True, "off": False}.get(args.grad_ckpt),
        micro_batch_size=args.micro_batch_size, optimizer=args.optimizer,
    )
    base = TrainingPlan(seq_len=args.seq_len, quant=args.quant, adapter_type=args.adapter,
                        adapter_dtype=args.adapter_dtype, compute_dtype="bfloat16" if gpu.supports_bf16 else "float16")
    try:
        return search_plan(shape, gpu.usable_bytes, base, fixed, args.batch_size), gpu
    except ConfigError as err:  # target names that match no layer, worded for the command line
        raise UserError(str(err).replace("adapter.target_modules", "--targets", 1)) from None


def result_json(result: PlanResult, gpu: GpuSpec) -> dict:
    plan, estimate = result.plan, result.estimate
    return {
        "fits": result.fits,
        "gpu": gpu.name,
        "budget_bytes": result.budget_bytes,
        "usable_bytes": result.usable_bytes,
        "predicted_peak_bytes": estimate.predicted_peak_bytes,
        "predicted_peak_allocated_bytes": estimate.predicted_peak_allocated_bytes,
        "cuda_context_bytes": estimate.cuda_context_bytes,
        "paged_optimizer_bytes": estimate.paged_optimizer_bytes,
        "peak_phase": estimate.phase,
        "breakdown": estimate.breakdown,
        "plan": {
            "rank": plan.rank,
            "lora_alpha": plan.lora_alpha,
            "target_modules": plan.target_modules if isinstance(plan.target_modules, str)
            else list(plan.target_modules),
            "gradient_checkpointing": plan.gradient_checkpointing,
            "checkpointed_layers": plan.checkpointed_layers,
            "offload_checkpoints": plan.offload_checkpoints,
            "mlp_chunk_tokens": plan.mlp_chunk_tokens,
            "micro_batch_size": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "seq_len": plan.seq_len,
            "optimizer": plan.optimizer,
            "compute_dtype": plan.compute_dtype,
            "adapter_dtype": plan.adapter_dtype,
            "adapter_type": plan.adapter_type,
            "quant": plan.quant,
        },
        "trainable_params": estimate.trainable_params,
        "total_params": estimate.total_params,
        "smallest_fitting_budget_bytes": result.smallest_fitting_budget_bytes,
        "longest_fitting_seq_len": result.longest_fitting_seq_len,
        "advice": result.advice,
    }


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:8.2f}"


def result_table(result: PlanResult, gpu: GpuSpec, model: str) -> str:
    estimate, plan = result.estimate, result.plan
    targets = plan.target_modules if isinstance(plan.target_modules, str) else ",".join(plan.target_modules)
    lines = [f"{model} on {gpu.name} ({result.budget_bytes / GIB:.2f} GiB)", "",
             f"{'component':<34}{'GiB':>8}"]
    lines += [f"  {name:<32}{_gib(value)}" for name, value in estimate.breakdown.items()]
    margin = result.budget_bytes - result.usable_bytes - estimate.cuda_context_bytes
    checkpointed = "all" if plan.gradient_checkpointing and plan.checkpointed_layers is None else (
        plan.checkpointed_layers if plan.gradient_checkpointing else 0)
    lines += [f"{'peak reserved by PyTorch':<34}{_gib(estimate.predicted_peak_bytes)}   (at the {estimate.phase})",
              f"{'PyTorch may reserve':<34}{_gib(result.usable_bytes)}   ({result.budget_bytes / GIB:.2f} GiB less "
              f"{margin / GIB:.2f} GiB margin and {estimate.cuda_context_bytes / GIB:.2f} GiB CUDA context)"]
    if estimate.paged_optimizer_bytes:
        lines.append(f"  + {estimate.paged_optimizer_bytes / GIB:.2f} GiB of paged optimizer states in unified "
                     "memory (moved to CPU RAM when the GPU runs short)")
    lines += ["", "plan:" if result.fits else "leanest plan (does not fit):",
              f"  adapter.type / target_modules        {plan.adapter_type} / {targets}",
              f"  adapter.r / adapter.alpha            {plan.rank} / {plan.lora_alpha:g}",
              f"  training.gradient_checkpointing      {str(plan.gradient_checkpointing).lower()}",
              f"  training.checkpointed_layers         {checkpointed}",
              f"  training.offload_checkpoints         {str(plan.offload_checkpoints).lower()}",
              f"  training.mlp_chunk_tokens            {plan.mlp_chunk_tokens}",
              f"  training.micro_batch_size            {plan.micro_batch_size}",
              f"  training.gradient_accumulation_steps {plan.gradient_accumulation_steps}",
              f"  training.max_seq_len                 {plan.seq_len}",
              f"  training.optimizer                   {plan.optimizer}",
              f"  quantization.mode                    {plan.quant}",
              f"  compute / adapter dtype              {plan.compute_dtype} / {plan.adapter_dtype}",
              f"  trainable params                     {estimate.trainable_params:,} of {estimate.total_params:,}",
              "", ("fits: " if result.fits else "does not fit: ") + result.advice]
    return "\n".join(lines)


def run_plan_memory(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 1 when nothing does. Bad input raises UserError (exit 2)."""
    result, gpu = plan_result(args)
    print(json.dumps(result_json(result, gpu), indent=1) if args.json else result_table(result, gpu, args.model))
    return 0 if result.fits else 1
