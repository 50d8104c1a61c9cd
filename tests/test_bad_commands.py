"""Bad input to `generate`, `merge`, `plan-memory` and `bench`, and Ctrl-C during a merge, end cleanly.

The table's promise, row by row, for the command line as users run it (a process of its own): exit code 2, the
last line on stderr names the culprit (a flag or a path) and says what would be valid, no traceback, nothing on
stdout, and every file and folder that was there before (the base model, the adapter and its run folder, an
earlier merge, anything else in the folders around) is byte for byte what it was, with nothing new beside it.
Ctrl-C in the middle of a merge exits 130 without a traceback and leaves no temporary folder.
`train` has its own table in tests/test_robustness.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import save_tiny_tokenizer
from qlora_trainer.export.merge import merge
from test_merge import snapshot
from tiny_models import make_adapter

# Each command runs in a process forked from one interpreter that has already imported the package: a fresh
# `python -m qlora_trainer` spends about 13 s on 2 cores importing torch, transformers, peft and bitsandbytes before
# it reads an argument, which would make this table take many minutes. The child runs `python -m qlora_trainer`'s
# own __main__ with its own stdout, stderr and exit code, and prints a traceback as the interpreter would for an
# exception that escapes; only the imports are shared. SIGALRM ends a child that hangs.
_FORK_SERVER = """
import json, os, runpy, signal, sys, traceback
import qlora_trainer.bench.run, qlora_trainer.cli, qlora_trainer.export.generate, qlora_trainer.planner.report
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(request["cwd"])
            sys.argv = ["qlora-trainer", *request["args"]]
            signal.alarm(120)
            runpy.run_module("qlora_trainer", run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


class ForkedCli:
    """`qlora-trainer ARGS`, each call in a process of its own, forked from the one server process."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], cwd: Path, logs: Path) -> Outcome:
        request = {"args": args, "cwd": str(cwd), "stdout": str(logs / "stdout"), "stderr": str(logs / "stderr")}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the fork server died"
        read = lambda name: (logs / name).read_text(errors="replace")
        return Outcome(int(reply), read("stdout"), read("stderr"))

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def cli():
    runner = ForkedCli()
    yield runner
    runner.close()


@dataclass(frozen=True)
class Place:
    """What a row's command may point at."""

    work: Path  # the row's own folder and the command's working directory
    model: Path  # the tiny Llama base
    adapter: Path  # run/adapter: an adapter trained on the base
    other_adapter: Path  # an adapter trained on a Llama of another hidden size
    earlier_merge: Path  # what merge wrote for adapter on model
    second_adapter: Path  # another adapter trained on the base


@pytest.fixture(scope="module")
def shared(tiny_llama_dir, tmp_path_factory) -> Path:
    """The adapters and the earlier merge every row may use, made once; the rows must leave all of it as it is."""
    root = tmp_path_factory.mktemp("bad-commands")
    make_adapter(tiny_llama_dir, root / "run" / "adapter")
    narrow = root / "narrow-llama"
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_llama_dir, hidden_size=32, intermediate_size=64, head_dim=8)
                     ).save_pretrained(narrow)
    save_tiny_tokenizer(narrow)
    make_adapter(narrow, root / "narrow-adapter")
    merge(str(tiny_llama_dir), root / "run" / "adapter", root / "merged")
    make_adapter(tiny_llama_dir, root / "second-adapter", seed=2)
    return root


@pytest.fixture
def place(tiny_llama_dir, shared, tmp_path) -> Place:
    (tmp_path / "work").mkdir()
    return Place(tmp_path / "work", tiny_llama_dir, shared / "run" / "adapter", shared / "narrow-adapter",
                 shared / "merged", shared / "second-adapter")


# --- what the rows point at ----------------------------------------------------------------------------------

def _generate(p: Place, *extra, model=None, prompt: str = "the quick brown fox") -> list:
    return ["generate", "--model", p.model if model is None else model, "--prompt", prompt, *extra]


