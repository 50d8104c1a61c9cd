"""Measure our trainer on random-weight full-size models: peak VRAM and tokens/s per configuration.

Each case runs `qlora-trainer train` in its own process (a fresh CUDA allocator, as a user's run has) on a
random-weight checkpoint and packed synthetic text, and reads the peaks and speeds from its metrics.jsonl.
Results are appended to a JSONL file as they come, so a cut-off run keeps what it measured. With --parallel N, up
to N cases run side by side as the GPU's memory allows: each process has its own allocator, so its peaks are its
own, but its tokens/s are shared and are not a speed figure (records say `concurrent`).

    python benchmarks/measure_training.py --cases benchmarks/cases/gpu-smoke.yaml --out results.jsonl
"""

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not

from qlora_trainer.bench.random_model import random_checkpoint_in_subprocess, write_synthetic_text  # noqa: E402
from qlora_trainer.hardware import GPU_CATALOGUE, Hardware, detect_gpu  # noqa: E402
from qlora_trainer.planner.search import SEARCHED_KEYS, search_plan  # noqa: E402
from qlora_trainer.planner.shapes import load_model_config, model_shape  # noqa: E402
from qlora_trainer.spec import resolve, spec_from_dict  # noqa: E402
from qlora_trainer.training.gate import training_estimate  # noqa: E402

WORK = Path(os.environ.get("QLORA_BENCH_WORK", tempfile.gettempdir()))


@functools.cache
def synthetic_data() -> Path:
    """Synthetic text of 50 to 400 words a document, enough to pack full rows of any length (the same file for every
    case). Documents of one length would leave the same gap in every packed row (801-token documents fill a
    2,048-token row to 78%), and the planner predicts full rows."""
    return write_synthetic_text(WORK / "synthetic-text-50-400.jsonl", n_docs=6000, words_per_doc=400, min_words=50)


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
        # a card case runs what plan-memory plans, whose adapter is the default one (lora_dropout 0.05 included)
        config["adapter"] = {} if case.get("card") else {"lora_dropout": 0.0}
        del config["training"]["micro_batch_size"]
        config["training"]["plan"] = "auto"
    for section, values in case.get("config", {}).items():
        config.setdefault(section, {}).update(values)
    return config


def run_train_command(config: dict, timeout_s: int, tree: Optional[Path] = None) -> dict:
    """`qlora-trainer train` on `config` in a process of its own (run in the checkout `tree`, another branch's
    files, where given: its own package is the one imported): exit code, the steps' metrics, the speed (median
    after two warm-up steps), the peaks, and the run config as the trainer ran it (after training.plan: auto)."""
    output_dir = Path(config["output"]["dir"])
    config_path = output_dir.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config))
    started = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "qlora_trainer", "train", "--config", str(config_path), "--no-progress"],
        capture_output=True, text=True, timeout=timeout_s, cwd=tree,
    )
    record = {"exit_code": process.returncode, "wall_s": round(time.time() - started, 1)}
    loaded = re.search(r"model loaded: GPU peak ([\d.]+) GiB reserved \(([\d.]+) GiB allocated\)", process.stdout)
    if loaded:  # the peaks of loading (FSDP: a layer at a time), before training's own
        record["load_peak_reserved_gib"], record["load_peak_allocated_gib"] = map(float, loaded.groups())
    notes = [line for line in process.stdout.splitlines() if line.startswith("note:")]
    if notes:  # e.g. compiled layers that fell back to eager: the run measured is not the one predicted
        record["notes"] = notes
    if process.returncode != 0:
        lines = process.stderr.strip().splitlines() or ["?"]
        record["error"] = next((line for line in reversed(lines) if "Error" in line), lines[-1])[:300]
        record["stderr_tail"] = "\n".join(lines[-40:])[-4000:]
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
        if any(s.get("compiled_layers") is False for s in steps) and (record.get("ran_config") or {}).get(
                "training", {}).get("compile_layers") != "off":
            record["compile_fell_back"] = True  # the compiler failed and the run went on with eager layers
    return record


