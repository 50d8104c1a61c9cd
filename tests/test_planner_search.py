"""The plan search: its objective, the user's fixed choices, the budget, and what it says when nothing fits."""

import dataclasses

import pytest

from qlora_trainer.config import config_from_dict
from qlora_trainer.planner import apply_planned_choices, fixed_choices, load_model_config, plan_from_run_config
from qlora_trainer.planner.memory import TrainingPlan, estimate_memory, model_shape
from qlora_trainer.planner.search import (MLP_CHUNK_TOKENS, SEQ_LEN_STEP, FixedChoices, candidate_plans, fits, search_plan,
                                          usable)

GIB = 2**30


@pytest.fixture(scope="module")
def llama2():
    return model_shape(load_model_config("llama-2-7b"))


BASE = TrainingPlan(seq_len=4096, micro_batch_size=4, gradient_accumulation_steps=4)  # effective batch 16


@pytest.mark.parametrize("budget_gib", [8, 12, 16, 24, 80])
def test_the_chosen_plan_is_the_first_that_fits_in_objective_order(llama2, budget_gib):
    result = search_plan(llama2, budget_gib * GIB, BASE)
    assert result.fits
    assert result.estimate.predicted_peak_bytes <= usable(budget_gib * GIB) == result.usable_bytes
    candidates = candidate_plans(llama2, BASE, FixedChoices(), 16)
    chosen = candidates.index(dataclasses.replace(result.plan, checkpointed_layers=None))
    assert not any(fits(estimate_memory(llama2, plan), budget_gib * GIB) for plan in candidates[:chosen])
    assert result.plan.micro_batch_size * result.plan.gradient_accumulation_steps == 16


@pytest.mark.parametrize("budget_gib", [8, 12, 15, 16, 24])
def test_leftover_memory_goes_to_fewer_checkpointed_layers(llama2, budget_gib):
    plan = search_plan(llama2, budget_gib * GIB, BASE).plan
    assert plan.gradient_checkpointing
    count = plan.checkpointed_layers if plan.checkpointed_layers is not None else llama2.num_layers
    one_fewer = dataclasses.replace(plan, checkpointed_layers=count - 1)
    assert fits(estimate_memory(llama2, plan), budget_gib * GIB)
    assert not fits(estimate_memory(llama2, one_fewer), budget_gib * GIB)


def test_fixed_checkpointed_layers_are_kept(llama2):
    fixed = FixedChoices(gradient_checkpointing=True, checkpointed_layers=32)
    assert search_plan(llama2, 24 * GIB, BASE, fixed).plan.checkpointed_layers == 32


def test_objective_order_all_linear_then_rank_then_optimizer_then_speed(llama2):
    plans = candidate_plans(llama2, BASE, FixedChoices(), 16)
    first, last = plans[0], plans[-1]
    assert (first.target_modules, first.rank, first.lora_alpha, first.optimizer, first.gradient_checkpointing,
            first.micro_batch_size) == ("all-linear", 64, 128.0, "adamw", False, 16)
    assert (last.target_modules, last.rank, last.optimizer, last.gradient_checkpointing, last.micro_batch_size) == (
        "attn", 8, "paged_adamw8bit", True, 1)
    position = lambda **changes: plans.index(dataclasses.replace(first, **changes))  # noqa: E731
    assert position(optimizer="paged_adamw8bit") < position(rank=32, lora_alpha=64.0)  # rank before optimizer
    assert position(micro_batch_size=1, gradient_accumulation_steps=16) < position(gradient_checkpointing=True)


def test_a_large_gpu_gets_all_linear_rank_64_without_checkpointing(llama2):
    plan = search_plan(llama2, 80 * GIB, BASE).plan
    assert (plan.target_modules, plan.rank, plan.optimizer, plan.gradient_checkpointing) == (
        "all-linear", 64, "adamw", False)


def test_fixed_choices_are_kept(llama2):
    fixed = FixedChoices(rank=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"), gradient_checkpointing=True,
                         micro_batch_size=3, optimizer="adamw8bit")
    result = search_plan(llama2, 80 * GIB, BASE, fixed)
    plan = result.plan
    assert result.fits
    assert (plan.rank, plan.lora_alpha, plan.target_modules, plan.gradient_checkpointing, plan.micro_batch_size,
            plan.optimizer) == (8, 16.0, ("q_proj", "v_proj"), True, 3, "adamw8bit")
    assert plan.gradient_accumulation_steps == 6  # 3 x 6 covers the effective batch of 16
    assert result.estimate.target_layers == 2 * 32


def test_fixed_choices_that_do_not_fit_are_kept_and_the_advice_says_what_would(llama2):
    fixed = FixedChoices(rank=64, target_modules="all-linear", gradient_checkpointing=False)
    result = search_plan(llama2, 16 * GIB, BASE, fixed)
    assert not result.fits
    assert (result.plan.rank, result.plan.gradient_checkpointing) == (64, False)
    assert "let the planner choose rank, target_modules, gradient_checkpointing" in result.advice