def _merge(p: Place, *extra, model=None, adapter=None, out=None) -> list:
    return ["merge", "--model", p.model if model is None else model, "--adapter",
            p.adapter if adapter is None else adapter, "--out", p.work / "merged" if out is None else out, *extra]


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = (), write: Optional[dict[str, bytes]] = None) -> Path:
    """A copy of `src` without the files matching `drop` and with `write`'s files replaced."""
    shutil.copytree(src, dst)
    for pattern in drop:
        for path in dst.glob(pattern):
            path.unlink()
    for name, data in (write or {}).items():
        (dst / name).write_bytes(data)
    return dst


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def _file(p: Place) -> Path:
    path = p.work / "taken"
    path.write_text("not a folder")
    return path


def _not_a_merge(p: Place) -> Path:
    folder = p.work / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


def _earlier_merge(p: Place, extra_file: Optional[str] = None) -> Path:
    folder = shutil.copytree(p.earlier_merge, p.work / "merged")
    if extra_file:
        (folder / extra_file).write_text("mine too")
    return folder


def _unwritable(p: Place) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root may write in any folder")
    folder = p.work / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _adapter_copy(p: Place, **changes) -> Path:
    return _copy(p.adapter, p.work / "adapter-copy", **changes)


Row = tuple[Callable[[Place], list], str]  # (the command's arguments, text the last stderr line must hold)

GENERATE: dict[str, Row] = {
    "prompt-empty": (lambda p: _generate(p, prompt=""), "--prompt: prompt 1 ('') encodes to no tokens"),
    "max-new-tokens-negative": (lambda p: _generate(p, "--max-new-tokens", "-1"), "--max-new-tokens: -1"),
    "max-new-tokens-zero": (lambda p: _generate(p, "--max-new-tokens", "0"), "--max-new-tokens: 0"),
    "max-new-tokens-not-a-number": (lambda p: _generate(p, "--max-new-tokens", "many"),
                                    "argument --max-new-tokens: invalid int value: 'many'"),
    "temperature-negative": (lambda p: _generate(p, "--temperature", "-1"), "--temperature: -1 is not allowed"),
    "quant-unknown": (lambda p: _generate(p, "--quant", "int4"), "argument --quant: invalid choice: 'int4'"),
    "prompt-missing": (lambda p: ["generate", "--model", p.model], "required: --prompt"),
    "model-absent": (lambda p: _generate(p, model=p.work / "no-such-model"), "no-such-model does not exist"),
    "model-empty": (lambda p: _generate(p, model=""), "argument --model: empty; give a folder"),
    "model-is-the-adapter": (lambda p: _generate(p, model=p.adapter), "adapter has no config.json"),
    "model-without-tokenizer": (lambda p: _generate(p, model=_copy(p.model, p.work / "m", drop=("tokenizer*",))),
                                "no usable tokenizer"),
    "adapter-absent": (lambda p: _generate(p, "--adapter", p.work / "no-such-adapter"),
                       "--adapter: {work}/no-such-adapter does not exist"),
    "adapter-is-a-file": (lambda p: _generate(p, "--adapter", _file(p)), "{work}/taken is a file"),
    "adapter-without-config": (lambda p: _generate(p, "--adapter", _adapter_copy(p, drop=("adapter_config.json",))),
                               "adapter-copy has no adapter_config.json"),
    "adapter-without-weights": (
        lambda p: _generate(p, "--adapter", _adapter_copy(p, drop=("adapter_model.safetensors",))),
        "adapter-copy has no adapter_model.safetensors"),
    "adapter-config-not-json": (
        lambda p: _generate(p, "--adapter", _adapter_copy(p, write={"adapter_config.json": b"{not json"})),
        "adapter-copy/adapter_config.json is not a peft adapter config"),
    "adapter-config-unknown-type": (
        lambda p: _generate(p, "--adapter", _adapter_copy(p, write={"adapter_config.json": b'{"peft_type": "X"}'})),
        "adapter-copy/adapter_config.json is not a peft adapter config"),
    "adapter-weights-truncated": (
        lambda p: _generate(p, "--adapter", _adapter_copy(p, write={
            "adapter_model.safetensors": _truncated(p.adapter / "adapter_model.safetensors")})),
        "adapter-copy/adapter_model.safetensors is not a complete safetensors file"),
    "adapter-of-another-hidden-size": (lambda p: _generate(p, "--adapter", p.other_adapter),
                                       "narrow-adapter does not fit this base model (size mismatch"),
    "adapter-name-without-path": (lambda p: _generate(p, "--adapter", "lora"), "--adapter: lora does not exist"),
    "adapter-name-empty": (lambda p: _generate(p, "--adapter", f"={p.adapter}"), "adapter name '' is empty"),
    "adapter-name-with-a-dot": (lambda p: _generate(p, "--adapter", f"v1.5={p.adapter}"),
                                "adapter name 'v1.5' is empty or holds a '.'"),
    "adapter-path-empty": (lambda p: _generate(p, "--adapter", "lora="), "--adapter 'lora=': no adapter folder"),
    "adapter-same-name-twice": (lambda p: _generate(p, "--adapter", f"a={p.adapter}", "--adapter",
                                                    f"a={p.other_adapter}"), "--adapter: names must be unique"),
    "adapter-same-folder-name-twice": (lambda p: _generate(p, "--adapter", p.adapter, "--adapter", p.adapter),
                                       "--adapter: names must be unique, got run, run"),
}

