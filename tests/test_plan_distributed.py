"""The per-GPU memory model of multi-GPU runs (planner/distributed.py) against hand counts from the shapes, and
`plan-memory --gpus`: the per-GPU table, the JSON fields, the fewest cards, and bad flags (exit 2, one line)."""

import json

import pytest

from qlora_trainer.cli import main
from qlora_trainer.hardware import CPU, GIB, Hardware, lookup_gpu
from qlora_trainer.planner.distributed import (BUCKETS, GATHERED, Parallelism, estimate_rank_memory,
                                               fsdp_adapter_tensors, fsdp_base_tensors, pinned_bytes)
from qlora_trainer.planner.memory import cuda_block_bytes, estimate_memory, offloaded_input_bytes
from qlora_trainer.planner.shapes import ModelShape, load_model_config, model_shape
from qlora_trainer.spec import RunSpec, resolve

HIDDEN, INTER, KV, VOCAB, LAYERS = 8192, 28672, 1024, 32000, 80  # Llama-2-70B
LINEARS_PER_LAYER = (HIDDEN * HIDDEN, HIDDEN * KV, HIDDEN * KV, HIDDEN * HIDDEN,
                     HIDDEN * INTER, HIDDEN * INTER, INTER * HIDDEN)  # q, k, v, o, gate, up, down
ROOT_PARAMS = 2 * VOCAB * HIDDEN + HIDDEN  # embed_tokens, lm_head, final norm


@pytest.fixture(scope="module")
def llama70b():
    return model_shape(load_model_config("llama-2-70b"))


def l4_run(values: dict = None):
    values = {"model.path": "llama-2-70b", "training.max_seq_len": 2048, "training.gradient_checkpointing": True,
              "adapter.r": 64, "adapter.target_modules": "all-linear", **(values or {})}
    return resolve(RunSpec().with_values(values), Hardware.planned(lookup_gpu("L4")))


