"""Measure our trainer on random-weight full-size models: peak VRAM and tokens/s per configuration.

Each case runs `qlora-trainer train` in its own process (a fresh CUDA allocator, as a user's run has) on a
random-weight checkpoint and packed synthetic text, and reads the peaks and speeds from its metrics.jsonl.
Results are appended to a JSONL file as they come, so a cut-off run keeps what it measured.

    python benchmarks/measure_training.py --cases benchmarks/cases/gpu-smoke.yaml --out results.jsonl
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not

from qlora_trainer.bench.random_model import random_checkpoint_in_subprocess, write_synthetic_text  # noqa: E402
from qlora_trainer.hardware import GPU_CATALOGUE, Hardware, detect_gpu  # noqa: E402
from qlora_trainer.planner.memory import estimate_memory  # noqa: E402
from qlora_trainer.planner.shapes import load_model_config  # noqa: E402
from qlora_trainer.spec import resolve, spec_from_dict  # noqa: E402

WORK = Path(os.environ.get("QLORA_BENCH_WORK", tempfile.gettempdir()))


def synthetic_data() -> Path:
    """Packed synthetic text, enough for full rows of any length (the same file for every case)."""
    return write_synthetic_text(WORK / "synthetic-text.jsonl", n_docs=4000, words_per_doc=400)


def run_config(model_dir: Path, data_path: Path, case: dict, output_dir: Path) -> dict:
    """The run config for one case: defaults of the benchmark, then the case's own keys."""
    config = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "format": "text", "packing": True},
        "adapter": {"type": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": 6, "micro_batch_size": 1, "max_seq_len": 2048, "save_steps": 0,
                     "learning_rate": 1e-4, "logging_steps": 1},
        "output": {"dir": str(output_dir), "overwrite": True},
    }
    if case.get("plan_auto"):  # leave the planner's choices open: only what the case itself sets is fixed
        config["adapter"] = {"lora_dropout": 0.0}
        del config["training"]["micro_batch_size"]
        config["training"]["plan"] = "auto"
    for section, values in case.get("config", {}).items():
        config.setdefault(section, {}).update(values)
    return config


def run_train_command(config: dict, timeout_s: int) -> dict:
    """`qlora-trainer train` on `config` in a process of its own: exit code, the steps' metrics, the speed (median
    after two warm-up steps), the peaks, and the run config as the trainer ran it (after training.plan: auto)."""
    output_dir = Path(config["output"]["dir"])
    config_path = output_dir.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config))
    started = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "qlora_trainer", "train", "--config", str(config_path), "--no-progress"],
        capture_output=True, text=True, timeout=timeout_s,
    )
    record = {"exit_code": process.returncode, "wall_s": round(time.time() - started, 1)}
    if process.returncode != 0:
        record["error"] = (process.stderr.strip().splitlines() or ["?"])[-1][:300]
    metrics_path = output_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    steps = [s for s in steps if "loss" in s]
    ran_config = output_dir / "run_config.json"
    if ran_config.exists():
        record["ran_config"] = json.loads(ran_config.read_text())
    if steps:
        speeds = [s["tokens_per_second"] for s in steps[2:]] or [s["tokens_per_second"] for s in steps]
        record.update(
            steps=len(steps),
            peak_reserved_bytes=max(s["peak_vram_bytes"] or 0 for s in steps),
            peak_allocated_bytes=max(s["peak_allocated_bytes"] or 0 for s in steps),
            tokens_per_second=statistics.median(speeds),
            first_step_s=round(steps[0]["tokens_seen"] / steps[0]["tokens_per_second"], 2),
            losses=[round(s["loss"], 4) for s in steps],
            step_speeds=[round(s["tokens_per_second"]) for s in steps],
        )
    return record


def measure_case(case: dict, timeout_s: int) -> dict:
    model_dir = random_checkpoint_in_subprocess(case["model"], WORK / f"random-{Path(case['model']).name}")
    config = run_config(model_dir, synthetic_data(), case, WORK / "bench-run")
    record = {"name": case["name"], "model": case["model"], "config": case.get("config", {})}
    record |= run_train_command(config, timeout_s)
    ran = record.get("ran_config", config)
    training, adapter = ran["training"], ran["adapter"]
    record["plan"] = {key: training.get(key) for key in ("micro_batch_size", "gradient_accumulation_steps",
                                                          "gradient_checkpointing", "checkpointed_layers",
                                                          "offload_checkpoints", "optimizer")}
    record["plan"].update(rank=adapter.get("r"), target_modules=adapter.get("target_modules"))
    return record | predicted(ran)


def predicted(config: dict) -> dict:
    """The planner's prediction for the same run config, as the trainer resolves it on this machine's GPU (an H100
    where there is none)."""
    run = resolve(spec_from_dict(config), Hardware.planned(detect_gpu() or GPU_CATALOGUE["H100-80GB"]))
    estimate = estimate_memory(load_model_config(run.spec.model.path), run)
    return {"predicted_peak_bytes": estimate.predicted_peak_bytes,
            "predicted_peak_allocated_bytes": estimate.predicted_peak_allocated_bytes,
            "predicted_breakdown": estimate.breakdown, "predicted_phase": estimate.phase}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, type=Path, help="YAML list of {name, model, config}")
    parser.add_argument("--out", required=True, type=Path, help="JSONL file the results are appended to")
    parser.add_argument("--only", help="comma-separated case names to run")
    parser.add_argument("--timeout-s", type=int, default=300, help="per case")
    args = parser.parse_args()
    cases = yaml.safe_load(args.cases.read_text())
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        try:
            record = measure_case(case, args.timeout_s)
        except subprocess.TimeoutExpired:
            record = {"name": case["name"], "error": f"timed out after {args.timeout_s} s"}
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k not in ("losses", "ran_config")}), flush=True)


if __name__ == "__main__":
    main()