MERGE: dict[str, Row] = {
    "out-is-a-file": (lambda p: _merge(p, out=_file(p)), "--out: {work}/taken is a file"),
    "out-under-a-file": (lambda p: _merge(p, out=_file(p) / "merged"), "--out: {work}/taken is a file, so"),
    "out-is-the-adapter": (lambda p: _merge(p, out=p.adapter), "holds the adapter"),
    "out-is-the-run-folder": (lambda p: _merge(p, out=p.adapter.parent), "holds the adapter"),
    "out-inside-the-adapter": (lambda p: _merge(p, out=p.adapter / "merged"), "is inside the adapter folder"),
    "out-is-the-base": (lambda p: _merge(p, out=p.model), "holds the base model"),
    "out-inside-the-base": (lambda p: _merge(p, out=p.model / "merged"), "is inside the base model folder"),
    "out-not-a-merge": (lambda p: _merge(p, out=_not_a_merge(p)), "mine is not empty and holds no earlier merge"),
    "out-not-a-merge-with-overwrite": (lambda p: _merge(p, "--overwrite", out=_not_a_merge(p)),
                                       "mine is not empty and holds no earlier merge"),
    "out-earlier-merge-without-overwrite": (lambda p: _merge(p, out=_earlier_merge(p)),
                                            "holds an earlier merge; pass --overwrite"),
    "out-earlier-merge-with-a-file-of-mine": (lambda p: _merge(p, "--overwrite", out=_earlier_merge(p, "notes.txt")),
                                              "holds files merge did not write (notes.txt)"),
    "out-empty": (lambda p: _merge(p, out=""), "argument --out: empty; give a folder"),
    "out-unwritable": (lambda p: _merge(p, out=_unwritable(p) / "merged"), "--out: cannot write in"),
    "out-missing": (lambda p: _merge(p)[:-2], "required: --out"),
    "adapter-absent": (lambda p: _merge(p, adapter=p.work / "no-such-adapter"), "no-such-adapter does not exist"),
    "adapter-empty": (lambda p: _merge(p, adapter=""), "argument --adapter: empty; give a folder"),
    "adapter-config-not-json": (
        lambda p: _merge(p, adapter=_adapter_copy(p, write={"adapter_config.json": b"[]"})),
        "adapter-copy/adapter_config.json is not a peft adapter config"),
    "adapter-of-another-hidden-size-over-an-earlier-merge": (
        lambda p: _merge(p, "--overwrite", adapter=p.other_adapter, out=_earlier_merge(p)),
        "narrow-adapter does not fit this base model (size mismatch"),
    "model-absent": (lambda p: _merge(p, model=p.work / "no-such-model"), "no-such-model does not exist"),
    "model-empty": (lambda p: _merge(p, model=""), "argument --model: empty; give a folder"),
    "quant-unknown": (lambda p: _merge(p, "--quant", "int4"), "argument --quant: invalid choice: 'int4'"),
}

