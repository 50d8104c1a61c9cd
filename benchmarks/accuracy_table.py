"""Planner accuracy table: measured peaks (a JSONL from measure_training.py) beside the current planner's prediction.

The predictions are recomputed with the planner as it is in this checkout, so the table always shows the committed
model against the committed measurements: each record's run (the config the trainer ran, where the record carries it;
else the case's config with the choices the planner made where it chose) becomes a RunSpec, resolved for the H100
the grid ran on and estimated on the preset's shapes.

    python benchmarks/accuracy_table.py --results benchmarks/results/planner-accuracy-h100.jsonl \
        --cases benchmarks/cases/planner-accuracy.yaml --out benchmarks/results/planner-accuracy-h100.md
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_training import run_config  # noqa: E402

from qlora_trainer.hardware import GPU_CATALOGUE, Hardware  # noqa: E402
from qlora_trainer.planner.shapes import load_model_config, model_shape  # noqa: E402
from qlora_trainer.spec import RunSpec, resolve, spec_from_dict  # noqa: E402
from qlora_trainer.spec.resolve import CUDA_CONTEXT_BYTES  # noqa: E402
from qlora_trainer.training.gate import training_estimate  # noqa: E402

GIB = 2**30
MEASURED_ON = Hardware.planned(GPU_CATALOGUE["H100-80GB"])  # results/planner-accuracy-h100.*


def record_spec(case: dict, record: dict) -> RunSpec:
    """The run a record measured. spec_from_dict reads configs with keys since renamed (alpha, dropout)."""
    if "ran_config" in record:  # the config as the trainer ran it (after training.plan: auto)
        spec = spec_from_dict(record["ran_config"])
        values = {}
        if "loss_kernel" not in record["ran_config"]["training"]:  # before 2026-12-06: the chunked loss alone
            values["training.loss_kernel"] = "chunked"
        if record.get("compile_fell_back"):  # layers the compiler failed on ran eager (training/recipe.py)
            values["training.compile_layers"] = "off"
        return spec.with_values(values)
    spec = spec_from_dict(run_config(Path(case["model"]), Path("synthetic.jsonl"), case, Path("out")))
    # records from before 2026-11-23 carry no compile_layers: the trainer had no compiled layers then
    values = {"training.compile_layers": record.get("compile_layers", "off"), "training.loss_kernel": "chunked"}
    plan = record.get("plan")
    if plan:
        values.update({f"training.{k}": v for k, v in plan.items() if k not in ("rank", "target_modules")})
        values.update({"adapter.r": plan["rank"], "adapter.lora_alpha": 2.0 * plan["rank"],
                       "adapter.target_modules": plan["target_modules"], "training.plan": "off"})
    return spec.with_values(values)


def load_cases(paths: list[Path]) -> dict[str, dict]:
    """Every case of the YAML case files, by name."""
    return {case["name"]: case for path in paths for case in yaml.safe_load(path.read_text())}


def measured_records(results: Path) -> list[dict]:
    """The records of a results JSONL that measured a peak (not the timed-out or skipped ones), in their order."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("peak_reserved_bytes")]


def predicted(case: dict, record: dict) -> dict:
    """The planner's prediction for a record's run on the preset's architecture (the record's model)."""
    run = resolve(record_spec(case, record), MEASURED_ON)
    if not record.get("fused_optimizer"):  # records from before the fused AdamW ran torch's foreach AdamW
        run = dataclasses.replace(run, fused_optimizer=False)
    estimate = training_estimate(run, model_shape(load_model_config(case["model"])))
    return {"predicted_peak_bytes": estimate.predicted_peak_bytes, "predicted_phase": estimate.phase}


def table(records: list[dict], cases: dict[str, dict]) -> str:
    """One row per record (the last record of a case counts), then the summary: largest and median error."""
    latest = {record["name"]: record for record in records}
    lines = ["| case | documents | peak reserved GiB (measured) | predicted GiB | error | peak phase | use of the cap |",
             "|---|---|---:|---:|---:|---|---:|"]
    errors, uses = [], []
    for record in latest.values():
        prediction = predicted(cases[record["name"]], record)
        measured = record["peak_reserved_bytes"]
        error = prediction["predicted_peak_bytes"] / measured - 1
        errors.append(error)
        cap = record.get("ran_config", {}).get("training", {}).get("memory_cap_gib") or 0
        use = ""
        if cap:  # of what the cap leaves PyTorch's pool: the cap less the CUDA context (hardware.apply_memory_cap)
            uses.append(measured / (cap * GIB - CUDA_CONTEXT_BYTES))
            use = f"{uses[-1]:.1%} of {(cap * GIB - CUDA_CONTEXT_BYTES) / GIB:.2f} GiB"
        lines.append(f"| {record['name']} | {record.get('documents', '')} | {measured / GIB:.2f} "
                     f"| {prediction['predicted_peak_bytes'] / GIB:.2f} | {error:+.1%} | {prediction['predicted_phase']} "
                     f"| {use} |")
    worst = max(errors, key=abs)
    within = sum(abs(e) <= 0.05 for e in errors)
    lines += ["", f"{len(errors)} rows: largest error {worst:+.1%}, median |error| "
                  f"{statistics.median(abs(e) for e in errors):.1%}, {within} within 5%."]
    if uses:
        lines.append(f"Planned runs under a card's cap: {len(uses)}, none out of memory, using "
                     f"{min(uses):.1%} to {max(uses):.1%} of it.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, type=Path, help="JSONL written by measure_training.py")
    parser.add_argument("--cases", required=True, type=Path, nargs="+", help="the case files the results came from")
    parser.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = parser.parse_args()
    text = table(measured_records(args.results), load_cases(args.cases))
    if args.out:
        args.out.write_text(args.out.read_text().split("<!-- table -->")[0] + "<!-- table -->\n" + text
                            if args.out.exists() else text)
    print(text)


if __name__ == "__main__":
    main()
