"""Several processes (torchrun, gloo on the CPU) on the tiny NF4 Llama: DDP and FSDP2 take the step one process
would take over the same examples, rank 0 alone writes, and a killed run, DDP or FSDP, resumes to the unbroken one's
adapter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_trainer.errors import UserError
from qlora_trainer.spec import spec_from_dict
from qlora_trainer.training.recipe import train

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(8)]
STEPS = 8


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def raw_config(model_dir: Path, data_path: Path, out_dir: Path, **training) -> dict:
    # dropout 0: a process's dropout masks would differ from a single process's, and the runs must be comparable;
    # fp32 compute: bf16 matmuls over differently padded batches would round apart by ~1e-3, hiding any real error
    training = {"max_steps": STEPS, "learning_rate": 5e-3, "micro_batch_size": 1, "gradient_accumulation_steps": 2,
                "max_seq_len": 96, "save_steps": 2, "save_total_limit": 10, "logging_steps": 1,
                "lr_scheduler": "cosine", "warmup_steps": 1, **training}
    return {"model": {"path": str(model_dir)}, "data": {"path": str(data_path), "format": "alpaca"},
            "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
            "quantization": {"compute_dtype": "float32"}, "training": training, "output": {"dir": str(out_dir)}}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# accelerate's multi-GPU launcher, which starts torchrun's processes; on a machine without GPUs they train on the CPU
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _torchrun(raw: dict, folder: Path, *extra: str, launcher: list[str] = TORCHRUN) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m qlora_trainer train` as users launch it (or `launcher`), in an empty working
    folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.yaml"
    config.write_text(json.dumps(raw))
    workdir = folder / "cwd"
    workdir.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([*launcher, "-m", "qlora_trainer", "train", "--config", str(config), "--no-progress", *extra],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to fp32 rounding: the runs sum the same per-token losses in another order (an all-reduce of partial
    sums), a few fp32 ulps (~1e-7 relative) of each gradient. Adam passes that on as ~1e-7 of each weight tensor
    (measured: <= 1.3e-6 over 8 steps), except where an element's gradient is itself near zero (lora_A while lora_B
    is still ~0): Adam normalises each element's step to ~lr, so there rounding moves the step by up to ~1e-5 of the
    largest weight (measured 1.6e-5). Hence 1e-5 of the tensor's norm and 1e-4 of its largest weight; a wrong
    example, a lost micro-batch or a loss scaled by the world size moves weights by more than 1e-2 of them."""
    assert a.keys() == b.keys()
    for key in a:
        difference = a[key] - b[key]
        assert float(difference.norm()) <= 1e-5 * float(a[key].norm()), key
        assert float(difference.abs().max()) <= 1e-4 * float(a[key].abs().max()), key


@pytest.fixture(scope="module")
def ddp_run(tiny_llama_dir, alpaca_file, tmp_path_factory) -> tuple[Path, str]:
    """An unbroken 2-process DDP run: micro-batch 1, accumulation 2, so 4 examples per step."""
    folder = tmp_path_factory.mktemp("ddp")
    out = folder / "out"
    stdout = _finish(_torchrun(raw_config(tiny_llama_dir, alpaca_file, out), folder))
    return out, stdout


def test_two_ddp_processes_take_the_step_of_one_process_with_twice_the_micro_batch(tiny_llama_dir, alpaca_file,
                                                                                   tmp_path, ddp_run):
    out, _ = ddp_run
    single = tmp_path / "single"
    train(spec_from_dict(raw_config(tiny_llama_dir, alpaca_file, single, micro_batch_size=2)), show_progress=False)
    assert_same_weights(_adapter(single), _adapter(out))
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (single, out)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # the global loss, not rank 0's half


def test_rank_0_alone_writes_and_prints(ddp_run):
    out, stdout = ddp_run
    assert sorted(p.name for p in out.iterdir()) == [".lock", "adapter", "checkpoints", "data_fingerprint.json",
                                                     "metrics.jsonl", "run_config.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:07d}" for s in range(2, STEPS + 1, 2)]
    assert not list((out.parent / "cwd").iterdir())  # nothing written where the processes ran
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once
    assert stdout.count("trainable params:") == 1 and stdout.count("done:") == 1
    assert json.loads((out / "data_fingerprint.json").read_text())["world_size"] == 2


def test_a_resume_with_another_world_size_is_refused(tiny_llama_dir, alpaca_file, ddp_run):
    out, _ = ddp_run
    before = _adapter(out)
    with pytest.raises(UserError, match=r"trained with 2 processes \(world size\) and this launch has 1"):
        train(spec_from_dict(raw_config(tiny_llama_dir, alpaca_file, out)), resume=True, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in _adapter(out).items())


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _kill_a_rank_then_resume(raw: dict, folder: Path) -> Path:
    """Start `raw` on 2 processes, SIGKILL one once the step-2 checkpoint exists, then resume it to the end."""
    out = Path(raw["output"]["dir"])
    process = _torchrun(raw, folder)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000002").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0  # torchrun stopped the other rank too
    assert not (out / "adapter").exists(), "the run ended before the kill; nothing was tested"
    stdout = _finish(_torchrun(raw, folder, "--resume"))
    assert "resumed from" in stdout
    return out