def test_fsdp_base_tensors_cover_the_model_and_split_in_halves_on_two_gpus(llama70b):
    base, whole = fsdp_base_tensors(llama70b, l4_run())
    packed = LAYERS * sum(LINEARS_PER_LAYER) // 2  # two 4-bit codes per byte
    others = ROOT_PARAMS + LAYERS * 2 * HIDDEN  # + two RMSNorms per layer, all bf16
    assert sum(t.full_bytes for t in base) == packed + 2 * others
    # every dimension here is even, so two shards are exact halves (and whole 512-byte blocks)
    assert sum(cuda_block_bytes(t.shard_bytes(2)) for t in base) == (packed + 2 * others) // 2
    # three shards: ceil(rows / 3) rows each, at most one row and one 512-byte block more per tensor
    three = sum(cuda_block_bytes(t.shard_bytes(3)) for t in base)
    assert -(-(packed + 2 * others) // 3) <= three <= (packed + 2 * others) // 3 + len(base) * (2 * HIDDEN + 512)
    # what stays whole on each rank: double-quantized absmax (1 byte per 64 weights) and its state, per linear
    blocks = [n // 64 for n in LINEARS_PER_LAYER]
    assert sum(whole) == LAYERS * sum(64 + b + 4 + -(-b // 256) * 4 + 1024 for b in blocks) + 2 * 64 * 4  # + 2 rotary inv_freq


def test_fsdp_rank_terms_match_hand_counts(llama70b):
    run = l4_run()
    single = estimate_memory(llama70b, run)
    rank = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 2, False)).gpu
    base, whole = fsdp_base_tensors(llama70b, run)
    assert rank.breakdown["weights"] == sum(cuda_block_bytes(b) for b in whole) + sum(
        cuda_block_bytes(t.shard_bytes(2)) for t in base)
    lora = LAYERS * sum(64 * d_in + 64 * d_out for d_in, d_out in (
        (HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
        (INTER, HIDDEN)))
    assert rank.trainable_params == lora
    assert rank.breakdown["adapter"] == 4 * lora // 2 == single.breakdown["adapter"] // 2  # fp32, halved
    layer_adapter = 4 * lora // LAYERS
    layer = sum(LINEARS_PER_LAYER) // 2 + 2 * 2 * HIDDEN + layer_adapter
    gathered = 2 * ROOT_PARAMS + 2 * layer  # the root's bf16 params, two layers in full
    assert rank.breakdown[GATHERED] == gathered + (layer_adapter if rank.phase == "layer backward" else 0)
    # activations are one GPU's at the same micro-batch; the peak is the sum of the breakdown
    assert rank.breakdown["activations"] == single.phases[rank.phase].activations
    assert sum(rank.breakdown.values()) == rank.predicted_peak_bytes < single.predicted_peak_bytes


def test_ddp_rank_is_one_gpu_plus_its_gradient_buckets(llama70b):
    run = l4_run({"training.gradient_accumulation_steps": 4})
    single = estimate_memory(llama70b, run)
    rank = estimate_rank_memory(llama70b, run, Parallelism("ddp", 4, False)).gpu
    assert rank.breakdown[BUCKETS] == single.breakdown["adapter"]
    assert rank.predicted_peak_bytes == single.predicted_peak_bytes + single.breakdown["adapter"]
    one = estimate_rank_memory(llama70b, run, Parallelism("ddp", 1, False))
    # one process has no buckets; its host holds only the offloaded checkpoint inputs (training.offload_checkpoints)
    assert one.gpu.predicted_peak_bytes == single.predicted_peak_bytes
    assert one.host_ram_bytes == offloaded_input_bytes(llama70b, run) > 0


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw8bit"])
def test_cpu_offload_moves_the_sharded_state_to_host_ram(llama70b, optimizer):
    run = l4_run({"training.optimizer": optimizer, "training.gradient_accumulation_steps": 2})
    kept = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 2, False))
    moved = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 2, True))
    base, whole = fsdp_base_tensors(llama70b, run)
    adapter = fsdp_adapter_tensors(llama70b, run)
    # the GPU keeps only what FSDP does not manage: quantization states and buffers
    assert moved.gpu.breakdown["weights"] == sum(cuda_block_bytes(b) for b in whole)
    assert moved.gpu.breakdown["adapter"] == moved.gpu.breakdown["gradients"] == 0
    assert moved.gpu.breakdown["optimizer"] == moved.gpu.paged_optimizer_bytes == 0
    # and what left the GPU is on the host, once per rank, in pinned power-of-two blocks
    left = kept.gpu.breakdown["weights"] - moved.gpu.breakdown["weights"] + kept.gpu.breakdown["adapter"]
    assert left == sum(cuda_block_bytes(t.shard_bytes(2)) for t in base + adapter)
    host = moved.host_breakdown
    assert host["parameter shards"] == 2 * sum(pinned_bytes(t.shard_bytes(2)) for t in base + adapter)
    assert 2 * left <= host["parameter shards"] < 4 * left
    assert host["gradient shards"] == 2 * sum(pinned_bytes(t.shard_bytes(2)) for t in adapter)
    assert host["gradient shards"] >= 2 * kept.gpu.breakdown["adapter"]  # all the gradients, accumulating
    assert host["optimizer states"] >= 2 * (kept.gpu.breakdown["optimizer"] + kept.gpu.paged_optimizer_bytes
                                            - 512 * 4 * len(adapter))  # less the CUDA blocks' rounding
    # while loading, each rank parks its whole 4-bit model and adapter in host RAM (engine/layer_load.py)
    assert moved.load_host_bytes == kept.load_host_bytes == 2 * sum(t.full_bytes for t in base + adapter)
    assert moved.host_ram_bytes == max(sum(host.values()), moved.load_host_bytes)
    assert moved.gpu.breakdown["activations"] == kept.gpu.breakdown["activations"]
    assert moved.gpu.predicted_peak_bytes < kept.gpu.predicted_peak_bytes


