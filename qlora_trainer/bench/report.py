"""Write the VRAM comparison report: report.md (table + reading), report.json (every figure), vram.png (chart)."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlora_trainer.spec.resolve import Budget  # noqa: E402

GIB = 2**30
PARTS = ("weights", "gradients", "optimizer", "activations", "other")
COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#c44e52", "activations": "#55a868",
          "other": "#8c8c8c"}


@dataclass
class BenchRow:
    method: str
    status: str  # "measured" (a real run on this device) or "estimated" (the planner's prediction)
    trainable_params: int
    optimizer_state_bytes: int
    peak_allocated_bytes: Optional[int]
    peak_reserved_bytes: Optional[int]
    tokens_per_second: Optional[float]
    predicted_peak_bytes: int
    weight_bytes: int
    gradient_bytes: int
    parts_bytes: dict[str, int] = field(default_factory=dict)  # the chart's stack: PARTS -> bytes
    note: str = ""


@dataclass
class BenchReport:
    model: str
    seq_len: int
    micro_batch_size: int
    device: str
    budget_bytes: Optional[int]  # the card's usable memory, or --cap-gib
    date: str
    command: str
    versions: dict[str, str]
    rows: list[BenchRow]


def _gib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def human_bytes(value: int) -> str:
    """GiB for large figures, MiB for the small ones a tiny model gives."""
    return f"{value / GIB:.2f} GiB" if value >= GIB // 4 else f"{value / 2**20:.2f} MiB"


def _ratio(full: Optional[int], value: Optional[int]) -> str:
    if not full or not value:
        return "—"
    return f"{full / value:.1f}x"


def markdown(report: BenchReport) -> str:
    baseline = next((r for r in report.rows if r.method == "full"), report.rows[0])
    base_peak = baseline.peak_reserved_bytes or baseline.predicted_peak_bytes
    lines = [
        f"# VRAM comparison: {report.model}, seq {report.seq_len}, micro-batch {report.micro_batch_size}",
        "",
        f"Device: {report.device}. Budget: {_gib(report.budget_bytes)} GiB. Date: {report.date}.",
        f"Command: `{report.command}`",
        "",
        "Rows marked *estimated* were not run (the planner predicted they would not fit the budget, or they ran "
        "out of memory); their figures are the planner's predictions. *Measured* rows come from real training "
        "steps.",
    ]
    if report.device == "cpu":
        lines += ["", "**CPU run**: parameter counts, optimizer-state bytes and tokens/s are measured on the CPU; "
                  "there is no VRAM to measure, so the only memory figures are the planner's predictions."]
    lines += [
        "",
        "| method | status | trainable params | optimizer states | peak reserved GiB | peak allocated GiB "
        "| predicted peak GiB | tokens/s | optimizer-state saving | peak VRAM saving |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        peak = row.peak_reserved_bytes or row.predicted_peak_bytes
        tps = "—" if row.tokens_per_second is None else f"{row.tokens_per_second:,.0f}"
        lines.append(
            f"| {row.method} | {row.status} | {row.trainable_params:,} | {human_bytes(row.optimizer_state_bytes)} "
            f"| {_gib(row.peak_reserved_bytes)} | {_gib(row.peak_allocated_bytes)} | {_gib(row.predicted_peak_bytes)} "
            f"| {tps} | {_ratio(baseline.optimizer_state_bytes, row.optimizer_state_bytes)} "
            f"| {_ratio(base_peak, peak)} |"
        )
    lines += ["", "Savings are ratios against `" + baseline.method + "` (its measured peak where measured, "
              "else its estimate).", "", "## Reading", ""]
    lines += [f"- {sentence}" for sentence in reading(report)]
    return "\n".join(lines) + "\n"


def reading(report: BenchReport) -> list[str]:
    """A few plain sentences on what the table says."""
    by_method = {row.method: row for row in report.rows}
    sentences = []
    full = by_method.get("full")
    qlora = by_method.get("qlora")
    if full and qlora:
        sentences.append(
            f"QLoRA keeps {human_bytes(qlora.optimizer_state_bytes)} of optimizer state against "
            f"{human_bytes(full.optimizer_state_bytes)} for full fine-tuning "
            f"({full.optimizer_state_bytes / max(qlora.optimizer_state_bytes, 1):,.0f}x less): only the adapters "
            "have AdamW moments."
        )
    budget = Budget(report.device, report.budget_bytes) if report.budget_bytes is not None else None
    for row in report.rows:
        if budget is None:
            continue
        if row.peak_reserved_bytes:  # it ran: its measured peak against the budget itself
            verdict = "fits" if row.peak_reserved_bytes <= budget.budget_bytes else "does not fit"
            sentences.append(f"{row.method} ({row.status}) needs {row.peak_reserved_bytes / GIB:.1f} GiB at its peak "
                             f"and {verdict} the {budget.budget_bytes / GIB:.1f} GiB budget.")
        else:  # predicted: the rule `train` applies, the margin and the CUDA context left out of the budget
            verdict = "fits" if budget.fits(row.predicted_peak_bytes) else "does not fit"
            sentences.append(f"{row.method} ({row.status}) needs {row.predicted_peak_bytes / GIB:.1f} GiB at its "
                             f"peak and {verdict} the {budget.usable_bytes / GIB:.1f} GiB that the "
                             f"{budget.budget_bytes / GIB:.1f} GiB budget leaves after the safety margin and the "
                             "CUDA context.")
    lora = by_method.get("lora")
    if lora and qlora and lora.peak_reserved_bytes and qlora.peak_reserved_bytes:
        sentences.append(f"The 4-bit base saves {(lora.weight_bytes - qlora.weight_bytes) / GIB:.1f} GiB of weights "
                         f"over the 16-bit LoRA base; peak {lora.peak_reserved_bytes / GIB:.1f} -> "
                         f"{qlora.peak_reserved_bytes / GIB:.1f} GiB.")
    return sentences


def chart_labels(report: BenchReport) -> list[str]:
    """Each bar's label: the method and whether its memory was measured (a GPU run) or is the planner's estimate
    (not run, or run on the CPU, where there is no VRAM to measure)."""
    return [f"{r.method}\n(VRAM {'measured' if r.peak_reserved_bytes else 'estimated'})" for r in report.rows]


def chart(report: BenchReport, path: Path) -> None:
    """Stacked bars per method (weights, gradients, optimizer, activations, other) and a line at the budget; the
    bars of estimated memory hatched."""
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(report.rows)), 4.5))
    names = chart_labels(report)
    bottoms = [0.0] * len(report.rows)
    for part in PARTS:
        heights = [r.parts_bytes.get(part, 0) / GIB for r in report.rows]
        axes.bar(names, heights, bottom=bottoms, label=part, color=COLORS[part],
                 hatch=None, edgecolor="white")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for index, row in enumerate(report.rows):
        if not row.peak_reserved_bytes:
            axes.bar(names[index], bottoms[index], fill=False, hatch="//", edgecolor="#333333", linewidth=0)
    if report.budget_bytes:
        axes.axhline(report.budget_bytes / GIB, color="black", linestyle="--", linewidth=1,
                     label=f"budget {report.budget_bytes / GIB:.1f} GiB")
    axes.set_ylabel("peak GPU memory (GiB)")
    axes.set_title(f"{report.model}, seq {report.seq_len}, micro-batch {report.micro_batch_size} — {report.device}",
                   fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: BenchReport, out_dir: Path) -> list[Path]:
    """report.md, report.json and vram.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = out_dir / "report.md", out_dir / "report.json", out_dir / "vram.png"
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(asdict(report), indent=1))
    chart(report, png_path)
    return [md_path, json_path, png_path]