def test_a_rank_killed_mid_run_resumes_to_the_unbroken_runs_adapter(tiny_llama_dir, alpaca_file, tmp_path, ddp_run):
    out = _kill_a_rank_then_resume(raw_config(tiny_llama_dir, alpaca_file, tmp_path / "out"), tmp_path)
    assert_same_weights(_adapter(ddp_run[0]), _adapter(out))


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama_dir, alpaca_file, tmp_path_factory) -> Path:
    """An unbroken 2-process FSDP run, checkpointed every 2 steps as the DDP run is."""
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "out"
    _finish(_torchrun(raw_config(tiny_llama_dir, alpaca_file, out, distributed="fsdp"), folder))
    return out


def test_fsdp_two_processes_train_as_ddp_and_save_a_plain_peft_adapter(ddp_run, fsdp_run):
    assert_same_weights(_adapter(ddp_run[0]), _adapter(fsdp_run))
    config = json.loads((fsdp_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_fsdp_with_token_chunks_trains_as_ddp_without(tiny_llama_dir, alpaca_file, tmp_path, ddp_run):
    """The MLPs and the final norm 4 tokens at a time (engine/token_chunks.py), each chunk recomputed in backward:
    under FSDP the final norm's weight is the root's, not a layer's, and must be whole when its chunks recompute."""
    out = tmp_path / "out"
    _finish(_torchrun(raw_config(tiny_llama_dir, alpaca_file, out, distributed="fsdp", mlp_chunk_tokens=4), tmp_path))
    assert_same_weights(_adapter(ddp_run[0]), _adapter(out))


def _adam_moments(checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """exp_avg of each parameter in the checkpoint's optimizer.pt, named by `names` in the optimizer's order."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return {name: saved["state"][key]["exp_avg"] for name, key in zip(names, saved["param_groups"][0]["params"])}


def test_an_fsdp_checkpoint_holds_the_whole_optimizer_state(ddp_run, fsdp_run):
    step_2 = Path("checkpoints") / "step-0000002"
    fsdp_names = torch.load(fsdp_run / step_2 / "optimizer.pt", weights_only=True)["param_groups"][0]["params"]
    fsdp, ddp = _adam_moments(fsdp_run / step_2, fsdp_names), _adam_moments(ddp_run[0] / step_2, fsdp_names)
    assert len(fsdp) == len(_adapter(fsdp_run)) == 28  # 2 layers x 7 projections x (lora_A, lora_B)
    assert {name: m.shape for name, m in fsdp.items()} == {name: m.shape for name, m in ddp.items()}  # not shards
    assert_same_weights(ddp, fsdp)


def test_an_fsdp_rank_killed_mid_run_resumes_to_the_unbroken_runs_adapter(tiny_llama_dir, alpaca_file, tmp_path,
                                                                          fsdp_run):
    raw = raw_config(tiny_llama_dir, alpaca_file, tmp_path / "out", distributed="fsdp")
    assert_same_weights(_adapter(fsdp_run), _adapter(_kill_a_rank_then_resume(raw, tmp_path)))


def test_accelerate_launch_starts_the_same_two_processes(tiny_llama_dir, alpaca_file, tmp_path, ddp_run):
    out = tmp_path / "out"
    raw = raw_config(tiny_llama_dir, alpaca_file, out, save_steps=0)
    stdout = _finish(_torchrun(raw, tmp_path, launcher=ACCELERATE))
    assert json.loads((out / "data_fingerprint.json").read_text())["world_size"] == 2
    assert stdout.count("done:") == 1
    assert_same_weights(_adapter(ddp_run[0]), _adapter(out))  # the torchrun run's adapter


def test_one_process_asking_for_fsdp_trains_as_a_group_of_one(tiny_llama_dir, alpaca_file, tmp_path, ddp_run):
    """`training.distributed: fsdp` without a launcher (what FSDP's CPU offload on one GPU needs): the same step as
    the two-process runs take over the same examples, micro-batch 2 on one rank."""
    out = tmp_path / "out"
    raw = raw_config(tiny_llama_dir, alpaca_file, out, distributed="fsdp", micro_batch_size=2)
    stdout = _finish(_torchrun(raw, tmp_path, launcher=[sys.executable]))
    assert "distributed: fsdp over 1 process\n" in stdout
    assert json.loads((out / "data_fingerprint.json").read_text())["world_size"] == 1
    assert_same_weights(_adapter(ddp_run[0]), _adapter(out))


def test_a_one_process_fsdp_run_resumes_as_a_plain_run(tiny_llama_dir, alpaca_file, tmp_path):
    """An FSDP checkpoint holds the adapter and the optimizer state whole, so a run begun with `fsdp` in one process
    goes on without it (training.distributed may change on resume) and ends where the plain run ends."""
    half = STEPS // 2
    fsdp = raw_config(tiny_llama_dir, alpaca_file, tmp_path / "out", distributed="fsdp", lr_scheduler="constant",
                      max_steps=half, save_steps=half)
    _finish(_torchrun(fsdp, tmp_path / "fsdp", launcher=[sys.executable]))
    resumed = raw_config(tiny_llama_dir, alpaca_file, tmp_path / "out", lr_scheduler="constant")
    train(spec_from_dict(resumed), resume=True, show_progress=False)
    unbroken = raw_config(tiny_llama_dir, alpaca_file, tmp_path / "unbroken", lr_scheduler="constant")
    train(spec_from_dict(unbroken), show_progress=False)
    assert_same_weights(_adapter(tmp_path / "unbroken"), _adapter(tmp_path / "out"))
