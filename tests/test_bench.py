"""The benchmark harness in CPU mode: real training steps of each method on a tiny model, and the report files."""

import json
import sys
from argparse import Namespace

import pytest

from qlora_trainer.bench import run as bench_run
from qlora_trainer.bench.measure import measure, method_spec
from qlora_trainer.cli import main
from qlora_trainer.hardware import GpuSpec
from qlora_trainer.spec import Budget, resolve
from qlora_trainer.bench.report import chart_labels

ROW_KEYS = {"method", "status", "trainable_params", "optimizer_state_bytes", "peak_allocated_bytes",
            "peak_reserved_bytes", "tokens_per_second", "predicted_peak_bytes"}


def bench_args(model_dir, out_dir, methods: str) -> Namespace:
    return Namespace(model=str(model_dir), random_weights=False, seq_len=32, batch_size=1, methods=methods, rank=4,
                     targets="all-linear", steps=2, cap_gib=0.0, out=str(out_dir))


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_optimizer_state_bytes_are_adamws_two_fp32_moments_and_step(tiny_llama_dir, method):
    result = measure(method, method_spec(method, str(tiny_llama_dir), seq_len=16, micro_batch_size=1, rank=4, steps=2))
    trainable_tensors = 2 * 7 * 2 if method == "qlora" else 2 * 9 + 3  # A and B per target; or every weight
    # torch AdamW keeps exp_avg and exp_avg_sq in fp32 and a float32 `step` tensor per parameter
    assert result.optimizer_state_bytes == 8 * result.trainable_params + 4 * trainable_tensors
    assert result.gradient_bytes == result.trainable_params * 4
    assert result.peak_reserved_bytes is None and result.tokens_per_second > 0


def test_cpu_mode_writes_the_three_files(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["qlora-trainer", "bench", "--model", str(tiny_llama_dir), "--seq-len", "32",
                                      "--methods", "full,qlora", "--rank", "4", "--steps", "2", "--out", str(out)])
    assert main() == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu" and report["command"].startswith("qlora-trainer bench --model")
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"full", "qlora"} and all(ROW_KEYS <= set(row) for row in rows.values())
    assert all(row["status"] == "measured" and row["peak_reserved_bytes"] is None for row in rows.values())
    assert rows["qlora"]["trainable_params"] < rows["full"]["trainable_params"] / 10
    assert rows["qlora"]["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"] / 10
    markdown = (out / "report.md").read_text()
    assert "CPU run" in markdown and "| qlora | measured |" in markdown
    assert (out / "vram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_method_over_the_budget_is_estimated_never_measured(tiny_llama_dir, tmp_path, monkeypatch):
    """With a (pretend) GPU whose budget lies between what QLoRA's predicted peak and full fine-tuning's need."""
    model_config = bench_run.load_model_config(str(tiny_llama_dir))

    def peak(method):
        run = resolve(method_spec(method, str(tiny_llama_dir), 32, 1, rank=4, steps=2), bench_run.planned_hardware())
        return bench_run.method_estimate(model_config, run, method)[0].predicted_peak_bytes

    qlora_peak, full_peak = peak("qlora"), peak("full")
    assert qlora_peak < full_peak
    budget = (Budget.needed_for(qlora_peak) + Budget.needed_for(full_peak)) // 2
    monkeypatch.setattr(bench_run, "detect_gpu", lambda: GpuSpec("pretend GPU", budget, budget, True, (8, 0)))
    measured_methods = []

    def measure_here(method, spec, cap_gib, timeout_s):  # in this process: the same measurement, no subprocess
        measured_methods.append(method)
        return measure(method, spec).__dict__, ""

    monkeypatch.setattr(bench_run, "_measure_in_subprocess", measure_here)
    report = bench_run.run_bench(bench_args(tiny_llama_dir, tmp_path, "full,qlora"), "qlora-trainer bench")
    rows = {row.method: row for row in report.rows}
    assert measured_methods == ["qlora"]  # full was never run
    assert rows["full"].status == "estimated" and rows["full"].tokens_per_second is None
    assert rows["full"].peak_reserved_bytes is None and rows["full"].peak_allocated_bytes is None
    assert rows["full"].predicted_peak_bytes == full_peak and "not run" in rows["full"].note
    assert rows["qlora"].status == "measured"
    # the chart says where memory is the planner's: full was not run, qlora ran on the CPU (no VRAM to measure)
    assert chart_labels(report) == ["full\n(VRAM estimated)", "qlora\n(VRAM estimated)"]
    written = bench_run.write_report(report, tmp_path)
    markdown = written[0].read_text()
    assert "| full | estimated |" in markdown and "| qlora | measured |" in markdown
    full_line = next(line for line in markdown.splitlines() if line.startswith("| full |"))
    cells = [cell.strip() for cell in full_line.split("|")]
    assert cells[5] == "—" and cells[8] == "—"  # no measured peak, no speed
    # the reading judges a row that was not run by the rule that kept it from running, not by the raw budget
    usable = Budget("pretend GPU", budget).usable_bytes / 2**30
    expected = f"full (estimated) needs {full_peak / 2**30:.1f} GiB at its peak and does not fit the {usable:.1f} GiB"
    assert expected in markdown


def test_unknown_method_is_a_one_line_error(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["qlora-trainer", "bench", "--model", str(tiny_llama_dir), "--methods",
                                      "qlora,fast", "--out", str(tmp_path)])
    assert main() == 2
    err = capsys.readouterr().err.strip()
    assert "fast" in err and "qlora" in err and len(err.splitlines()) == 1
