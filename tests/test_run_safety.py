"""Never losing a run: resume only under the config and data it trained with, --overwrite that keeps the earlier run
until the new one has a checkpoint, one run per folder, and no silent restart over corrupt checkpoints."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_trainer.cli import main
from qlora_trainer.engine import loss as forward_module  # LossModule runs the step's causal_lm_loss
from qlora_trainer.training.checkpoints import CHECKPOINTS
from qlora_trainer.training.run_lock import LOCK
from test_robustness import ROWS, base_raw, file_hashes, write_config

ASIDE = ".replaced-run"


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _train(config_path: Path, *extra: str) -> int:
    return main(["train", "--config", str(config_path), "--no-progress", *extra])


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _cut_after(run_dir: Path, step: int) -> None:
    """The folder as a run that died right after its checkpoint of `step` left it."""
    for folder in (run_dir / CHECKPOINTS).iterdir():
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    shutil.rmtree(run_dir / "adapter")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# --- resume: what may change ---------------------------------------------------------------------------------

def test_resume_with_changed_logging_and_checkpointing_gives_the_unbroken_run(tiny_llama_dir, alpaca_file, tmp_path,
                                                                             capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train(write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, full, max_steps=6, save_steps=3))) == 0
    shutil.copytree(full, cut)
    _cut_after(cut, 3)
    changed = base_raw(tiny_llama_dir, alpaca_file, cut, max_steps=6, save_steps=1, save_total_limit=4,
                       logging_steps=1, eval_steps=2, max_bad_steps=2)
    capsys.readouterr()
    assert _train(write_config(tmp_path, changed), "--resume") == 0
    out = capsys.readouterr().out
    assert ("resume: changes that do not change what is trained: training.save_steps 3 -> 1; "
            "training.save_total_limit 10 -> 4; training.eval_steps 0 -> 2; training.max_bad_steps 5 -> 2") in out
    assert all(torch.equal(a, b) for a, b in zip(_adapter(full).values(), _adapter(cut).values()))
    assert json.loads((cut / "run_config.json").read_text())["training"]["save_steps"] == 1  # the run as it now runs


def test_resume_may_change_how_a_step_is_computed_and_lengthen_a_constant_schedule(tiny_llama_dir, alpaca_file,
                                                                                   tmp_path, capsys):
    """What the out-of-memory advice asks for (a smaller micro-batch with more accumulation, recomputation) and a
    longer run where the schedule does not depend on its length."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    raw = base_raw(tiny_llama_dir, alpaca_file, full, max_steps=6, save_steps=3, lr_scheduler="constant")
    raw["adapter"]["dropout"] = 0.0  # no random masks, so the numbers may be compared
    assert _train(write_config(tmp_path, raw)) == 0
    shutil.copytree(full, cut)
    _cut_after(cut, 3)
    raw["output"]["dir"] = str(cut)
    raw["training"] |= {"max_steps": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                        "gradient_checkpointing": False, "loss_chunk_tokens": 16}
    capsys.readouterr()
    assert _train(write_config(tmp_path, raw), "--resume") == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert len(note) == 1 and "training.max_steps 6 -> 8" in note[0] and "training.micro_batch_size 4 -> 2" in note[0]
    reference, resumed = _losses(full), _losses(cut)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([reference[s] for s in (4, 5, 6)], rel=1e-2)