def test_nothing_fits_reports_the_smallest_budget_and_the_longest_sequence(llama2):
    budget = 6 * GIB  # the base fits, the leanest plan at seq 4096 does not
    result = search_plan(llama2, budget, BASE)
    assert not result.fits and not fits(result.estimate, budget)
    # the smallest budget is exact for the leanest plan, and the search finds a plan there
    assert fits(result.estimate, result.smallest_fitting_budget_bytes)
    assert not fits(result.estimate, result.smallest_fitting_budget_bytes - 2**20)
    assert search_plan(llama2, result.smallest_fitting_budget_bytes, BASE).fits
    longest = result.longest_fitting_seq_len
    assert longest % SEQ_LEN_STEP == 0 and 0 < longest < BASE.seq_len
    at = lambda seq_len: estimate_memory(llama2, dataclasses.replace(result.plan, seq_len=seq_len))  # noqa: E731
    assert fits(at(longest), budget) and not fits(at(longest + SEQ_LEN_STEP), budget)
    assert f"lower seq_len from 4096 to {longest}" in result.advice


def test_a_budget_below_the_weights_has_no_sequence_to_offer(llama2):
    result = search_plan(llama2, 3 * GIB, BASE)
    assert not result.fits and result.longest_fitting_seq_len is None
    assert result.smallest_fitting_budget_bytes > 3 * GIB


def _run_config(training: dict, adapter: dict):
    return config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}, "adapter": adapter,
                             "training": training})


def test_only_the_keys_the_user_wrote_are_fixed():
    config = _run_config({"micro_batch_size": 2, "optimizer": "adamw8bit"}, {"r": 8})
    assert fixed_choices(config) == FixedChoices(rank=8, micro_batch_size=2, optimizer="adamw8bit")


def test_plan_auto_fills_what_the_user_left_out(llama2):
    config = _run_config({"max_seq_len": 1024, "micro_batch_size": 2, "gradient_accumulation_steps": 8},
                         {"r": 8, "dropout": 0.1})
    base = plan_from_run_config(config, "float16")
    assert (base.seq_len, base.rank, base.lora_dropout, base.compute_dtype, base.micro_batch_size) == (
        1024, 8, 0.1, "float16", 2)
    result = search_plan(llama2, 16 * GIB, base, fixed_choices(config))
    planned = apply_planned_choices(config, result)
    assert planned.adapter.r == 8 and planned.training.micro_batch_size == 2  # fixed
    assert planned.adapter.target_modules == "all-linear" and planned.training.gradient_accumulation_steps == 8
    assert plan_from_run_config(planned, "float16") == result.plan


def test_offloading_is_the_last_resort_that_keeps_targets_and_rank(llama2):
    base = TrainingPlan(seq_len=32768, micro_batch_size=1, packed=True, lora_dropout=0.0)
    fixed = FixedChoices(target_modules="all-linear", rank=16)
    result = search_plan(llama2, 15 * GIB, base, fixed)
    assert result.fits and result.plan.offload_checkpoints and result.plan.gradient_checkpointing
    without = search_plan(llama2, 15 * GIB, base, dataclasses.replace(fixed, offload_checkpoints=False))
    assert not without.fits
    assert not search_plan(llama2, 15 * GIB, dataclasses.replace(base, seq_len=2048), fixed).plan.offload_checkpoints


def test_mlp_chunks_come_after_offloading_for_sequences_nothing_else_fits(llama2):
    base = TrainingPlan(seq_len=65536, micro_batch_size=1, packed=True, lora_dropout=0.0, loss_chunk_tokens=512)
    fixed = FixedChoices(target_modules="attn", rank=16)
    result = search_plan(llama2, 15 * GIB, base, fixed)
    assert result.fits and result.plan.offload_checkpoints and result.plan.mlp_chunk_tokens == MLP_CHUNK_TOKENS
    without = search_plan(llama2, 15 * GIB, base, dataclasses.replace(fixed, mlp_chunk_tokens=0))
    assert not without.fits
    shorter = search_plan(llama2, 15 * GIB, dataclasses.replace(base, seq_len=32768), fixed)
    assert shorter.fits and shorter.plan.mlp_chunk_tokens == 0  # offloading alone fits: no extra MLP forward


def test_the_t4_example_config_fits_a_t4_once_planned():
    from pathlib import Path

    from qlora_trainer.config import load_config
    from qlora_trainer.hardware import lookup_gpu

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "7b-on-a-t4.yaml")
    assert config.training.plan == "auto"
    t4 = lookup_gpu("T4")
    result = search_plan(load_model_config("llama-2-7b"), t4.usable_bytes, plan_from_run_config(config, "float16"),
                         fixed_choices(config))
    assert result.fits and result.plan.micro_batch_size * result.plan.gradient_accumulation_steps == 16
    assert apply_planned_choices(config, result).training.max_seq_len == 2048