def test_pinned_blocks_are_powers_of_two():
    assert [pinned_bytes(n) for n in (0, 1, 512, 513, 2**24, 2**24 + 1)] == [0, 1, 512, 1024, 2**24, 2**25]


def _json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["plan-memory", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_70b_fsdp_offload_plan_on_two_l4_is_printed_and_fits_as_it_loads_a_layer_at_a_time(capsys):
    """Each rank loads the 4-bit base a tensor at a time and FSDP cuts it a layer at a time (engine/layer_load.py),
    so an L4 never holds the 34 GiB 4-bit 70B whole; the host holds it for each rank meanwhile."""
    code = main(["plan-memory", "--model", "llama-2-70b", "--gpu", "L4", "--gpus", "2", "--strategy", "fsdp",
                 "--cpu-offload"])
    table = capsys.readouterr().out
    assert code == 0
    for text in ("llama-2-70b on 2 x L4 with FSDP and CPU offload: per GPU (22.03 GiB each)", "gathered parameters",
                 "host RAM needed", "while loading: every rank's 4-bit model and adapter, parked",
                 "training.distributed                 fsdp", "training.fsdp_cpu_offload            true", "fits: "):
        assert text in table
    assert "(at the model load)" not in table


def _unit_bytes(shape: ModelShape, run) -> dict:
    """Each fully_shard unit's parameters whole, in CUDA blocks: a decoder layer's, or the root's (None)."""
    units: dict = {}
    for tensor in fsdp_base_tensors(shape, run)[0] + fsdp_adapter_tensors(shape, run):
        units[tensor.group] = units.get(tensor.group, 0) + cuda_block_bytes(tensor.full_bytes)
    return units


@pytest.mark.parametrize("offload", [False, True])
def test_loading_holds_the_quantization_states_the_shards_and_one_unit_whole(llama70b, offload):
    run = l4_run()
    rank = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 2, offload))
    base, whole = fsdp_base_tensors(llama70b, run)
    shards = 0 if offload else sum(cuda_block_bytes(t.shard_bytes(2)) for t in base + fsdp_adapter_tensors(
        llama70b, run))
    units = _unit_bytes(llama70b, run)
    assert len(units) == 81 and max(units.values()) == units[None]  # 80 layers and the root (embeddings, lm_head)
    # under offload each shard is cut on the GPU before it leaves for the host: the root's largest, at most
    in_flight = max(cuda_block_bytes(t.shard_bytes(2)) for t in base if t.group is None) if offload else 0
    assert rank.load_bytes == sum(cuda_block_bytes(b) for b in whole) + shards + units[None] + in_flight
    assert rank.load_bytes - shards < 35 * GIB / 8  # far below the whole 4-bit model
    assert rank.peak.predicted_peak_bytes == max(rank.load_bytes, rank.gpu.predicted_peak_bytes)
    assert rank.peak.phase == ("model load" if rank.load_bytes > rank.gpu.predicted_peak_bytes else rank.gpu.phase)
    ddp = estimate_rank_memory(llama70b, run, Parallelism("ddp", 2, False))
    assert ddp.load_bytes == 0 and ddp.peak == ddp.gpu  # DDP trains with the whole model anyway


def test_a_16_bit_base_still_loads_whole_on_each_gpu(llama70b):
    run = l4_run({"quantization.mode": "none"})
    single = estimate_memory(llama70b, run)
    rank = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 2, True))
    assert rank.load_bytes == single.breakdown["weights"] + single.breakdown["adapter"]
    assert rank.load_host_bytes == 0


def test_json_fields_of_a_per_gpu_plan(capsys):
    code, out = _json(capsys, "--model", "llama-2-70b", "--gpu", "A100-40GB", "--gpus", "2", "--strategy", "fsdp",
                      "--cpu-offload")
    assert code == 0 and out["fits"] is True
    assert (out["gpus"], out["strategy"], out["cpu_offload"], out["batch_per_gpu"]) == (2, "fsdp", True, 8)
    assert (out["plan"]["distributed"], out["plan"]["fsdp_cpu_offload"]) == ("fsdp", True)
    assert out["predicted_peak_bytes"] <= out["usable_bytes"]
    # the 4-bit base at least: its shards in training; each rank's whole base while loading; the larger counts
    assert sum(out["host_breakdown"].values()) > 35 * GIB and out["load_host_bytes"] > 2 * 34 * GIB
    assert out["host_ram_bytes"] == max(sum(out["host_breakdown"].values()), out["load_host_bytes"])