def test_plan_auto_resume_compares_the_planners_choices(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    """The saved config holds the planner's choices. A tighter GPU where the planner only adds recomputation
    resumes; one where it lowers the rank (reached here with --force) would train another adapter: refused,
    saying the planner chose it."""
    from qlora_trainer.training import recipe
    from test_train import _pretend_gpu

    out = tmp_path / "out"
    config_path = write_config(tmp_path, {"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(alpaca_file)},
                                          "adapter": {"type": "lora"}, "output": {"dir": str(out)},
                                          "training": {"max_steps": 1, "max_seq_len": 96, "plan": "auto"}})
    monkeypatch.setattr(recipe, "detect_hardware", lambda: _pretend_gpu(2 * 2**30))
    assert _train(config_path) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["adapter"]["r"], saved["training"]["gradient_checkpointing"]) == (32, False)  # the planner's
    monkeypatch.setattr(recipe, "detect_hardware", lambda: _pretend_gpu(874 * 2**20))
    capsys.readouterr()
    assert _train(config_path, "--resume") == 0
    assert "training.gradient_checkpointing False -> True" in capsys.readouterr().out
    before = file_hashes(out)
    monkeypatch.setattr(recipe, "detect_hardware", lambda: _pretend_gpu(850 * 2**20))
    assert _train(config_path, "--resume", "--force") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "adapter.r 32 -> 8 (the planner's choice for this GPU" in err and "adapter.target_modules" in err
    assert file_hashes(out) == before


def test_resume_refuses_data_edited_in_place(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, data, out, max_steps=2, save_steps=1))
    assert _train(config_path) == 0
    data.write_text("".join(json.dumps(row | {"output": "0"}) + "\n" for row in ROWS))  # same path, other answers
    before = file_hashes(out)
    assert _train(config_path, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.path: the training examples differ from those the run in")
    assert file_hashes(out) == before


# --- --overwrite keeps the earlier run until the new one has a checkpoint --------------------------------------

@pytest.fixture
def earlier(tiny_llama_dir, alpaca_file, tmp_path) -> Path:
    """A finished two-step run in tmp_path/out."""
    out = tmp_path / "out"
    assert _train(write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, max_steps=2))) == 0
    return out


def _hook_first_loss(monkeypatch, action) -> None:
    real, calls = forward_module.causal_lm_loss, []

    def hooked(causal_lm, batch, chunk_tokens, fused=False):
        calls.append(1)
        if len(calls) == 1:
            action()
        return real(causal_lm, batch, chunk_tokens, fused)

    monkeypatch.setattr(forward_module, "causal_lm_loss", hooked)


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_earlier_run_back(tiny_llama_dir, alpaca_file,
                                                                                   tmp_path, earlier, monkeypatch,
                                                                                   capsys):
    before = file_hashes(earlier)

    def out_of_memory():
        assert not (earlier / "adapter").exists() and (earlier / ASIDE / "adapter").is_dir()  # moved, not deleted
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    _hook_first_loss(monkeypatch, out_of_memory)
    raw = base_raw(tiny_llama_dir, alpaca_file, earlier, max_steps=4, learning_rate=1e-3)
    assert _train(write_config(tmp_path, raw), "--overwrite") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "the earlier run in" in err[-2] and "is kept" in err[-2] and "out of GPU memory at step 1" in err[-1]
    assert file_hashes(earlier) == before
    assert not (earlier / ASIDE).exists()


def test_overwrite_drops_the_earlier_run_at_its_first_checkpoint(tiny_llama_dir, alpaca_file, tmp_path, earlier,
                                                                monkeypatch):
    seen = {}
    _hook_first_loss(monkeypatch, lambda: seen.update(aside=(earlier / ASIDE / "adapter").is_dir()))
    raw = base_raw(tiny_llama_dir, alpaca_file, earlier, max_steps=3, save_steps=0)
    assert _train(write_config(tmp_path, raw), "--overwrite") == 0
    assert seen == {"aside": True}
    assert not (earlier / ASIDE).exists()
    assert [p.name for p in (earlier / CHECKPOINTS).iterdir()] == ["step-0000003"]  # the new run's only
    assert sorted(_losses(earlier)) == [1, 2, 3]