# only what tests/test_plan_memory_cli.py and tests/test_bench.py do not already check
PLAN_MEMORY: dict[str, Row] = {
    "rank-zero": (lambda p: ["plan-memory", "--model", "llama-2-7b", "--vram", "16", "--rank", "0"], "--rank 0"),
    "alpha-negative": (lambda p: ["plan-memory", "--model", "llama-2-7b", "--vram", "16", "--alpha", "-1"],
                       "--alpha -1"),
    "batch-size-zero": (lambda p: ["plan-memory", "--model", "llama-2-7b", "--vram", "16", "--batch-size", "0"],
                        "--batch-size 0"),
    "vram-nan": (lambda p: ["plan-memory", "--model", "llama-2-7b", "--vram", "nan"], "--vram nan"),
    "vram-not-a-number": (lambda p: ["plan-memory", "--model", "llama-2-7b", "--vram", "lots"],
                          "argument --vram: invalid float value: 'lots'"),
    "model-is-a-file": (lambda p: ["plan-memory", "--model", _file(p), "--vram", "16"], "--model {work}/taken"),
    "model-config-not-json": (
        lambda p: ["plan-memory", "--model", _copy(p.model, p.work / "m", write={"config.json": b"{nope"}),
                   "--vram", "16"], "--model {work}/m: cannot read"),
}

BENCH: dict[str, Row] = {
    "steps-zero": (lambda p: ["bench", "--model", p.model, "--steps", "0", "--out", p.work / "report"], "--steps"),
    "model-absent": (lambda p: ["bench", "--model", p.work / "no-such-model", "--out", p.work / "report"],
                     "no-such-model: not a model folder nor a preset"),
    "preset-without-weights": (lambda p: ["bench", "--model", "llama-2-7b", "--out", p.work / "report"],
                               "--model llama-2-7b: a preset has no weights; add --random-weights"),
    "methods-empty": (lambda p: ["bench", "--model", p.model, "--methods", "", "--out", p.work / "report"],
                      "--methods : unknown none given"),
    "rank-zero": (lambda p: ["bench", "--model", p.model, "--rank", "0", "--out", p.work / "report"], "--rank 0"),
    "cap-negative": (lambda p: ["bench", "--model", p.model, "--cap-gib", "-1", "--out", p.work / "report"],
                     "--cap-gib -1.0"),
    "out-is-a-file": (lambda p: ["bench", "--model", p.model, "--out", _file(p)], "--out {work}/taken: a file"),
    "out-under-a-file": (lambda p: ["bench", "--model", p.model, "--out", _file(p) / "report"],
                         "--out {work}/taken/report: a file"),
}

ROWS: dict[str, Row] = {f"{command}-{name}": row for command, table in
                        (("generate", GENERATE), ("merge", MERGE), ("plan-memory", PLAN_MEMORY), ("bench", BENCH))
                        for name, row in table.items()}


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input_gives_one_line_naming_the_culprit_exit_2_and_changes_nothing(case, cli, place, shared,
                                                                                 tmp_path):
    arguments, culprit = ROWS[case]
    args = [str(arg) for arg in arguments(place)]
    before = snapshot(place.work, place.model, shared)
    outcome = cli.run(args, cwd=place.work, logs=tmp_path)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.exit_code == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert [line for line in lines if "error: " in line] == lines[-1:], lines  # one error line, the last
    assert culprit.format(work=place.work) in lines[-1], lines[-1]
    assert outcome.stdout == ""
    assert snapshot(place.work, place.model, shared) == before  # nothing changed, nothing left beside


# Runs merge with the swap of the finished temporary folder into --out held back, so that the test can send SIGINT
# while the temporary folder is there (only the moment is arranged; the signal and its handling are real).
_PAUSE_BEFORE_THE_SWAP = """
import pathlib, sys, time
import qlora_trainer.export.merge as merge_module
marker, swap = pathlib.Path(sys.argv[1]), merge_module.replace_folder_atomically
def paused(tmp, final):
    marker.write_text(str(tmp))
    time.sleep(300)
    swap(tmp, final)
merge_module.replace_folder_atomically = paused
from qlora_trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_during_a_merge_exits_130_and_leaves_the_earlier_merge_and_no_temporary_folder(place, shared,
                                                                                              tmp_path):
    out = _earlier_merge(place)
    before = snapshot(place.work, place.model, shared)
    marker = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", _PAUSE_BEFORE_THE_SWAP, str(marker), "merge", "--model",
                                str(place.model), "--adapter", str(place.second_adapter),
                                "--out", str(out), "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    temporary = Path(marker.read_text())
    assert temporary.parent == place.work and any(temporary.glob("*.safetensors"))  # a merge was half done
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted" and stdout == ""
    assert not temporary.exists()
    assert snapshot(place.work, place.model, shared) == before
