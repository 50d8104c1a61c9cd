"""Bad input, interruption, out-of-memory and numerical faults end cleanly, and nothing written is lost."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from qlora_trainer.engine import loss as forward_module  # LossModule runs the step's causal_lm_loss
from qlora_trainer.training.checkpoints import CHECKPOINTS
from qlora_trainer.training.run_lock import LOCK
from qlora_trainer.cli import main
from qlora_trainer.errors import ConfigError
from qlora_trainer.spec import spec_from_dict
from qlora_trainer.engine.loss import LossParts

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def base_raw(model_dir: Path, data_path: Path, out_dir: Path, **training) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "format": "alpaca"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "training": {"max_steps": 8, "learning_rate": 5e-3, "micro_batch_size": 4, "max_seq_len": 96,
                     "save_steps": 2, "save_total_limit": 10, "logging_steps": 1, **training},
        "output": {"dir": str(out_dir)},
    }


def write_config(folder: Path, raw: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- 1. bad input: one line naming the culprit, exit 2 -------------------------------------------------------

def _model_copy(src: Path, dst: Path, drop: tuple[str, ...]) -> Path:
    shutil.copytree(src, dst)
    for pattern in drop:
        for path in dst.glob(pattern):
            path.unlink()
    return dst


def _data_file(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _rows(folder: Path, rows: list) -> Path:
    return _data_file(folder, "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


BAD_INPUTS = {
    # name: (mutate(raw, tmp, model_dir) -> raw or a YAML string, text the one-line message must contain)
    "yaml-syntax": (lambda raw, tmp, m: "training: {max_steps: [1,\n", "malformed YAML"),
    "yaml-top-level-list": (lambda raw, tmp, m: "- a\n- b\n", "mapping"),
    "unknown-section": (lambda raw, tmp, m: raw | {"trainer": {}}, "trainer: unknown section"),
    "unknown-key": (lambda raw, tmp, m: _set(raw, "training", "lr", 1e-4), "training.lr: unknown key"),
    "rank-wrong-type": (lambda raw, tmp, m: _set(raw, "adapter", "r", "eight"), "adapter.r"),
    "rank-zero": (lambda raw, tmp, m: _set(raw, "adapter", "r", 0), "adapter.r"),
    "rank-above-layer": (lambda raw, tmp, m: _set(raw, "adapter", "r", 64), "adapter.r: 64 exceeds"),
    "lr-negative": (lambda raw, tmp, m: _set(raw, "training", "learning_rate", -1.0), "training.learning_rate"),
    "steps-zero": (lambda raw, tmp, m: _set(raw, "training", "max_steps", 0), "training.max_steps"),
    "dropout-one": (lambda raw, tmp, m: _set(raw, "adapter", "lora_dropout", 1.0), "adapter.lora_dropout"),
    "bad-format": (lambda raw, tmp, m: _set(raw, "data", "format", "oasst"), "data.format"),
    "compile-layers-yes": (lambda raw, tmp, m: _set(raw, "training", "compile_layers", "yes"),
                           "training.compile_layers"),
    "fused-lora-string": (lambda raw, tmp, m: _set(raw, "training", "fused_lora", "maybe"), "training.fused_lora"),
    "mlp-chunk-negative": (lambda raw, tmp, m: _set(raw, "training", "mlp_chunk_tokens", -1),
                           "training.mlp_chunk_tokens"),
    "attention-chunk-negative": (lambda raw, tmp, m: _set(raw, "training", "attention_chunk_tokens", -1),
                                 "training.attention_chunk_tokens"),
    "attention-chunks-with-flash-attention": (
        lambda raw, tmp, m: _set(_set(raw, "training", "attention_chunk_tokens", 64), "model", "attn_implementation",
                                 "flash_attention_2"),
        "training.attention_chunk_tokens: not with model.attn_implementation flash_attention_2"),
    "bad-quant": (lambda raw, tmp, m: _set(raw, "quantization", "mode", "int4"), "quantization.mode"),
    "trust-remote-code-string": (lambda raw, tmp, m: _set(raw, "model", "trust_remote_code", "yes"),
                                 "model.trust_remote_code"),
    "missing-model-path": (lambda raw, tmp, m: _set(raw, "model", "path", ""), "model.path: missing"),
    "model-folder-absent": (lambda raw, tmp, m: _set(raw, "model", "path", str(tmp / "nowhere")),
                            "does not exist"),
    "model-without-config": (lambda raw, tmp, m: _set(raw, "model", "path",
                                                      str(_model_copy(m, tmp / "m1", ("config.json",)))),
                             "no config.json"),
    "model-without-weights": (lambda raw, tmp, m: _set(raw, "model", "path",
                                                       str(_model_copy(m, tmp / "m2", ("*.safetensors",)))),
                              "no *.safetensors"),
    "model-without-tokenizer": (lambda raw, tmp, m: _set(raw, "model", "path",
                                                         str(_model_copy(m, tmp / "m3", ("tokenizer*",)))),
                                "tokenizer"),
    "unknown-target": (lambda raw, tmp, m: _set(raw, "adapter", "target_modules", ["qkv_proj"]), "'qkv_proj'"),
    "data-absent": (lambda raw, tmp, m: _set(raw, "data", "path", str(tmp / "none.jsonl")), "data.path"),
    "data-empty": (lambda raw, tmp, m: _set(raw, "data", "path", str(_data_file(tmp, "e.jsonl", ""))),
                   "data.path"),
    "data-not-utf8": (lambda raw, tmp, m: _set(raw, "data", "path",
                                               str(_data_file(tmp, "l.jsonl", b'{"text": "\xff\xfe caf\xe9"}\n'))),
                      "data.path"),
    "data-bad-extension": (lambda raw, tmp, m: _set(raw, "data", "path", str(_data_file(tmp, "d.xlsx", "x"))),
                           "data.path"),
    "rows-missing-output": (lambda raw, tmp, m: _set(raw, "data", "path",
                                                     str(_rows(tmp, [{"instruction": "hi"}] * 3))), "output"),
    "chat-roles-out-of-order": (
        lambda raw, tmp, m: _set(_set(raw, "data", "format", "chat"), "data", "path",
                                 str(_rows(tmp, [{"messages": [{"role": "assistant", "content": "a"},
                                                               {"role": "user", "content": "b"}]}] * 3))),
        "data"),
    "prompt-longer-than-max-seq-len": (
        lambda raw, tmp, m: _set(_set(raw, "training", "max_seq_len", 4), "data", "path",
                                 str(_rows(tmp, [{"instruction": "a long instruction " * 5, "output": "x"}] * 3))),
        "max_seq_len"),
    "bad-row-as-error": (
        lambda raw, tmp, m: _set(_set(raw, "data", "on_bad_row", "error"), "data", "path",
                                 str(_rows(tmp, ROWS[:3] + [{"instruction": ["x"], "output": "x"}]))),
        "row 4"),
}


def _unwritable(folder: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root may write in any folder")
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _then(action, raw):
    """`raw` after `action` (a change to the files on disk) has run."""
    action()
    return raw


# Rows run against a copy of a finished earlier run (`earlier_run`) in the output folder, with these CLI arguments.
# Whatever is refused, the earlier run's files must come out byte for byte as they went in.
ON_EARLIER_RUN = {
    "rerun-without-flags": (lambda raw, tmp, m: raw, "already holds a run", "--set", "output.overwrite=off"),
    "resume-changed-learning-rate": (lambda raw, tmp, m: _set(raw, "training", "learning_rate", 1e-3),
                                     "training.learning_rate 0.005 -> 0.001", "--resume"),
    "resume-changed-rank": (lambda raw, tmp, m: _set(raw, "adapter", "r", 8), "adapter.r 4 -> 8", "--resume"),
    "resume-changed-alpha": (lambda raw, tmp, m: _set(raw, "adapter", "alpha", 16), "adapter.lora_alpha",
                             "--resume"),
    "resume-changed-targets": (lambda raw, tmp, m: _set(raw, "adapter", "target_modules", "attn"),
                               "adapter.target_modules", "--resume"),
    "resume-changed-adapter-type": (lambda raw, tmp, m: _set(raw, "adapter", "type", "loha"), "adapter.type",
                                    "--resume"),
    "resume-changed-optimizer": (lambda raw, tmp, m: _set(raw, "training", "optimizer", "adamw8bit"),
                                 "training.optimizer", "--resume"),
    "resume-changed-seed": (lambda raw, tmp, m: _set(raw, "training", "seed", 7), "training.seed", "--resume"),
    "resume-changed-quantization": (lambda raw, tmp, m: _set(raw, "quantization", "mode", "fp4"),
                                    "quantization.mode", "--resume"),
    "resume-changed-data": (lambda raw, tmp, m: _set(raw, "data", "path", str(_rows(tmp, ROWS[::-1]))),
                            "data.path", "--resume"),
    "resume-auto-changed-seed": (lambda raw, tmp, m: _set(_set(raw, "training", "resume", "auto"), "training",
                                                          "seed", 7), "training.seed 42 -> 7"),
    "resume-longer-cosine-schedule": (lambda raw, tmp, m: _set(raw, "training", "max_steps", 2),
                                      "the cosine schedule", "--resume"),
    "resume-other-examples-per-step": (lambda raw, tmp, m: _set(raw, "training", "micro_batch_size", 2),
                                       "examples per step 4 -> 2", "--resume"),
    "resume-all-checkpoints-corrupt": (
        lambda raw, tmp, m: _then(lambda: _corrupt(tmp / "out" / CHECKPOINTS / "step-0000001" / "adapter" /
                                                   "adapter_model.safetensors"), raw),
        "checkpoints/step-0000001: checksum mismatch in adapter/adapter_model.safetensors", "--resume"),
    "resume-adapter-without-checkpoints": (lambda raw, tmp, m: _then(lambda: _remove(tmp / "out" / CHECKPOINTS), raw),
                                           "holds a trained adapter but no checkpoint", "--resume"),
    "resume-without-run-config": (lambda raw, tmp, m: _then(lambda: _remove(tmp / "out" / "run_config.json"), raw),
                                  "no run_config.json", "--resume"),
    "overwrite-with-data-absent": (lambda raw, tmp, m: _set(raw, "data", "path", str(tmp / "none.jsonl")),
                                   "data.path", "--overwrite"),
    "overwrite-with-model-without-weights": (
        lambda raw, tmp, m: _set(raw, "model", "path", str(_model_copy(m, tmp / "m4", ("*.safetensors",)))),
        "no *.safetensors", "--overwrite"),
    "overwrite-with-bad-row-as-error": (
        lambda raw, tmp, m: _set(_set(raw, "data", "on_bad_row", "error"), "data", "path",
                                 str(_rows(tmp, ROWS[:3] + [{"instruction": ["x"], "output": "x"}]))),
        "row 4", "--overwrite"),
}

BAD_INPUTS |= {
    "output-dir-is-a-file": (lambda raw, tmp, m: _set(raw, "output", "dir", str(_data_file(tmp, "taken", "x"))),
                             "output.dir"),
    "output-dir-under-a-file": (lambda raw, tmp, m: _set(raw, "output", "dir",
                                                         str(_data_file(tmp, "taken", "x") / "run")), "output.dir"),
    "output-dir-unwritable": (lambda raw, tmp, m: _set(raw, "output", "dir", str(_unwritable(tmp / "ro") / "run")),
                              "output.dir"),
    "yaml-duplicate-section": (lambda raw, tmp, m: yaml.safe_dump(raw) + "training:\n  max_steps: 2\n",
                               "training: given twice"),
    "yaml-duplicate-key": (lambda raw, tmp, m: yaml.safe_dump(raw).replace("training:\n",
                                                                           "training:\n  seed: 1\n  seed: 2\n"),
                           "training.seed: given twice"),
    "resume-switch-on": (lambda raw, tmp, m: _set(raw, "training", "resume", True), "training.resume: true / on"),
    "output-dir-empty": (lambda raw, tmp, m: raw, "output.dir: empty", "--output-dir", ""),
} | ON_EARLIER_RUN


def _set(raw: dict, section: str, key: str, value) -> dict:
    copy = json.loads(json.dumps(raw))
    copy.setdefault(section, {})[key] = value
    return copy


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the run lock, which each run that takes it rewrites."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


@pytest.fixture(scope="module")
def earlier_run(tiny_llama_dir, alpaca_file, tmp_path_factory) -> Path:
    """A finished one-step run of the bad-input table's base config."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    config_path = write_config(out.parent, base_raw(tiny_llama_dir, alpaca_file, out, max_steps=1))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(case, tiny_llama_dir, alpaca_file, tmp_path, capsys, request):
    mutate, culprit, *args = BAD_INPUTS[case]
    if case in ON_EARLIER_RUN:
        shutil.copytree(request.getfixturevalue("earlier_run"), tmp_path / "out")
    raw = mutate(base_raw(tiny_llama_dir, alpaca_file, tmp_path / "out", max_steps=1), tmp_path, tiny_llama_dir)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    before = file_hashes(tmp_path)
    capsys.readouterr()
    code = main(["train", "--config", str(config_path), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and culprit in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert file_hashes(tmp_path) == before  # nothing written before was changed, nothing new left behind
    assert (tmp_path / "out").exists() == (case in ON_EARLIER_RUN)  # a refused first run leaves no folder


def test_bad_rows_are_skipped_and_counted(tiny_llama_dir, tmp_path):
    data_path = _rows(tmp_path, ROWS + [{"instruction": "x"}, {"instruction": "", "output": "y"},
                                        {"instruction": ["a"], "output": "y"}])
    with open(data_path, "a") as handle:
        handle.write("{not json\n")
    raw = base_raw(tiny_llama_dir, data_path, tmp_path / "out", max_steps=1)
    assert main(["train", "--config", str(write_config(tmp_path, raw)), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["rows_skipped"] == 4


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(
    st.sampled_from(["model", "adapter", "training", "data", "quantization", "output", "extra"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=5),
              st.dictionaries(st.sampled_from(["path", "r", "alpha", "dropout", "type", "learning_rate", "max_steps",
                                               "format", "mode", "target_modules", "resume", "nope"]),
                              st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                                        st.text(max_size=8), st.lists(st.text(max_size=4), max_size=2))))))
def test_config_loader_accepts_or_rejects_cleanly(raw):
    try:
        spec_from_dict(raw)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


# --- 2. interruption ---------------------------------------------------------------------------------------

def _start(config_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qlora_trainer", "train", "--config", str(config_path),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def _losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, alpaca_file, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    folder = out.parent
    assert main(["train", "--config", str(write_config(folder, base_raw(tiny_llama_dir, alpaca_file, out))),
                 "--no-progress"]) == 0
    return out


def _same_adapter(a: Path, b: Path) -> bool:
    x = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches(tiny_llama_dir, alpaca_file, tmp_path,
                                                                    reference_run):
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, save_steps=0))
    process = _start(config_path)
    _wait_for_steps(out / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr.decode()[-500:]
    steps_done = len((out / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == [f"step-{steps_done:07d}"]  # save_steps 0: only this
    assert main(["train", "--config", str(config_path), "--resume", "--no-progress"]) == 0
    assert _losses(out / "metrics.jsonl") == _losses(reference_run / "metrics.jsonl")
    assert _same_adapter(out, reference_run)


def test_sigkill_leaves_the_newest_complete_checkpoint_and_resume_matches(tiny_llama_dir, alpaca_file, tmp_path,
                                                                         reference_run):
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, save_steps=1))
    process = _start(config_path)
    _wait_for_steps(out / "metrics.jsonl", 4, process)
    process.kill()
    process.communicate(timeout=60)
    checkpoints = sorted(p.name for p in (out / CHECKPOINTS).iterdir() if p.name.startswith("step-"))
    newest = int(checkpoints[-1].split("-")[1])
    # What a kill in the middle of writing later checkpoints leaves: a temp folder that was never renamed,
    # a step folder without its manifest, and one whose weights were cut short.
    shutil.copytree(out / CHECKPOINTS / checkpoints[-1], out / CHECKPOINTS / f".tmp-step-{newest + 1:07d}-999")
    broken = out / CHECKPOINTS / f"step-{newest + 2:07d}"
    shutil.copytree(out / CHECKPOINTS / checkpoints[-1], broken)
    (broken / "manifest.json").unlink()
    torn = out / CHECKPOINTS / f"step-{newest + 3:07d}"
    shutil.copytree(out / CHECKPOINTS / checkpoints[-1], torn)
    weights = torn / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignored"):
        code = main(["train", "--config", str(config_path), "--resume", "--no-progress"])
    assert code == 0
    assert _losses(out / "metrics.jsonl") == _losses(reference_run / "metrics.jsonl")
    assert _same_adapter(out, reference_run)


# Runs the trainer with the second checkpoint's write paused after its files are written and before its manifest
# and rename, so that the test can SIGKILL the process in the middle of that write (only the moment is arranged).
_PAUSE_IN_SECOND_CHECKPOINT = """
import pathlib, sys, time
import qlora_trainer.training.checkpoints as checkpoint
marker, calls, real = pathlib.Path(sys.argv[1]), [], checkpoint.write_manifest
def paused(folder):
    calls.append(folder)
    if len(calls) == 2:
        marker.write_text(str(folder))
        time.sleep(300)
    real(folder)
checkpoint.write_manifest = paused
from qlora_trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_matches(
        tiny_llama_dir, alpaca_file, tmp_path, reference_run):
    out = tmp_path / "out"
    config_path = write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out, save_steps=2))
    marker = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", _PAUSE_IN_SECOND_CHECKPOINT, str(marker), "train", "--config",
                                str(config_path), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    half_written = Path(marker.read_text())
    process.kill()
    process.communicate(timeout=60)
    assert half_written.name.startswith(".tmp-step-0000004") and any(half_written.rglob("*.safetensors"))
    assert [p.name for p in (out / CHECKPOINTS).iterdir() if p.name.startswith("step-")] == ["step-0000002"]
    with pytest.warns(UserWarning, match="ignored"):
        code = main(["train", "--config", str(config_path), "--resume", "--no-progress"])
    assert code == 0
    assert _losses(out / "metrics.jsonl") == _losses(reference_run / "metrics.jsonl")
    assert _same_adapter(out, reference_run)


# --- 3. out of memory and 4. numerical faults (the GPU fault is raised from a hooked step) -------------------

def _fail_on_calls(monkeypatch, failing_calls: set[int], make_failure):
    real = forward_module.causal_lm_loss
    calls = {"n": 0}

    def hooked(causal_lm, batch, chunk_tokens, fused=False):
        calls["n"] += 1
        if calls["n"] in failing_calls:
            return make_failure(causal_lm, batch, chunk_tokens, real)
        return real(causal_lm, batch, chunk_tokens, fused)

    monkeypatch.setattr(forward_module, "causal_lm_loss", hooked)
    return calls


def _raise_oom(*_):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_step_without_any_gradient_stops_the_run_with_exit_4(tiny_llama_dir, alpaca_file, tmp_path, capsys,
                                                               monkeypatch):
    """A loss that reaches no adapter weight (as torch 2.11's compiled layers gave) must not train on silently."""
    out = tmp_path / "out"

    def detached(causal_lm, batch, chunk_tokens, real):
        parts = real(causal_lm, batch, chunk_tokens)
        return LossParts(parts.loss_sum.detach() + torch.zeros((), requires_grad=True), parts.label_tokens)

    _fail_on_calls(monkeypatch, {2}, detached)
    code = main(["train", "--config", str(write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out,
                                                                            save_steps=1))), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 4 and "step 2 gave the adapter no gradient at all" in err and "traceback" not in err.lower()
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == ["step-0000001"]  # step 1 kept, nothing after


def test_out_of_memory_saves_the_last_step_and_exits_3_with_advice(tiny_llama_dir, alpaca_file, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "out"
    _fail_on_calls(monkeypatch, {4}, _raise_oom)  # the 4th micro-batch: step 4 with no accumulation
    code = main(["train", "--config", str(write_config(tmp_path, base_raw(tiny_llama_dir, alpaca_file, out,
                                                                            save_steps=0))), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert "out of GPU memory at step 4" in err and "training.micro_batch_size 4 -> 2" in err
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == ["step-0000003"]


def test_out_of_memory_retry_halves_the_micro_batch_and_goes_on(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_on_calls(monkeypatch, {3}, _raise_oom)
    raw = base_raw(tiny_llama_dir, alpaca_file, out, max_steps=5, oom_retry="halve-micro-batch")
    assert main(["train", "--config", str(write_config(tmp_path, raw)), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batch_size"] for r in records] == [4, 4, 2, 2, 2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _nan_loss(causal_lm, batch, chunk_tokens, real):
    parts = real(causal_lm, batch, chunk_tokens)
    return LossParts(parts.loss_sum * float("nan"), parts.label_tokens)


def test_an_isolated_nan_step_is_skipped(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_on_calls(monkeypatch, {2}, _nan_loss)
    raw = base_raw(tiny_llama_dir, alpaca_file, out, max_steps=4)
    assert main(["train", "--config", str(write_config(tmp_path, raw)), "--no-progress"]) == 0
    losses = _losses(out / "metrics.jsonl")
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # four finite steps were still made
    assert "step 2 skipped" in capsys.readouterr().err


def test_consecutive_nan_steps_stop_with_the_last_good_checkpoint(tiny_llama_dir, alpaca_file, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_on_calls(monkeypatch, set(range(3, 100)), _nan_loss)
    raw = base_raw(tiny_llama_dir, alpaca_file, out, max_bad_steps=3)
    code = main(["train", "--config", str(write_config(tmp_path, raw)), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 4
    assert "training.max_bad_steps: 3 consecutive steps" in err and "step-0000002" in err
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["step-0000002"]
