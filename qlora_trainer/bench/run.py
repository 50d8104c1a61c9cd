"""`qlora-trainer bench`: full fine-tuning vs LoRA vs QLoRA on one model and GPU, measured where it fits.

Each method that the planner predicts to fit the budget runs a few real steps in its own process
(`bench/measure.py`); the others, and any that run out of memory, get the planner's estimate and are marked
`estimated`. On a machine without a GPU the methods still run (CPU mode) so that parameter and optimizer-state
counts are real, and the VRAM columns are the planner's.
"""

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from qlora_trainer.bench.measure import method_spec
from qlora_trainer.bench.methods import FULL_METHODS, METHODS
from qlora_trainer.bench.random_model import random_checkpoint_in_subprocess
from qlora_trainer.bench.report import BenchReport, BenchRow, write_report
from qlora_trainer.errors import UserError
from qlora_trainer.hardware import GPU_CATALOGUE, Hardware, detect_gpu
from qlora_trainer.planner.memory import DTYPE_BYTES, OPTIM8_BLOCK, MemoryEstimate, estimate_memory
from qlora_trainer.planner.shapes import load_model_config, model_shape
from qlora_trainer.spec import ResolvedRun, RunSpec, resolve

GIB = 2**30


def planned_hardware() -> Hardware:
    """What the estimates are for: the GPU here, or on a machine without one an H100 (a bf16 card with compiled
    layers), which the report names."""
    return Hardware.planned(detect_gpu() or GPU_CATALOGUE["H100-80GB"])


