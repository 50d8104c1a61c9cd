"""The plan search: its objective, the user's fixed choices, the budget, and what it says when nothing fits."""

import dataclasses

import pytest

from qlora_trainer.hardware import GIB, Hardware, budget_gpu
from qlora_trainer.planner.memory import estimate_memory
from qlora_trainer.planner.search import (GROUP_KEYS, MIN_MICRO_BATCH_LAYER_WORK, MIN_MICRO_BATCH_TOKENS,
                                          ATTENTION_CHUNK_TOKENS, MLP_CHUNK_TOKENS, SEARCHED_KEYS,
                                          attention_chunks_possible, describe, layer_weights,
                                          SEQ_LEN_STEP, TARGET_ORDER, candidate_runs, search_plan)
from qlora_trainer.planner.shapes import load_model_config, model_shape
from qlora_trainer.spec import Budget, ResolvedRun, RunSpec, resolve, spec_from_dict


@pytest.fixture(scope="module")
def llama2():
    return model_shape(load_model_config("llama-2-7b"))


BASE = {"training.max_seq_len": 4096, "training.micro_batch_size": 4,
        "training.gradient_accumulation_steps": 4}  # effective batch 16


def gpu(budget_bytes: int, bf16: bool = True) -> Hardware:
    """A GPU whose whole memory (`budget_bytes`) is the budget: bf16 with compiled layers, or an fp16 card."""
    card = budget_gpu(budget_bytes / GIB)
    if not bf16:
        card = dataclasses.replace(card, supports_bf16=False, compute_capability=(7, 5))
    return Hardware.planned(card)


def planned(budget_gib: float, values: dict = BASE) -> ResolvedRun:
    """RunSpec defaults with `values` and compiled layers (the path these expectations were derived for), resolved
    for a bf16 GPU of `budget_gib` GiB; no key explicit."""
    return resolve(RunSpec().with_values({"training.compile_layers": "on", **values}), gpu(int(budget_gib * GIB)))


def fixing(run: ResolvedRun, values: dict) -> ResolvedRun:
    """`run` with `values` set as the user's own (explicit keys): the search keeps them."""
    spec = run.spec.with_values(values)
    return resolve(dataclasses.replace(spec, explicit_keys=spec.explicit_keys | set(values)), run.hardware)


def fits(run: ResolvedRun, shape) -> bool:
    return run.budget.fits(estimate_memory(shape, run).predicted_peak_bytes)


def recomputed(run: ResolvedRun, shape) -> int:
    training = run.spec.training
    if not training.gradient_checkpointing:
        return 0
    return shape.num_layers if training.checkpointed_layers is None else training.checkpointed_layers


def group(run: ResolvedRun) -> tuple:
    return tuple(run.spec.value(key) for key in GROUP_KEYS)


@pytest.mark.parametrize("budget_gib", [8, 12, 16, 24, 80])
@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_the_chosen_plan_recomputes_fewest_layers_in_the_first_group_that_fits(llama2, budget_gib, seq_len):
    base = planned(budget_gib, {**BASE, "training.max_seq_len": seq_len})
    result = search_plan(llama2, base)
    assert result.fits
    assert result.estimate.predicted_peak_bytes <= base.budget.usable_bytes == result.usable_bytes
    training = result.run.spec.training
    assert training.micro_batch_size * training.gradient_accumulation_steps == 16
    candidates = candidate_runs(llama2, base, 16)
    chosen = candidates.index(result.run.with_values({"training.checkpointed_layers": None}))
    # no run of an earlier targets/rank/optimizer/offloading choice fits
    first = next(i for i, run in enumerate(candidates) if group(run) == group(result.run))
    assert not any(fits(run, llama2) for run in candidates[:first])
    # no run of the chosen group with micro-batches of enough work per layer (for Llama-2-7B's layers,
    # MIN_MICRO_BATCH_TOKENS tokens) recomputes fewer layers, or as few with a larger micro-batch
    fewest = recomputed(result.run, llama2)
    same_group = [run for run in candidates if group(run) == group(result.run)]
    large = [run for run in same_group if run.spec.training.micro_batch_size * seq_len >= MIN_MICRO_BATCH_TOKENS]
    for run in large:
        micro = run.spec.training.micro_batch_size
        if not run.spec.training.gradient_checkpointing:
            assert not fits(run, llama2) or fewest == 0 and micro <= training.micro_batch_size
        elif fewest > 0:
            assert not fits(run.with_values({"training.checkpointed_layers": fewest - 1}), llama2)
            assert not fits(run.with_values({"training.checkpointed_layers": fewest}), llama2) or (
                micro <= training.micro_batch_size)
    if not any(fits(run, llama2) for run in large):  # none that large fits: the largest micro-batch that fits
        assert not any(fits(run, llama2) for run in same_group[:chosen]
                       if run.spec.training.micro_batch_size > training.micro_batch_size)