def test_overwrite_killed_before_its_first_checkpoint_is_undone_at_the_next_start(tiny_llama_dir, alpaca_file,
                                                                                 tmp_path, earlier, capsys):
    before = file_hashes(earlier)
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, earlier, max_steps=200, save_steps=0))
    process = subprocess.Popen([sys.executable, "-m", "qlora_trainer", "train", "--config", str(config_path),
                                "--no-progress", "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ((earlier / ASIDE).is_dir() and (earlier / "metrics.jsonl").is_file()):  # the new run is stepping
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.kill()
    process.communicate(timeout=60)
    assert _train(config_path) == 2  # no flags: refused, after the earlier run is put back
    err = capsys.readouterr().err.strip().splitlines()
    assert "is back in place" in err[-2] and "already holds a run" in err[-1]
    assert file_hashes(earlier) == before and not (earlier / ASIDE).exists()


def test_overwrite_comes_before_resume_auto(tiny_llama_dir, alpaca_file, tmp_path, earlier):
    raw = base_raw(tiny_llama_dir, alpaca_file, earlier, max_steps=3, resume="auto", learning_rate=1e-3)
    assert _train(write_config(tmp_path, raw), "--overwrite") == 0
    assert sorted(_losses(earlier)) == [1, 2, 3]


# --- one run per folder -------------------------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from qlora_trainer.training.run_lock import hold_run_folder
with hold_run_folder(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_second_run_is_refused_naming_the_holder(tiny_llama_dir, alpaca_file, tmp_path, earlier, capsys, flag):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(earlier)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = file_hashes(earlier)
        config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, earlier, max_steps=2))
        assert _train(config_path, flag) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: output.dir:") and "is in use by another run" in err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err
        assert file_hashes(earlier) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_runs_lock_is_taken_over(tiny_llama_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, max_steps=8, save_steps=2))
    process = subprocess.Popen([sys.executable, "-m", "qlora_trainer", "train", "--config", str(config_path),
                                "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / CHECKPOINTS / "step-0000002" / "manifest.json").is_file():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)  # alive and holding the folder, for as long as the test needs
    assert _train(config_path, "--resume") == 2
    assert f"is in use by another run (pid {process.pid}" in capsys.readouterr().err
    process.kill()
    process.communicate(timeout=60)
    assert _train(config_path, "--resume") == 0  # the kernel dropped the dead run's lock
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert sorted(_losses(out)) == list(range(1, 9))


# --- corrupt checkpoints -------------------------------------------------------------------------------------

def test_resume_over_only_corrupt_checkpoints_is_refused_naming_them(tiny_llama_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, max_steps=3, save_steps=1))
    assert _train(config_path) == 0
    root = out / CHECKPOINTS
    weights = root / "step-0000003" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / "step-0000002" / "manifest.json").unlink()
    (root / "step-0000001" / "optimizer.pt").unlink()
    before = file_hashes(out)
    capsys.readouterr()
    assert _train(config_path, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: resume: no checkpoint") and "--overwrite" in err
    for named in ("step-0000003: checksum mismatch in adapter/adapter_model.safetensors",
                  "step-0000002: no manifest", "step-0000001: missing optimizer.pt"):
        assert named in err
    assert file_hashes(out) == before
    assert _train(config_path, "--overwrite") == 0  # starting over is asked for by name
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002", "step-0000003"]


def test_resume_may_change_whether_keys_are_recomputed():
    """training.recompute_keys gives the same bits (tests/test_chunked_attention.py), so a resume where it changes (a
    plan on a smaller card) is allowed, and a run_config.json written before the key existed compares as its default."""
    from qlora_trainer.spec import RunSpec, spec_to_dict
    from qlora_trainer.training.resume_rules import compare_for_resume

    saved = spec_to_dict(RunSpec())
    changed = compare_for_resume(saved, RunSpec().with_values({"training.recompute_keys": True}))
    assert changed.allowed == ["training.recompute_keys False -> True"] and not changed.refused
    del saved["training"]["recompute_keys"]
    older = compare_for_resume(saved, RunSpec())
    assert not older.allowed and not older.refused