def test_gpus_without_a_strategy_picks_ddp_when_one_card_fits(capsys):
    code, out = _json(capsys, "--model", "llama-2-7b", "--gpu", "L4", "--gpus", "2")
    assert code == 0 and (out["strategy"], out["cpu_offload"]) == ("ddp", False)
    assert out["breakdown"][BUCKETS] == out["breakdown"]["adapter"] > 0


def test_gpus_auto_names_the_fewest_cards(capsys):
    """One card where FSDP's CPU offload holds the run there; without offload, the 70B needs two 40 GB cards."""
    code = main(["plan-memory", "--model", "llama-2-70b", "--gpu", "A100-40GB", "--gpus", "auto"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "llama-2-70b at seq 2048 needs 1 x A100-40GB with FSDP and CPU offload, ")
    code = main(["plan-memory", "--model", "llama-2-70b", "--gpu", "A100-40GB", "--gpus", "auto", "--strategy",
                 "fsdp"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("llama-2-70b at seq 2048 needs 2 x A100-40GB with FSDP, ")
    code = main(["plan-memory", "--model", "llama-2-7b", "--gpu", "L4", "--gpus", "auto"])
    assert code == 0 and capsys.readouterr().out.splitlines()[0] == "llama-2-7b at seq 2048 needs 1 x L4"


def test_fsdp_on_one_gpu_with_cpu_offload_keeps_only_gathered_layers_and_quantization_states_on_it(llama70b,
                                                                                                   capsys):
    run = l4_run()
    rank = estimate_rank_memory(llama70b, run, Parallelism("fsdp", 1, True))
    base, whole = fsdp_base_tensors(llama70b, run)
    assert rank.gpu.breakdown["weights"] == sum(cuda_block_bytes(b) for b in whole)  # the codes live in host RAM
    assert rank.gpu.breakdown["adapter"] == rank.gpu.breakdown["optimizer"] == 0
    # one shard of one rank is the whole tensor, pinned in host memory
    assert rank.host_breakdown["parameter shards"] == sum(pinned_bytes(t.full_bytes) for t in base) + sum(
        pinned_bytes(t.full_bytes) for t in fsdp_adapter_tensors(llama70b, run))
    # loaded a tensor at a time and cut a layer at a time, the 70B is never whole on the GPU
    assert rank.load_bytes < 3 * GIB and rank.peak.phase != "model load"
    code = main(["plan-memory", "--model", "llama-2-7b", "--gpu", "L4", "--gpus", "1", "--strategy", "fsdp",
                 "--cpu-offload"])
    assert code == 0 and capsys.readouterr().out.startswith("llama-2-7b on 1 x L4 with FSDP and CPU offload: per GPU")


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "error: --gpus 0: not allowed; give a number of GPUs, 1 or more, or auto"),
    (["--gpus", "two"], "error: --gpus two: not allowed"),
    (["--gpus", "2", "--cpu-offload"], "error: --cpu-offload: only with --strategy fsdp"),
    (["--gpus", "2", "--strategy", "ddp", "--cpu-offload"], "error: --cpu-offload: only with --strategy fsdp"),
    (["--strategy", "fsdp"], "error: --strategy fsdp: plans a multi-GPU run; add --gpus N"),
    (["--gpus", "2", "--strategy", "ddp"], "error: --strategy ddp: every GPU holds the whole model, and llama-2-70b's "
                                           "leanest plan needs"),
    (["--gpus", "2", "--strategy", "fsdp", "--quant", "int8"], "error: fsdp cannot shard bitsandbytes int8 weights"),
    (["--gpus", "2", "--strategy", "fsdp", "--gpu", "T4"], "error: --strategy fsdp: not with float16 compute"),
])
def test_bad_parallel_flags_exit_2_with_one_line(capsys, args, message):
    assert main(["plan-memory", "--model", "llama-2-70b", "--gpu", "L4", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and not captured.out


def test_trains_gate_shares_a_run_by_ddp_where_one_gpu_holds_it_and_by_fsdp_where_not(llama70b, capsys,
                                                                                    monkeypatch):
    """training.distributed auto: what `train` launched on several processes uses (training/gate.py), judged by the
    same per-GPU prediction that plan-memory prints (on a host with room for the processes' parked 70B models:
    tests/test_gate.py holds the host-memory refusal)."""
    import types

    from qlora_trainer.errors import UserError
    from qlora_trainer.training import gate
    from qlora_trainer.training.gate import fit_to_budget, launch_strategy

    monkeypatch.setattr(gate.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1024 * GIB))

    seven_b = model_shape(load_model_config("llama-2-7b"))
    assert launch_strategy(l4_run({"model.path": "llama-2-7b"}), seven_b, 2).strategy == "ddp"
    assert launch_strategy(l4_run(), llama70b, 2) == Parallelism("fsdp", 2, False)
    assert launch_strategy(l4_run({"training.fsdp_cpu_offload": True}), llama70b, 2) == Parallelism("fsdp", 2, True)
    assert launch_strategy(l4_run(), llama70b, 1) is None  # one process: no torch.distributed
    assert launch_strategy(l4_run({"training.distributed": "ddp"}), llama70b, 1) is None
    assert launch_strategy(l4_run({"training.distributed": "fsdp", "training.fsdp_cpu_offload": True}), llama70b,
                           1) == Parallelism("fsdp", 1, True)  # unless it asks for FSDP: a group of one
    on_cpu = resolve(l4_run({"training.distributed": "fsdp", "training.fsdp_cpu_offload": True}).spec, CPU)
    with pytest.raises(UserError, match=r"^training.fsdp_cpu_offload: needs a GPU .*; set it to false on the CPU$"):
        launch_strategy(on_cpu, llama70b, 2)  # FSDP pins host memory for an accelerator that is not there
    t4 = resolve(l4_run().spec, Hardware.planned(lookup_gpu("T4")))  # fp16 with loss scaling: each shard would
    with pytest.raises(UserError, match="fsdp with float16 compute"):  # decide alone whether to skip a step
        launch_strategy(t4, llama70b, 2)
    assert launch_strategy(resolve(l4_run({"model.path": "llama-2-7b"}).spec, Hardware.planned(lookup_gpu("T4"))),
                           seven_b, 2).strategy == "ddp"  # DDP's gradients are whole and equal on every rank
    # the gate plans and admits the 70B run on two 40 GB cards (per GPU), and refuses it on one; on two L4s it
    # needs FSDP's CPU offload
    a100 = resolve(l4_run({"training.plan": "auto"}).spec, Hardware.planned(lookup_gpu("A100-40GB")))
    run = fit_to_budget(a100, load_model_config("llama-2-70b"), force=False, world_size=2)
    assert run.spec.training.distributed == "fsdp"
    assert "per GPU (fsdp, 2 processes)" in capsys.readouterr().out
    with pytest.raises(UserError, match="does not fit"):
        fit_to_budget(a100, load_model_config("llama-2-70b"), force=False, world_size=1)
    with pytest.raises(UserError, match="does not fit"):
        fit_to_budget(l4_run({"training.plan": "auto"}), load_model_config("llama-2-70b"), force=False, world_size=2)
    offloaded = fit_to_budget(l4_run({"training.plan": "auto", "training.fsdp_cpu_offload": True}),
                              load_model_config("llama-2-70b"), force=False, world_size=2)
    assert offloaded.spec.training.distributed == "fsdp" and offloaded.spec.training.fsdp_cpu_offload
