"""The longest-sequence search of benchmarks/vs_reference.py (its logic only: the GPU runs it): the answer it finds and
how few lengths it tries from a prediction, since each length costs ours a compilation of its layers."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vs_reference import SEQ_STEP, longest_trainable  # noqa: E402

LIMIT = 98 * SEQ_STEP


def _search(longest: int, first, start: int = 4 * SEQ_STEP) -> tuple[int, list[int]]:
    probed = []

    def trains(length: int) -> bool:
        assert length % SEQ_STEP == 0 and SEQ_STEP <= length <= LIMIT  # only lengths the search may report
        probed.append(length)
        return length <= longest

    return longest_trainable(trains, start, LIMIT, first), probed


@pytest.mark.parametrize("longest", [0, SEQ_STEP, 45 * SEQ_STEP + 100, 57 * SEQ_STEP, LIMIT, LIMIT + 5000])
@pytest.mark.parametrize("first", [None, SEQ_STEP, 40 * SEQ_STEP, 57 * SEQ_STEP + 300, 60 * SEQ_STEP, LIMIT])
def test_the_search_finds_the_longest_length_that_trains(longest, first):
    found, probed = _search(longest, first)
    assert found == min(longest, LIMIT) // SEQ_STEP * SEQ_STEP
    assert len(probed) == len(set(probed))  # no length tried twice


@pytest.mark.parametrize("error_steps", [-3, -1, 0, 1, 2, 4])
def test_a_close_prediction_costs_few_probes(error_steps):
    """From a prediction k steps off, about 2 log2(k) + 2 probes (steps doubled, then bisection), not the ~12 of
    doubling from the start and bisecting down to a step."""
    longest = 57 * SEQ_STEP
    found, probed = _search(longest, longest + error_steps * SEQ_STEP)
    assert found == longest
    assert len(probed) <= 2 + 2 * max(abs(error_steps), 1).bit_length()
    assert len(_search(longest, None)[1]) > len(probed)


def test_a_stack_from_another_checkout_runs_that_checkouts_trainer(tmp_path):
    """`--stacks ours@DIR` (another branch's files beside this checkout's, in one GPU call): `qlora-trainer train`
    runs from DIR, so DIR's package is the one imported. Here DIR is a copy of this package whose import prints a
    note, and the demo model trains 2 steps on the CPU."""
    import shutil

    import yaml
    from measure_training import run_train_command

    repo = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    shutil.copytree(repo / "qlora_trainer", tree / "qlora_trainer", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / "qlora_trainer" / "__init__.py", "a") as init:
        init.write('\nprint("note: imported from the other checkout")\n')
    config = yaml.safe_load((repo / "configs" / "demo-tiny.yaml").read_text())
    config["model"]["path"] = str(repo / config["model"]["path"])
    config["data"]["path"] = str(repo / config["data"]["path"])
    config["training"] |= {"max_steps": 2, "save_steps": 0, "eval_steps": 0, "logging_steps": 1}
    config["output"] = {"dir": str(tmp_path / "run")}
    for source, noted in ((tree, True), (None, False)):
        record = run_train_command(config | {"output": {"dir": str(tmp_path / f"run-{noted}")}}, 300, source)
        assert record["exit_code"] == 0, record.get("stderr_tail")
        assert ("note: imported from the other checkout" in record.get("notes", [])) == noted


def _longest_args(out, timeout_s: float):
    """vs_reference's arguments for a longest-sequence search of one stack, results appended to `out`."""
    import argparse

    return argparse.Namespace(mode="longest", seq_len=1024, steps=1, cap_gib=15.0, max_seq_len=2048, first_probe=0,
                              warm_up_steps=2, rank=16, targets="qkvo", out=out, timeout_s=timeout_s)


def test_a_worker_ended_by_its_time_limit_leaves_its_log_beside_the_results(tmp_path):
    """A stack's worker writes its probes to stderr as each ends; when the call's own time limit ends it, what it
    wrote must outlive the call, beside --out, and the row names the log."""
    import argparse

    from vs_reference import run_stack, worker_log

    args = _longest_args(tmp_path / "results.jsonl", timeout_s=0.001)
    log = worker_log(args, "ours-auto")
    assert log == tmp_path / "results.ours-auto.log"
    assert worker_log(args, "ours-auto", tmp_path / "branch") == tmp_path / "results.ours-auto@branch.log"
    record = run_stack("ours-auto", args, {}, tmp_path / "batches.pt")
    assert record["error"] == "timed out after 0.001 s" and record["log"] == str(log)
    assert log.exists()
    assert worker_log(argparse.Namespace(out=None), "ours-auto") is None