def card_config(case: dict) -> dict:
    """A `card: T4` case runs the planner's own plan for that card (`training.plan: auto`) on this GPU held to the
    card's usable memory (`training.memory_cap_gib`, CUDA context included), in the compute dtype and with the
    attention the card would get: what `plan-memory --gpu T4` plans, run as it would run there."""
    card = GPU_CATALOGUE[case["card"]]
    spec = spec_from_dict(run_config(Path(case["model"]), Path("synthetic.jsonl"), case | {"plan_auto": True},
                                     Path("out")))
    on_card = resolve(spec, Hardware.planned(card))
    fixed = {"training": {"memory_cap_gib": round(card.usable_bytes / 2**30, 2)},
             "quantization": {"compute_dtype": on_card.compute_dtype},
             "model": {"attn_implementation": on_card.attention if on_card.attention in ("sdpa", "eager") else "auto"}}
    config = case.get("config", {})
    return {section: fixed.get(section, {}) | config.get(section, {}) for section in {*fixed, *config}}


def card_plan(case: dict) -> dict:
    """What `plan-memory --gpu CARD` plans for a card case (the trainer, capped on this GPU, should choose the same)."""
    spec = spec_from_dict(run_config(Path(case["model"]), Path("synthetic.jsonl"), case | {"plan_auto": True},
                                     Path("out")))
    plan = search_plan(model_shape(load_model_config(case["model"])),
                       resolve(spec, Hardware.planned(GPU_CATALOGUE[case["card"]])))
    return {"fits": plan.fits, "predicted_peak_bytes": plan.estimate.predicted_peak_bytes,
            "values": {key: plan.run.spec.value(key) for key in SEARCHED_KEYS}}


def expanded(case: dict) -> dict:
    """A case as measured: card cases become planned runs under the card's cap."""
    if "card" not in case:
        return case
    return case | {"plan_auto": True, "config": card_config(case)}


def measure_case(case: dict, model_dir: Path, timeout_s: int, slot: int) -> dict:
    config = run_config(model_dir, synthetic_data(), case, WORK / f"bench-run-{slot}")
    record = {"name": case["name"], "model": case["model"], "config": case.get("config", {})}
    if "card" in case:
        record |= {"card": case["card"], "card_plan": card_plan(case)}
    record |= run_train_command(config, timeout_s)
    ran = record.get("ran_config", config)
    training, adapter = ran["training"], ran["adapter"]
    record["plan"] = {key: training.get(key) for key in ("micro_batch_size", "gradient_accumulation_steps",
                                                          "gradient_checkpointing", "checkpointed_layers",
                                                          "offload_checkpoints", "optimizer")}
    record["plan"].update(rank=adapter.get("r"), target_modules=adapter.get("target_modules"))
    return record | predicted(ran)


def predicted(config: dict, model: Optional[str] = None) -> dict:
    """The planner's prediction for the same run config, as the trainer resolves it on this machine's GPU (an H100
    where there is none); shapes from `model` (a preset) when given, else from the config's model folder."""
    run = resolve(spec_from_dict(config), Hardware.planned(detect_gpu() or GPU_CATALOGUE["H100-80GB"]))
    estimate = training_estimate(run, model_shape(load_model_config(model or run.spec.model.path)))
    return {"predicted_peak_bytes": estimate.predicted_peak_bytes,
            "predicted_peak_allocated_bytes": estimate.predicted_peak_allocated_bytes,
            "predicted_breakdown": estimate.breakdown, "predicted_phase": estimate.phase,
            "fused_optimizer": run.fused_optimizer}


def gpu_need_gib(case: dict) -> float:
    """What a case may take of the GPU while others run beside it: its cap, else its prediction with headroom
    (the grid measures how far off the prediction is) plus the CUDA context."""
    cap = case.get("config", {}).get("training", {}).get("memory_cap_gib", 0)
    if cap:
        return cap
    config = run_config(Path(case["model"]), Path("synthetic.jsonl"), case, Path("out"))
    return 1.5 * predicted(config, case["model"])["predicted_peak_bytes"] / 2**30 + 1.0


