"""train's gate before loading (training/gate.py): offloaded checkpoint inputs held to the host memory they may pin."""

import dataclasses
import math

import psutil
import pytest

from qlora_trainer.errors import UserError
from qlora_trainer.hardware import Hardware, budget_gpu
from qlora_trainer.planner.memory import offloaded_input_bytes
from qlora_trainer.planner.shapes import load_model_config, model_shape
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.training.gate import HOST_SHARE, fit_to_budget, offload_within_host_memory

SEQ_LEN = 32768
INPUT_BYTES = 32 * SEQ_LEN * 4096 * 2  # Llama-2-7B: 32 checkpointed inputs of one sequence, bf16


@pytest.fixture(scope="module")
def llama2():
    return model_shape(load_model_config("llama-2-7b"))


def gpu_run(micro_batch: int, explicit: bool = False):
    values = {"training.max_seq_len": SEQ_LEN, "training.micro_batch_size": micro_batch}
    spec = RunSpec().with_values(values)
    if explicit:
        values["training.offload_checkpoints"] = True
        spec = dataclasses.replace(spec.with_values(values), explicit_keys=frozenset(values))
    return resolve(spec, Hardware.planned(budget_gpu(80)))


def too_many() -> int:
    """A micro-batch whose checkpointed inputs need more than the share of this machine's free memory."""
    return math.ceil(2 * psutil.virtual_memory().available / INPUT_BYTES) + 1


def test_offloading_is_the_default_and_kept_where_the_host_can_pin_it(llama2):
    run = gpu_run(1)
    assert run.spec.training.offload_checkpoints and run.prefetch_checkpoints
    assert offloaded_input_bytes(llama2, run) == INPUT_BYTES
    if INPUT_BYTES <= HOST_SHARE * psutil.virtual_memory().available:
        assert offload_within_host_memory(run, llama2) is run


def test_offloading_left_to_the_default_is_turned_off_where_the_host_cannot_pin_it(llama2, capsys):
    run = offload_within_host_memory(gpu_run(too_many()), llama2)
    assert not run.spec.training.offload_checkpoints and not run.prefetch_checkpoints
    out = capsys.readouterr().out
    assert out.startswith("training.offload_checkpoints: off, the checkpointed layers' inputs need")
    # train's gate does it before judging the budget (forced here: the inputs then stay on the GPU, far too many)
    planned = fit_to_budget(gpu_run(too_many()), load_model_config("llama-2-7b"), force=True)
    assert not planned.spec.training.offload_checkpoints


def test_offloading_asked_for_is_refused_in_one_line_where_the_host_cannot_pin_it(llama2):
    with pytest.raises(UserError, match=r"^training.offload_checkpoints: .* pinned host memory.*set it to false"):
        offload_within_host_memory(gpu_run(too_many(), explicit=True), llama2)
    # several processes on one host pin theirs side by side
    run = gpu_run(1, explicit=True)
    processes = math.ceil(psutil.virtual_memory().available / INPUT_BYTES) + 1
    with pytest.raises(UserError):
        offload_within_host_memory(run, llama2, processes)


def test_nothing_is_offloaded_on_the_cpu(llama2):
    on_cpu = resolve(RunSpec().with_values({"training.max_seq_len": SEQ_LEN}), Hardware(None, "cpu"))
    assert not on_cpu.prefetch_checkpoints
    assert offload_within_host_memory(on_cpu, llama2) is on_cpu


def test_fsdp_is_refused_in_one_line_where_this_machines_processes_cannot_park_their_models(llama2, monkeypatch):
    """Each FSDP process parks its whole 4-bit model in host memory while loading: as many processes on this
    machine as overflow its available memory are refused before anything loads; the same number spread over
    machines (LOCAL_WORLD_SIZE 1) is admitted."""
    from qlora_trainer.hardware import lookup_gpu
    from qlora_trainer.planner.distributed import Parallelism, estimate_rank_memory

    spec = RunSpec().with_values({"model.path": "llama-2-7b", "training.distributed": "fsdp",
                                  "training.fsdp_cpu_offload": True})
    run = resolve(spec, Hardware.planned(lookup_gpu("A100-80GB")))
    parked = estimate_rank_memory(llama2, run, Parallelism("fsdp", 1, True)).load_host_bytes  # one process's model
    processes = math.ceil(psutil.virtual_memory().available / parked) + 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    with pytest.raises(UserError, match=rf"^training.distributed: fsdp needs .* GiB of host memory for this machine's "
                                        rf"{processes} processes .*; run fewer processes per machine or free memory$"):
        fit_to_budget(run, load_model_config("llama-2-7b"), force=False, world_size=processes)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert fit_to_budget(run, load_model_config("llama-2-7b"), force=False,
                         world_size=processes).spec.training.distributed == "fsdp"
