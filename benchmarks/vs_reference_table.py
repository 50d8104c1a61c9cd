"""Markdown tables from vs_reference.py's JSONL: each of our stacks beside the plain stack and Unsloth of the same run.

    python benchmarks/vs_reference_table.py llama-speed.jsonl qwen-speed.jsonl llama-longest.jsonl

Ratios are taken within one file (one invocation, one GPU); the loss column is the largest gap, over the steps,
between a stack's losses and the plain stack's on the same tokens. The planner column is recomputed by the planner
in this checkout (model presets from qlora_trainer/presets/), so it always shows the current model against
measurements.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_reference import OURS, ours_config  # noqa: E402

GIB = 2**30


def _ratio(ours: Optional[float], theirs: Optional[float]) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else ""


def _gib(value: Optional[int]) -> str:
    return f"{value / GIB:.2f}" if value else ""


def planner_prediction(record: dict) -> Optional[int]:
    """The current planner's peak reserved bytes for one of our stacks' speed records: the stack's run config
    (vs_reference.ours_config) on the record's model preset, resolved for an H100, where the records were measured
    (any bf16 GPU with Triton gives the same bytes)."""
    if record["stack"] not in OURS:
        return None
    from qlora_trainer.hardware import GPU_CATALOGUE, Hardware
    from qlora_trainer.planner.memory import estimate_memory
    from qlora_trainer.planner.shapes import load_model_config
    from qlora_trainer.spec import resolve, spec_from_dict

    config = ours_config(Path(record["model"]), Path("synthetic.jsonl"), record["seq_len"], 1, OURS[record["stack"]],
                         Path("out"))
    run = resolve(spec_from_dict(config), Hardware.planned(GPU_CATALOGUE["H100-80GB"]))
    return estimate_memory(load_model_config(record["model"]), run).predicted_peak_bytes


def speed_table(records: list[dict]) -> list[str]:
    by_stack = {r["stack"]: r for r in records if "error" not in r and "skipped" not in r}
    plain, unsloth = by_stack.get("plain", {}), by_stack.get("unsloth", {})
    lines = ["| stack | tokens/s | peak reserved GiB | peak allocated GiB | planner: reserved GiB (error) "
             "| speed vs Unsloth, plain | reserved vs Unsloth | max loss gap to plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        stack = record["stack"]
        if "error" in record or "skipped" in record:
            lines.append(f"| {stack} | {record.get('error') or record.get('skipped')} | | | | | | |")
            continue
        speed, reserved = record["tokens_per_second"], record["peak_reserved_bytes"]
        predicted = planner_prediction(record)
        planner = f"{_gib(predicted)} ({100 * (predicted - reserved) / reserved:+.1f}%)" if predicted else ""
        gap = ""
        if plain.get("losses") and record.get("losses"):
            gap = f"{max(abs(a - b) for a, b in zip(record['losses'], plain['losses'])):.4f}"
        ratios = ", ".join(filter(None, [_ratio(speed, unsloth.get("tokens_per_second")),
                                         _ratio(speed, plain.get("tokens_per_second"))]))
        lines.append(f"| {stack} | {speed:,.0f} | {_gib(reserved)} | {_gib(record['peak_allocated_bytes'])} | "
                     f"{planner} | {ratios if stack.startswith('ours') else ''} | "
                     f"{_ratio(reserved, unsloth.get('peak_reserved_bytes')) if stack.startswith('ours') else ''} "
                     f"| {gap if stack != 'plain' else ''} |")
    return lines


def longest_table(records: list[dict]) -> list[str]:
    lines = ["| stack | longest trainable sequence | searched up to | cap GiB |", "|---|---:|---:|---:|"]
    for record in records:
        if "error" in record or "skipped" in record:
            lines.append(f"| {record['stack']} | {record.get('error') or record.get('skipped')} | | |")
            continue
        longest = f"{record['longest_seq_len']:,}"
        if record["longest_seq_len"] >= record["searched_up_to"]:
            longest += " or more"
        lines.append(f"| {record['stack']} | {longest} | {record['searched_up_to']:,} | "
                     f"{record['cap_gib']:g} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSONL files written by vs_reference.py --out")
    args = parser.parse_args()
    for path in args.results:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first = records[0]
        mode = first["mode"]
        where = f"seq {first['seq_len']:,}" if mode == "speed" else f"under {first.get('cap_gib', 0):g} GiB"
        print(f"### {first.get('model')}, {mode}, {where} ({path.name}; {first.get('device', '?')})\n")
        print("\n".join(speed_table(records) if mode == "speed" else longest_table(records)) + "\n")


if __name__ == "__main__":
    main()