def test_the_work_a_micro_batch_needs_is_4096_tokens_of_a_llama_2_layer_and_scales_with_the_layer(llama2):
    assert layer_weights(llama2) * MIN_MICRO_BATCH_TOKENS == MIN_MICRO_BATCH_LAYER_WORK
    tiny = model_shape(load_model_config("tinyllama-1.1b"))  # 22 layers of 2048 hidden, 5632 MLP, 4 kv heads
    assert layer_weights(tiny) == 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632
    # at seq 4096 a TinyLlama micro-batch needs 5 sequences (4.6 x Llama-2's tokens) to count as large: on an L4 the
    # plan takes micro-batch 8 (with checkpointing) where one 4,096-token sequence alone would be host-bound
    result = search_plan(tiny, planned(24, {**BASE, "training.max_seq_len": 4096}))
    micro = result.run.spec.training.micro_batch_size
    assert micro * 4096 * layer_weights(tiny) >= MIN_MICRO_BATCH_LAYER_WORK
    assert (micro // 2) * 4096 * layer_weights(tiny) < MIN_MICRO_BATCH_LAYER_WORK


@pytest.mark.parametrize("budget_gib", [8, 12, 15, 16, 24])
def test_leftover_memory_goes_to_fewer_checkpointed_layers(llama2, budget_gib):
    run = search_plan(llama2, planned(budget_gib)).run
    training = run.spec.training
    assert training.gradient_checkpointing
    count = training.checkpointed_layers if training.checkpointed_layers is not None else llama2.num_layers
    one_fewer = run.with_values({"training.checkpointed_layers": count - 1})
    assert fits(run, llama2)
    assert not fits(one_fewer, llama2)


def test_fixed_checkpointed_layers_are_kept(llama2):
    run = fixing(planned(24), {"training.gradient_checkpointing": True, "training.checkpointed_layers": 32})
    assert search_plan(llama2, run).run.spec.training.checkpointed_layers == 32


def test_objective_order_all_linear_then_rank_then_optimizer_then_micro_batch(llama2):
    runs = candidate_runs(llama2, planned(80), 16)
    first, last = runs[0].spec, runs[-1].spec
    assert (first.adapter.target_modules, first.adapter.r, first.adapter.lora_alpha, first.training.optimizer,
            first.training.gradient_checkpointing, first.training.micro_batch_size) == (
        "all-linear", 64, 128.0, "adamw", False, 16)
    assert (last.adapter.target_modules, last.adapter.r, last.training.optimizer, last.training.gradient_checkpointing,
            last.training.micro_batch_size) == ("attn", 8, "paged_adamw8bit", True, 1)
    position = lambda changes: runs.index(runs[0].with_values(changes))  # noqa: E731
    # rank before optimizer
    assert position({"training.optimizer": "paged_adamw8bit"}) < position({"adapter.r": 32, "adapter.lora_alpha": 64.0})
    # the largest micro-batch before checkpointing off: micro-batch 16 checkpointed comes before micro-batch 8 without
    assert (position({"training.gradient_checkpointing": True})
            < position({"training.micro_batch_size": 8, "training.gradient_accumulation_steps": 2}))
    # offloading only after every micro-batch that keeps the checkpointed inputs on the GPU
    assert (position({"training.gradient_checkpointing": True, "training.micro_batch_size": 1,
                      "training.gradient_accumulation_steps": 16})
            < position({"training.gradient_checkpointing": True, "training.offload_checkpoints": True}))


def test_a_large_gpu_gets_all_linear_rank_64_without_recompute_at_the_largest_micro_batch_that_allows_it(llama2):
    result = search_plan(llama2, planned(80))
    spec = result.run.spec
    assert (spec.adapter.target_modules, spec.adapter.r, spec.training.optimizer,
            spec.training.gradient_checkpointing) == ("all-linear", 64, "adamw", False)
    micro = spec.training.micro_batch_size
    assert 1 <= micro < 16  # the whole batch of 16 x 4,096 tokens needs checkpointing on 80 GB
    larger = result.run.with_values({"training.micro_batch_size": 2 * micro,
                                     "training.gradient_accumulation_steps": 16 // (2 * micro)})
    assert not fits(larger, llama2)


def test_checkpointing_is_off_where_the_whole_batch_fits_without_it(llama2):
    spec = search_plan(llama2, planned(80).with_values({"training.max_seq_len": 256})).run.spec
    assert (spec.training.micro_batch_size, spec.training.gradient_checkpointing) == (16, False)


def test_fixed_choices_are_kept(llama2):
    run = fixing(planned(80), {"adapter.r": 8, "adapter.lora_alpha": 16.0,
                               "adapter.target_modules": ["q_proj", "v_proj"], "training.gradient_checkpointing": True,
                               "training.micro_batch_size": 3, "training.optimizer": "adamw8bit"})
    result = search_plan(llama2, run, 16)
    spec = result.run.spec
    assert result.fits
    assert (spec.adapter.r, spec.adapter.lora_alpha, spec.adapter.target_modules, spec.training.gradient_checkpointing,
            spec.training.micro_batch_size, spec.training.optimizer) == (
        8, 16.0, ["q_proj", "v_proj"], True, 3, "adamw8bit")
    assert spec.training.gradient_accumulation_steps == 6  # 3 x 6 covers the effective batch of 16
    assert result.estimate.target_layers == 2 * 32


def test_fixed_choices_that_do_not_fit_are_kept_and_the_advice_says_what_would(llama2):
    run = fixing(planned(16), {"adapter.r": 64, "adapter.target_modules": "all-linear",
                               "training.gradient_checkpointing": False})
    result = search_plan(llama2, run)
    assert not result.fits
    assert (result.run.spec.adapter.r, result.run.spec.training.gradient_checkpointing) == (64, False)
    assert "let the planner choose rank, target_modules, gradient_checkpointing" in result.advice


def test_nothing_fits_reports_the_smallest_budget_and_the_longest_sequence(llama2):
    base = planned(5.75)  # the base fits, the leanest plan at seq 4096 does not
    budget = base.budget
    result = search_plan(llama2, base)
    peak = result.estimate.predicted_peak_bytes
    assert not result.fits and not budget.fits(peak)
    # the smallest budget is exact for the leanest plan, and the search finds a plan there
    smallest = result.smallest_fitting_budget_bytes
    assert Budget("smallest", smallest).fits(peak)
    assert not Budget("smaller", smallest - 2**20).fits(peak)
    assert search_plan(llama2, resolve(base.spec, gpu(smallest))).fits
    longest = result.longest_fitting_seq_len
    assert longest % SEQ_LEN_STEP == 0 and 0 < longest < base.spec.training.max_seq_len
    def at(seq_len: int):
        return estimate_memory(llama2, result.run.with_values({"training.max_seq_len": seq_len}))

    assert budget.fits(at(longest).predicted_peak_bytes)
    assert not budget.fits(at(longest + SEQ_LEN_STEP).predicted_peak_bytes)
    assert f"lower seq_len from 4096 to {longest}" in result.advice


def test_a_budget_below_the_weights_has_no_sequence_to_offer(llama2):
    result = search_plan(llama2, planned(3))
    assert not result.fits and result.longest_fitting_seq_len is None
    assert result.smallest_fitting_budget_bytes > 3 * GIB


def _spec(training: dict, adapter: dict) -> RunSpec:
    return spec_from_dict({"model": {"path": "m"}, "data": {"path": "d"}, "adapter": adapter, "training": training})


def test_only_the_keys_the_user_wrote_are_fixed(llama2):
    spec = _spec({"micro_batch_size": 2, "optimizer": "adamw8bit"}, {"r": 8})
    assert spec.explicit_keys & SEARCHED_KEYS.keys() == {"adapter.r", "training.micro_batch_size",
                                                         "training.optimizer"}
    runs = candidate_runs(llama2, resolve(spec, gpu(16 * GIB)), 2)
    assert {(run.spec.adapter.r, run.spec.training.micro_batch_size, run.spec.training.optimizer)
            for run in runs} == {(8, 2, "adamw8bit")}
    assert {run.spec.adapter.target_modules for run in runs} == set(TARGET_ORDER)  # the others are chosen


def test_plan_auto_fills_what_the_user_left_out(llama2):
    spec = _spec({"max_seq_len": 1024, "micro_batch_size": 2, "gradient_accumulation_steps": 8},
                 {"r": 8, "lora_dropout": 0.1})
    run = resolve(spec, gpu(16 * GIB, bf16=False))
    assert (run.spec.training.max_seq_len, run.spec.adapter.r, run.spec.adapter.lora_dropout, run.compute_dtype,
            run.spec.training.micro_batch_size) == (1024, 8, 0.1, "float16", 2)
    result = search_plan(llama2, run)
    planned_spec = result.run.spec
    assert planned_spec.adapter.r == 8 and planned_spec.training.micro_batch_size == 2  # fixed
    assert planned_spec.adapter.target_modules == "all-linear"
    assert planned_spec.training.gradient_accumulation_steps == 8
    # the run returned is the run estimated, resolved for the same GPU, with the same explicit keys
    assert estimate_memory(llama2, result.run) == result.estimate
    assert (result.run.hardware, result.run.compute_dtype, planned_spec.explicit_keys) == (
        run.hardware, "float16", spec.explicit_keys)


def test_offloading_is_the_last_resort_that_keeps_targets_and_rank(llama2):
    base = planned(15, {"training.max_seq_len": 32768, "training.micro_batch_size": 1, "data.packing": True,
                        "adapter.lora_dropout": 0.0})
    fixed = {"adapter.target_modules": "all-linear", "adapter.r": 16}
    result = search_plan(llama2, fixing(base, fixed))
    assert (result.fits and result.run.spec.training.offload_checkpoints
            and result.run.spec.training.gradient_checkpointing)
    without = search_plan(llama2, fixing(base, {**fixed, "training.offload_checkpoints": False}))
    assert not without.fits
    shorter = fixing(base.with_values({"training.max_seq_len": 2048}), fixed)
    assert not search_plan(llama2, shorter).run.spec.training.offload_checkpoints


def test_mlp_chunks_come_after_offloading_for_sequences_nothing_else_fits(llama2):
    base = planned(15, {"training.max_seq_len": 65536, "training.micro_batch_size": 1,
                        "adapter.lora_dropout": 0.0, "training.loss_chunk_tokens": 512})
    fixed = {"adapter.target_modules": "attn", "adapter.r": 16}
    result = search_plan(llama2, fixing(base, fixed))
    training = result.run.spec.training
    assert result.fits and training.offload_checkpoints and training.mlp_chunk_tokens == MLP_CHUNK_TOKENS
    assert training.attention_chunk_tokens == 0  # MLP chunks suffice: no chunked layer backward
    without = search_plan(llama2, fixing(base, {**fixed, "training.mlp_chunk_tokens": 0,
                                                "training.attention_chunk_tokens": 0}))
    assert not without.fits
    shorter = search_plan(llama2, fixing(base.with_values({"training.max_seq_len": 32768}), fixed))
    # offloading alone fits: no extra MLP forward
    assert shorter.fits and shorter.run.spec.training.mlp_chunk_tokens == 0


def test_chunked_layer_backwards_come_last_and_only_where_the_engine_takes_them(llama2):
    """Objective 7: a length that MLP chunks do not fit gets each layer's backward in chunks of queries; not with
    adapter dropout (only attention would go in chunks), not a model whose layers engine/chunked_attention.py does
    not repeat, and never where MLP chunks already fit."""
    fixed = {"adapter.target_modules": "attn", "adapter.r": 16}
    base = planned(15, {"training.max_seq_len": 77824, "training.micro_batch_size": 1, "adapter.lora_dropout": 0.0})
    result = search_plan(llama2, fixing(base, fixed))
    training = result.run.spec.training
    assert result.fits and training.attention_chunk_tokens == ATTENTION_CHUNK_TOKENS
    assert training.offload_checkpoints and training.mlp_chunk_tokens == MLP_CHUNK_TOKENS
    assert result.run.layer_backward_chunked
    assert not search_plan(llama2, fixing(base, {**fixed, "training.attention_chunk_tokens": 0})).fits
    with_dropout = search_plan(llama2, fixing(base.with_values({"adapter.lora_dropout": 0.05}), fixed))
    assert not with_dropout.fits and with_dropout.run.spec.training.attention_chunk_tokens == 0
    shorter = search_plan(llama2, fixing(base.with_values({"training.max_seq_len": 65536}), fixed))
    assert shorter.fits and shorter.run.spec.training.attention_chunk_tokens == 0
    assert attention_chunks_possible(llama2, base)
    other = dataclasses.replace(llama2, model_type="phi3")
    assert not attention_chunks_possible(other, base)
    sliding = dataclasses.replace(llama2, sliding_window=4096, sliding_layers=frozenset(range(llama2.num_layers)))
    assert not attention_chunks_possible(sliding, base)


def test_recomputed_keys_come_after_chunked_layer_backwards_and_only_where_they_change_the_memory(llama2):
    """Objective 8: a length chunked layer backwards do not fit gets each block's keys and values made where they are
    used (training.recompute_keys), which the planner counts as the row's keys and values fewer; never where chunked
    layer backwards already fit, and not on a card without the key blocks it needs (there it would change nothing)."""
    fixed = {"adapter.target_modules": "attn", "adapter.r": 16, "training.optimizer": "adamw"}
    base = planned(15, {"training.max_seq_len": 114688, "training.micro_batch_size": 1, "adapter.lora_dropout": 0.0})
    result = search_plan(llama2, fixing(base, fixed))
    assert result.fits and result.run.keys_recomputed
    assert result.run.spec.training.attention_chunk_tokens == ATTENTION_CHUNK_TOKENS
    assert "keys and values recomputed per block" in describe(result.run)
    kept = result.run.with_values({"training.recompute_keys": False})
    saved = (estimate_memory(llama2, kept).phases["layer backward"].activations
             - estimate_memory(llama2, result.run).phases["layer backward"].activations)
    row_keys = 114688 * 2 * 2 * llama2.kv_dim  # bf16 keys and values of every token
    assert 0.9 * row_keys < saved < row_keys  # less the one block that now exists at a time
    assert not search_plan(llama2, fixing(base, {**fixed, "training.recompute_keys": False})).fits
    shorter = search_plan(llama2, fixing(base.with_values({"training.max_seq_len": 77824}), fixed))
    assert shorter.fits and shorter.run.layer_backward_chunked and not shorter.run.keys_recomputed
    t4 = resolve(base.spec.with_values({"training.recompute_keys": True, "training.attention_chunk_tokens": 4096}),
                 gpu(15 * GIB, bf16=False))
    assert t4.layer_backward_chunked and not t4.key_blocks and not t4.keys_recomputed


def test_the_t4_example_config_fits_a_t4_once_planned():
    from pathlib import Path

    from qlora_trainer.hardware import lookup_gpu
    from qlora_trainer.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "7b-on-a-t4.yaml")
    assert spec.training.plan == "auto"
    run = resolve(spec, Hardware.planned(lookup_gpu("T4")))
    assert run.compute_dtype == "float16"
    result = search_plan(load_model_config("llama-2-7b"), run)
    training = result.run.spec.training
    assert result.fits and training.micro_batch_size * training.gradient_accumulation_steps == 16
    assert training.max_seq_len == 2048


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b"])
@pytest.mark.parametrize("card", ["T4", "L4"])
@pytest.mark.parametrize("seq_len", [2048, 4096, 8192])
def test_a_small_card_plan_fills_the_card(model, card, seq_len):
    """plan-memory's plans for the small cards use what the budget leaves PyTorch (benchmarks/cases/plan-fits-gpu.yaml
    runs them for real): a plan that fits with room to spare for a larger micro-batch or fewer checkpointed layers
    would leave the card partly unused, as micro-batch 1 without checkpointing did on an L4 at seq 2048 (72%)."""
    from qlora_trainer.hardware import GPU_CATALOGUE

    spec = RunSpec().with_values({"data.packing": True, "training.max_seq_len": seq_len,
                                  "training.gradient_accumulation_steps": 16, "adapter.lora_dropout": 0.0})
    run = resolve(spec, Hardware.planned(GPU_CATALOGUE[card]))
    result = search_plan(model_shape(load_model_config(model)), run)
    assert result.fits and result.estimate.predicted_peak_bytes >= 0.9 * result.usable_bytes