def full_estimate(model_config, run: ResolvedRun, method: str) -> tuple[MemoryEstimate, int, int, int]:
    """Planner estimate for full fine-tuning: (estimate, weight, gradient, optimizer-state bytes).

    Stored bytes are exact (fp32 weights, gradients and AdamW moments for `full`; bf16 weights and gradients and
    two uint8 moments with fp32 absmax per 256 for `full-8bit`); activations are the 16-bit LoRA estimate's.
    """
    shape = model_shape(model_config)
    lora = estimate_memory(shape, run)  # the 16-bit run method_spec describes a full method as
    params = shape.total_params
    if method == "full":
        weights, gradients, optimizer = 4 * params, 4 * params, 8 * params
    else:
        weights, gradients = 2 * params, 2 * params
        optimizer = 2 * params + 2 * 4 * (params // OPTIM8_BLOCK)
    activations = lora.breakdown["activations"] + lora.breakdown["logits"]
    allocated = weights + gradients + optimizer + activations
    overhead = lora.breakdown["overhead"]
    breakdown = {"weights": weights, "adapter": 0, "gradients": gradients, "optimizer": optimizer,
                 "activations": activations, "logits": 0, "overhead": overhead}
    estimate = dataclasses.replace(lora, breakdown=breakdown, predicted_peak_allocated_bytes=allocated,
                                   predicted_peak_bytes=allocated + overhead, trainable_params=params,
                                   total_params=params)
    return estimate, weights, gradients, optimizer


def method_estimate(model_config, run: ResolvedRun, method: str) -> tuple[MemoryEstimate, int, int, int]:
    """(estimate, weight, gradient, optimizer-state bytes) the planner predicts for one method."""
    if method in FULL_METHODS:
        return full_estimate(model_config, run, method)
    estimate = estimate_memory(model_config, run)
    b = estimate.breakdown
    return estimate, b["weights"] + b["adapter"], estimate.trainable_params * DTYPE_BYTES["float32"], b["optimizer"]


def _measure_in_subprocess(method: str, spec: RunSpec, cap_gib: float, timeout_s: int
                           ) -> tuple[Optional[dict], str]:
    training = spec.training
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measurement.json"
        process = subprocess.run(
            [sys.executable, "-m", "qlora_trainer.bench.measure", "--method", method, "--model-path",
             spec.model.path, "--seq-len", str(training.max_seq_len), "--micro-batch-size",
             str(training.micro_batch_size), "--rank", str(spec.adapter.r), "--targets", str(spec.adapter.target_modules),
             "--steps", str(training.max_steps), "--cap-gib", str(cap_gib), "--out", str(out)],
            capture_output=True, text=True, timeout=timeout_s,
        )
        if process.returncode == 0 and out.exists():
            return json.loads(out.read_text()), ""
        last = (process.stderr.strip().splitlines() or ["failed"])[-1]
        return None, "out of memory when run" if "OutOfMemoryError" in process.stderr else last[:200]


def _parts(estimate: MemoryEstimate, measured: Optional[dict]) -> dict[str, int]:
    """The chart's stack: measured storage and peaks where there are some, else the planner's breakdown."""
    b = estimate.breakdown
    if measured and measured.get("peak_allocated_bytes"):
        stored = measured["weight_bytes"] + measured["gradient_bytes"] + measured["optimizer_state_bytes"]
        return {"weights": measured["weight_bytes"], "gradients": measured["gradient_bytes"],
                "optimizer": measured["optimizer_state_bytes"],
                "activations": max(0, measured["peak_allocated_bytes"] - stored),
                "other": measured["peak_reserved_bytes"] - measured["peak_allocated_bytes"]}
    return {"weights": b["weights"] + b["adapter"], "gradients": b["gradients"], "optimizer": b["optimizer"],
            "activations": b["activations"] + b["logits"], "other": b["overhead"]}


def run_bench(args: argparse.Namespace, command: str) -> BenchReport:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {args.methods}: unknown {', '.join(unknown) or 'none given'}; "
                        f"choose from {', '.join(METHODS)}")
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--rank", args.rank)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be a positive whole number")
    if not args.cap_gib >= 0:  # NaN too
        raise UserError(f"--cap-gib {args.cap_gib}: must be 0 (the whole card) or a positive number of GiB")
    out = Path(args.out)
    if out.exists() and not out.is_dir() or any(parent.is_file() for parent in out.parents):
        raise UserError(f"--out {args.out}: a file is in the way; give a folder for report.md, report.json and "
                        "vram.png")
    model_config = load_model_config(args.model)
    if args.random_weights:
        model_path = random_checkpoint_in_subprocess(args.model)
    elif (Path(args.model) / "config.json").is_file():
        model_path = Path(args.model)
    else:
        raise UserError(f"--model {args.model}: a preset has no weights; add --random-weights or give a model folder")
    gpu = detect_gpu()
    hardware = planned_hardware()
    rows, budget = [], None
    for number, method in enumerate(methods, 1):
        spec = method_spec(method, str(model_path), args.seq_len, args.batch_size, args.rank, args.targets,
                           args.steps).with_values({"training.memory_cap_gib": max(args.cap_gib, 0.0)})
        run = resolve(spec, hardware)
        budget = run.budget if gpu is not None else None
        estimate, weight_bytes, gradient_bytes, optimizer_bytes = method_estimate(model_config, run, method)
        measured, note = None, ""
        if budget is None or budget.fits(estimate.predicted_peak_bytes):  # the rule train's gate applies
            print(f"bench: {method} ({number} of {len(methods)}): {args.steps} steps", file=sys.stderr, flush=True)
            measured, note = _measure_in_subprocess(method, spec, args.cap_gib, timeout_s=600)
        else:
            note = (f"predicted {estimate.predicted_peak_bytes / GIB:.1f} GiB > {budget.usable_bytes / GIB:.1f} GiB "
                    "usable: not run")
            print(f"bench: {method} ({number} of {len(methods)}): {note}", file=sys.stderr, flush=True)
        rows.append(BenchRow(
            method=method,
            status="measured" if measured else "estimated",
            trainable_params=measured["trainable_params"] if measured else estimate.trainable_params,
            optimizer_state_bytes=measured["optimizer_state_bytes"] if measured else optimizer_bytes,
            peak_allocated_bytes=measured["peak_allocated_bytes"] if measured else None,
            peak_reserved_bytes=measured["peak_reserved_bytes"] if measured else None,
            tokens_per_second=measured["tokens_per_second"] if measured else None,
            predicted_peak_bytes=estimate.predicted_peak_bytes,
            weight_bytes=measured["weight_bytes"] if measured else weight_bytes,
            gradient_bytes=measured["gradient_bytes"] if measured else gradient_bytes,
            parts_bytes=_parts(estimate, measured),
            note=note if not measured or measured.get("peak_reserved_bytes") else "CPU run: VRAM is the planner's",
        ))
    return BenchReport(
        model=args.model, seq_len=args.seq_len, micro_batch_size=args.batch_size,
        device=(gpu.name + (f" capped at {args.cap_gib:g} GiB" if args.cap_gib > 0 else "")) if gpu else "cpu",
        budget_bytes=budget.budget_bytes if budget else None, date=datetime.date.today().isoformat(),
        command=command, versions=_versions(), rows=rows,
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import qlora_trainer

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["qlora-trainer"] = qlora_trainer.__version__  # also when run from a checkout that is not installed
    return found


def run_bench_command(args: argparse.Namespace) -> int:
    command = "qlora-trainer bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qlora-trainer bench"
    report = run_bench(args, command)
    for path in write_report(report, Path(args.out)):
        print(path)
    return 0