def test_a_call_ended_by_sigterm_still_writes_the_running_stacks_row(tmp_path):
    """`timeout` ends the call with SIGTERM, here while a stack's worker still starts: the worker is stopped and the
    stack's row says so and names its log (twice a call's outer time limit came before the stack's own, and the
    stack's row was lost)."""
    import os
    import signal
    import threading

    from vs_reference import end_stacks_on_sigterm, run_stack

    args = _longest_args(tmp_path / "results.jsonl", timeout_s=120)
    previous = signal.getsignal(signal.SIGTERM)
    end_stacks_on_sigterm()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        record = run_stack("ours-auto", args, {}, tmp_path / "batches.pt")
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert record["ended"] and record["error"].startswith("the call was ended (SIGTERM)")
    assert record["log"] == str(tmp_path / "results.ours-auto.log")


def test_every_length_probed_is_a_run_of_its_own(tmp_path, monkeypatch):
    """A longest-sequence search runs each length in a worker of its own (mode probe: a run's first two steps), ours'
    first probe at the planner's longest that a worker reports, each probe's row in the stack's log as it ends; a
    search stopped by its time limit keeps the probes it made."""
    import subprocess

    import vs_reference

    calls, timed_out_at = [], [None]

    def fake_worker(stack, args, config, batches_path, tree, stderr_path, timeout_s):
        calls.append((args.mode, args.seq_len, getattr(args, "predict_only", False)))
        if getattr(args, "predict_only", False):
            return {"stack": stack, "predicted_longest_seq_len": 5 * 1024}
        if len(calls) == timed_out_at[0]:
            raise subprocess.TimeoutExpired("worker", timeout_s)
        return {"stack": stack, "mode": "probe", "device": "GPU", "probe": args.seq_len,
                "trains": args.seq_len <= 6 * 1024}

    monkeypatch.setattr(vs_reference, "run_worker", fake_worker)
    args = _longest_args(tmp_path / "results.jsonl", timeout_s=600)
    args.max_seq_len = 8 * 1024
    row = vs_reference.run_stack("ours-auto", args, {}, tmp_path / "batches.pt")
    assert calls[0] == ("probe", 8 * 1024, True)
    probed = [5 * 1024, 6 * 1024, 8 * 1024, 7 * 1024]  # up from the prediction, then bisection
    assert calls[1:] == [("probe", length, False) for length in probed]
    assert row["longest_seq_len"] == 6 * 1024 and row["predicted_longest_seq_len"] == 5 * 1024
    assert [p["probe"] for p in row["probes"]] == probed
    logged = [json.loads(line) for line in (tmp_path / "results.ours-auto.log").read_text().splitlines()]
    assert [p["probe"] for p in logged] == probed

    calls.clear()
    args.first_probe, timed_out_at[0] = 4 * 1024, 4  # the third probe's worker outlives the stack's time
    row = vs_reference.run_stack("ours-auto", args, {}, tmp_path / "batches.pt")
    assert row["error"] == "timed out after 600 s" and [p["probe"] for p in row["probes"]] == [4 * 1024, 5 * 1024]


def test_a_workers_error_is_read_from_its_own_part_of_the_log(tmp_path):
    """The workers of one search append to one log; a worker's error row comes from what it wrote, after what the
    workers before it wrote (progress bars and all, which are not ASCII)."""
    from vs_reference import run_worker

    log = tmp_path / "results.plain.log"
    earlier = "Loading weights: " + "█" * 5000 + "\nRuntimeError: an earlier worker's\n"  # 3 bytes a bar
    log.write_text(earlier)
    args = _longest_args(tmp_path / "results.jsonl", timeout_s=120)
    args.mode = "probe"
    row = run_worker("plain", args, {}, tmp_path / "batches.pt", None, log, 120)
    assert row["error"] == "KeyError: 'model'"
    assert log.read_text().startswith(earlier)
