"""What the command line shows its user: a line per logged step without the progress bar, eval losses, the closing
summary, no VRAM figures on the CPU, TensorBoard scalars equal to metrics.jsonl's, and a `--help` that loads no
heavy library."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_robustness import alpaca_file, base_raw, write_config  # noqa: F401  (alpaca_file: a fixture)

from qlora_trainer import __version__
from qlora_trainer.cli import main
from qlora_trainer.training.reporting import TENSORBOARD_DIR, step_line


@pytest.fixture(scope="module")
def logged_run(tiny_llama_dir, alpaca_file, tmp_path_factory):
    """A four-step run logged every second step, evaluated every second step, with TensorBoard; its stdout."""
    out = tmp_path_factory.mktemp("terminal") / "out"
    raw = base_raw(tiny_llama_dir, alpaca_file, out, max_steps=4, logging_steps=2, eval_steps=2, save_steps=0)
    raw["data"]["eval_fraction"] = 0.2
    raw["output"]["tensorboard"] = True
    with pytest.MonkeyPatch.context() as patch:  # capsys is per test; this run is shared by the module's tests
        stdout = io.StringIO()
        patch.setattr(sys, "stdout", stdout)
        assert main(["train", "--config", str(write_config(out.parent, raw)), "--no-progress"]) == 0
    return out, stdout.getvalue()


def test_without_the_bar_each_logged_step_eval_and_a_summary_are_printed(logged_run):
    out, text = logged_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = text.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert step_lines == [step_line(r, 4) for r in records if "loss" in r]  # steps 2 and 4, as metrics.jsonl
    assert [line.split()[1] for line in step_lines] == ["2/4", "4/4"]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert [line for line in lines if line.startswith("eval at")] == [
        f"eval at step {step}: loss {loss:.4f}" for step, loss in zip((2, 4), evals)]
    done = next(line for line in lines if line.startswith("done: "))
    assert done.startswith(f"done: 4 steps, last loss {records[-1]['loss']:.4f}, eval loss {evals[-1]:.4f}")
    assert "vram" not in text.lower()  # the CPU has no VRAM to report
    assert lines[-1] == f"adapter: {out / 'adapter'}"


def test_tensorboard_holds_the_logged_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/learning_rate", "learning_rate")):
        logged = [(r["step"], r[key]) for r in records if key in r]
        shown = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in shown] == [step for step, _ in logged]
        # TensorBoard stores float32: equal within half a float32 ulp, 2^-24 relative
        assert [value for _, value in shown] == pytest.approx([value for _, value in logged], rel=2**-24)
    assert "memory/peak_reserved_gib" not in events.Tags()["scalars"]  # no VRAM on the CPU


def test_a_step_line_shows_vram_only_where_there_is_some():
    record = {"step": 3, "loss": 1.23456, "learning_rate": 3e-3, "grad_norm": 0.5, "tokens_per_second": 1234.4}
    assert step_line(record, 10) == "step 3/10  loss 1.2346  lr 3.00e-03  grad 0.5  1,234 tok/s"
    gpu = step_line(record | {"peak_vram_bytes": 5 * 2**30}, 10)
    assert gpu.endswith("vram 5.00 GiB")


def test_an_unused_run_folder_gets_no_tensorboard_files(tiny_llama_dir, alpaca_file, tmp_path: Path):
    out = tmp_path / "out"
    assert main(["train", "--config", str(write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out,
                                                                           max_steps=1))), "--no-progress"]) == 0
    assert not (out / TENSORBOARD_DIR).exists()


def test_help_and_version_load_no_heavy_library():
    """`--help` answers from argparse alone (benchmarks/help_latency.py measures it): nothing imports torch,
    transformers or bitsandbytes before a subcommand runs."""
    code = ("import sys\nfrom qlora_trainer.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'peft') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "qlora_trainer", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"qlora-trainer {__version__}"


def test_a_run_prints_no_third_party_noise_unless_verbose(tiny_llama_dir, alpaca_file, tmp_path: Path):
    """Library warnings, log records and progress bars stay out of a run's output; --verbose lets them through."""
    config = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, tmp_path / "out", max_steps=1))

    def stderr(*flags: str) -> str:
        command = [sys.executable, "-m", "qlora_trainer", *flags, "train", "--config", str(config), "--no-progress",
                   "--overwrite"]
        process = subprocess.run(command, capture_output=True, text=True)
        assert process.returncode == 0, process.stderr
        return process.stderr

    noise = ("Warning", "warnings.warn", "Loading weights", "it/s]")
    assert not [line for line in stderr().splitlines() if any(mark in line for mark in noise)]
    assert any(mark in stderr("--verbose") for mark in noise)  # the libraries do speak; we only keep them quiet


def test_a_reader_that_stops_early_gets_no_traceback():
    """`plan-memory ... | head -1`: the command's remaining output has nowhere to go; it stops quietly."""
    command = f"{sys.executable} -m qlora_trainer plan-memory --model llama-2-7b --gpu T4 | head -1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("llama-2-7b on T4") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
