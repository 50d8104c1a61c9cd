"""The planner in this checkout against the GPU measurements committed under benchmarks/results/: every measured peak
of the accuracy grid predicted within 5%, and no length that ran out of memory under a cap admitted by `train`'s
rule. A change to the planner that breaks a measured promise fails here, on the CPU."""

import collections
import json
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy_table import MEASURED_ON, load_cases, measured_records, predicted  # noqa: E402
from qlora_trainer.planner.memory import estimate_memory  # noqa: E402
from qlora_trainer.planner.search import describe  # noqa: E402
from qlora_trainer.planner.shapes import load_model_config  # noqa: E402
from qlora_trainer.spec import resolve, spec_from_dict  # noqa: E402
from qlora_trainer.training import gate  # noqa: E402
from vs_reference import OURS, SEQ_STEP, ours_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CASES = load_cases(sorted((REPO / "benchmarks" / "cases").glob("*.yaml")))
# the table's rows: the last measured record of each case
LATEST = {record["name"]: record for record in measured_records(RESULTS / "planner-accuracy-h100.jsonl")}


@pytest.mark.parametrize("name", sorted(LATEST))
def test_every_measured_peak_is_predicted_within_5_percent(name):
    record = LATEST[name]
    error = predicted(CASES[name], record)["predicted_peak_bytes"] / record["peak_reserved_bytes"] - 1
    assert abs(error) <= 0.05, f"{name}: {error:+.1%}"


LONGEST = [json.loads(line) for line in
           (RESULTS / "defaults-h100" / "longest-cap15-2026-12-06-one-call.jsonl").read_text().splitlines()]
SETTINGS = {"llama-2-7b": {"rank": 16, "targets": "qkvo"}, "llama-3-8b": {"rank": 32, "targets": "all-linear"}}


def planned_on_the_gpu_machine(record: dict, seq_len: int, monkeypatch, changes: Optional[dict] = None):
    """The run `train`'s gate makes of `record`'s stack at `seq_len` under its cap on the GPU machine (128 GB of host
    memory: offloading allowed), on the unpacked rows of random tokens vs_reference.py steps on; and the model's
    config."""
    host = collections.namedtuple("host", "available total")
    monkeypatch.setattr(gate.psutil, "virtual_memory", lambda: host(120 * 2**30, 128 * 2**30))
    model = REPO / "qlora_trainer" / "presets" / f"{record['model']}.json"
    config = ours_config(model, Path("x.jsonl"), seq_len, 3, {**OURS[record["stack"]], **(changes or {})}, Path("out"),
                         cap_gib=record["cap_gib"], **SETTINGS[record["model"]])
    config["data"]["packing"] = False  # no position ids, one sequence a row
    model_config = load_model_config(str(model))
    return gate.fit_to_budget(resolve(spec_from_dict(config), MEASURED_ON), model_config, force=True), model_config


@pytest.mark.parametrize("record", [r for r in LONGEST if r["stack"] == "ours-auto"], ids=lambda r: r["model"])
def test_a_length_that_ran_out_of_memory_is_refused(record, monkeypatch):
    """The longest-sequence search planned `ours-auto` for its longest length under the 15 GiB cap on the GPU
    machine (128 GB of host memory: offloading allowed) and probed shorter lengths with that plan, one unpacked row
    of random tokens each; one step longer than the longest that trained ran out of memory. `train`'s rule (the
    budget less its margin) must refuse that length, so that what it starts fits."""
    # measured before the plan could chunk layer backwards
    run, model_config = planned_on_the_gpu_machine(record, record["searched_up_to"], monkeypatch,
                                                   {"training.attention_chunk_tokens": 0})
    too_long = run.with_values({"training.max_seq_len": record["longest_seq_len"] + SEQ_STEP})
    assert not too_long.budget.fits(estimate_memory(model_config, too_long).predicted_peak_bytes)


# runs of the engine as `train` builds it, each in a process of its own, whose first step ran out of memory under the
# cap (vs_reference.py --mode snapshot; the layers' backward in chunks and the final norm in chunks, as now)
FIRST_STEP_OUT_OF_MEMORY = [json.loads(line) for line in
                            (RESULTS / "defaults-h100" / "llama-2-7b-snapshot-s114688-2026-12-07.jsonl")
                            .read_text().splitlines()]


@pytest.mark.parametrize("record", FIRST_STEP_OUT_OF_MEMORY, ids=lambda r: f"{r['model']}-{r['stack']}")
def test_a_length_whose_first_step_ran_out_of_memory_is_refused(record, monkeypatch):
    """A run of `ours-auto`'s plan for its length under the 15 GiB cap ran out of memory in its first step, although
    a step at that length after a 1,024-token first step trained: `train`'s rule must refuse that length, since a
    run's first step is the one it must survive first."""
    assert "OutOfMemoryError" in record["error"]
    # measured before the plan could recompute keys
    run, model_config = planned_on_the_gpu_machine(record, record["seq_len"], monkeypatch,
                                                   {"training.recompute_keys": False})
    assert not run.budget.fits(estimate_memory(model_config, run).predicted_peak_bytes)


# runs of `ours-auto`'s plan, each its first two steps in a process of its own under the 15 GiB cap (vs_reference.py
# --mode probe), that trained
RUNS = RESULTS / "defaults-h100" / "longest-runs-cap15-2026-12-07.jsonl"
RUNS_THAT_TRAINED = [record for record in map(json.loads, RUNS.read_text().splitlines())
                     if record["stack"] == "ours-auto" and record.get("trains")]


@pytest.mark.parametrize("record", RUNS_THAT_TRAINED, ids=lambda r: f"{r['model']}-{r['probe']}")
def test_a_run_that_trained_is_admitted_and_not_under_predicted(record, monkeypatch):
    """`train`'s rule admits the length (its plan is the one that ran) and the planner's allocated peak is not below
    either step's. Their reserved peaks are not compared: under a cap the allocator keeps what it reserved up to the
    pool, releasing it only when an allocation fails (the 65,536-token run reserved 14.24 GiB of the 14.25 GiB pool
    with 12.12 GiB allocated)."""
    run, model_config = planned_on_the_gpu_machine(record, record["probe"], monkeypatch)
    assert describe(run) == record["plan"]
    estimate = estimate_memory(model_config, run)
    assert run.budget.fits(estimate.predicted_peak_bytes)
    assert estimate.predicted_peak_allocated_bytes >= max(step["allocated_bytes"] for step in record["step_peaks"])