class Scheduler:
    """Cases run side by side (each in its own process, so each has its own allocator and peak), as many at once as
    the GPU's memory allows by their needs; every model's random checkpoint is built once, before its first case,
    and deleted after its last when `cleanup` (a disk holds two or three 7B checkpoints)."""

    def __init__(self, cases: list[dict], gpu_gib: float, deadline: float, cleanup: bool):
        self.total_gib = self.free_gib = gpu_gib
        self.deadline, self.cleanup = deadline, cleanup
        self.condition = threading.Condition()
        self.checkpoints: dict[str, Future] = {}
        self.remaining = {model: sum(c["model"] == model for c in cases) for model in {c["model"] for c in cases}}
        self.builder = ThreadPoolExecutor(max_workers=1)

    def take(self, gib: float) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.free_gib >= gib)
            self.free_gib -= gib

    def give(self, gib: float) -> None:
        with self.condition:
            self.free_gib += gib
            self.condition.notify_all()

    def checkpoint(self, model: str) -> Path:
        with self.condition:
            if model not in self.checkpoints:
                self.checkpoints[model] = self.builder.submit(
                    random_checkpoint_in_subprocess, model, WORK / f"random-{Path(model).name}")
        return self.checkpoints[model].result()

    def done_with(self, model: str) -> None:
        with self.condition:
            self.remaining[model] -= 1
            last = self.remaining[model] == 0
        if last and self.cleanup:
            shutil.rmtree(WORK / f"random-{Path(model).name}", ignore_errors=True)

    def run(self, case: dict, timeout_s: int, slot: int) -> dict:
        need = min(gpu_need_gib(case), self.total_gib)
        late = {"name": case["name"], "error": "not run: the --deadline-s passed first"}
        try:
            if time.time() > self.deadline:  # before building a checkpoint, and again after waiting for memory
                return late
            model_dir = self.checkpoint(case["model"])
            self.take(need)
            try:
                if time.time() > self.deadline:
                    return late
                return measure_case(case, model_dir, int(min(timeout_s, self.deadline + 60 - time.time())), slot)
            except subprocess.TimeoutExpired:
                return {"name": case["name"], "error": "timed out"}
            finally:
                self.give(need)
        finally:
            self.done_with(case["model"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, type=Path, help="YAML list of {name, model, config}")
    parser.add_argument("--out", required=True, type=Path, help="JSONL file the results are appended to")
    parser.add_argument("--only", help="comma-separated case names to run")
    parser.add_argument("--timeout-s", type=int, default=300, help="per case")
    parser.add_argument("--parallel", type=int, default=1,
                        help="cases run side by side (memory only: their tokens/s are then not a speed figure)")
    parser.add_argument("--gpu-gib", type=float, default=70.0, help="GPU memory the cases running at once may take")
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="start no case after this many seconds (what is left is recorded as not run)")
    parser.add_argument("--cleanup", action="store_true", help="delete each random checkpoint after its last case")
    args = parser.parse_args()
    cases = [expanded(case) for case in yaml.safe_load(args.cases.read_text())]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    synthetic_data()  # written once, before cases read it side by side
    scheduler = Scheduler(cases, args.gpu_gib, time.time() + args.deadline_s, args.cleanup)
    lock = threading.Lock()

    def one(slot_and_case: tuple[int, dict]) -> None:
        slot, case = slot_and_case
        record = scheduler.run(case, args.timeout_s, slot) | {"concurrent": args.parallel > 1}
        with lock, open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items()
                              if k not in ("losses", "ran_config", "predicted_breakdown", "step_speeds")}), flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, enumerate(cases)))
    scheduler.builder.shutdown()


if __name__ == "__main__":
    main()
