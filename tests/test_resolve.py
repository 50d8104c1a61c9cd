"""Resolving a run specification for the hardware: compute dtype, loss scaling, speed paths, budget and its rule."""

import dataclasses

import pytest

from qlora_trainer.errors import ConfigError
from qlora_trainer.hardware import CPU, GPU_CATALOGUE, Hardware, lookup_gpu
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.spec.resolve import CUDA_CONTEXT_BYTES, PACKED_VARLEN, SAFETY_MARGIN_FRACTION, Budget

T4, L4 = Hardware.planned(lookup_gpu("T4")), Hardware.planned(lookup_gpu("L4"))


def test_compute_dtype_follows_the_gpu_unless_set():
    assert (resolve(RunSpec(), T4).compute_dtype, resolve(RunSpec(), T4).loss_scaling) == ("float16", True)
    assert (resolve(RunSpec(), L4).compute_dtype, resolve(RunSpec(), L4).loss_scaling) == ("bfloat16", False)
    assert resolve(RunSpec(), CPU).compute_dtype == "bfloat16" and not resolve(RunSpec(), CPU).loss_scaling
    fp16 = RunSpec().with_values({"quantization.compute_dtype": "float16"})
    assert resolve(fp16, L4).compute_dtype == "float16" and resolve(fp16, L4).loss_scaling
    with pytest.raises(ConfigError, match="quantization.compute_dtype: bfloat16 is not supported by T4"):
        resolve(RunSpec().with_values({"quantization.compute_dtype": "bfloat16"}), T4)


def test_layers_compile_by_default_on_gpus_triton_can_target_and_when_asked():
    assert resolve(RunSpec(), L4).compile_layers and resolve(RunSpec(), T4).compile_layers
    assert not resolve(RunSpec(), CPU).compile_layers
    assert not resolve(RunSpec(), Hardware(L4.gpu, "cuda", triton=False)).compile_layers
    old_card = dataclasses.replace(L4.gpu, compute_capability=(6, 1))
    assert not resolve(RunSpec(), Hardware.planned(old_card)).compile_layers
    assert resolve(RunSpec().with_values({"training.compile_layers": "on"}), CPU).compile_layers
    assert not resolve(RunSpec().with_values({"training.compile_layers": "off"}), L4).compile_layers


def test_packed_sdpa_runs_the_varlen_kernel_where_the_gpu_and_torch_have_it():
    packed = RunSpec().with_values({"data.packing": True})
    assert resolve(packed, L4).attention == PACKED_VARLEN
    assert resolve(packed, T4).attention == "sdpa"  # compute capability 7.5: no flash kernel
    assert resolve(packed, CPU).attention == "sdpa"
    assert resolve(packed, Hardware(L4.gpu, "cuda", varlen_attention=False)).attention == "sdpa"
    assert resolve(RunSpec(), L4).attention == "sdpa"  # unpacked rows keep SDPA
    assert resolve(packed.with_values({"model.attn_implementation": "eager"}), L4).attention == "eager"
    # a named implementation is used as named: sdpa on packed rows keeps the block-diagonal mask
    assert resolve(packed.with_values({"model.attn_implementation": "sdpa"}), L4).attention == "sdpa"


def test_fused_lora_applies_to_lora_over_a_4bit_base_only():
    assert resolve(RunSpec(), L4).fused_lora
    for values in ({"adapter.type": "loha"}, {"quantization.mode": "int8"}, {"quantization.mode": "none"},
                   {"training.fused_lora": False}):
        assert not resolve(RunSpec().with_values(values), L4).fused_lora, values


def test_budget_is_the_card_or_the_cap_and_fits_keeps_the_margin_and_context():
    assert resolve(RunSpec(), CPU).budget is None
    budget = resolve(RunSpec(), T4).budget
    assert budget.budget_bytes == GPU_CATALOGUE["T4"].usable_bytes
    assert budget.usable_bytes == int(budget.budget_bytes * (1 - SAFETY_MARGIN_FRACTION)) - CUDA_CONTEXT_BYTES
    assert budget.fits(budget.usable_bytes) and not budget.fits(budget.usable_bytes + 1)
    capped = resolve(RunSpec().with_values({"training.memory_cap_gib": 10}), L4).budget
    assert capped.budget_bytes == 10 * 2**30 and "capped at 10 GiB" in capped.device_name
    peak = 7 * 2**30
    needed = Budget.needed_for(peak)
    assert Budget("x", needed).fits(peak) and not Budget("x", needed - 2**20).fits(peak)


def test_with_values_changes_a_copy_and_resolves_again():
    run = resolve(RunSpec(), L4)
    changed = run.with_values({"adapter.r": 64, "quantization.compute_dtype": "float16"})
    assert (changed.spec.adapter.r, changed.compute_dtype, changed.loss_scaling) == (64, "float16", True)
    assert run.spec.adapter.r == 16 and run.compute_dtype == "bfloat16"
    with pytest.raises(KeyError):
        RunSpec().with_values({"adapter.rank": 8})


def test_auto_attention_is_settled_for_what_the_model_needs():
    """Gemma-2 caps its attention logits (neither SDPA nor the varlen kernel can): eager. Attention dropout (the varlen
    kernel has none): SDPA. Otherwise auto stays, and a named implementation is never changed."""
    from transformers import Gemma2Config, LlamaConfig

    from qlora_trainer.engine.base import settle_auto_attention

    packed = RunSpec().with_values({"data.packing": True})
    gemma2 = settle_auto_attention(packed, Gemma2Config())
    assert gemma2.model.attn_implementation == "eager" and resolve(gemma2, L4).attention == "eager"
    dropout = settle_auto_attention(packed, LlamaConfig(attention_dropout=0.1))
    assert resolve(dropout, L4).attention == "sdpa"
    assert settle_auto_attention(packed, LlamaConfig()) is packed and resolve(packed, L4).attention == PACKED_VARLEN
    named = packed.with_values({"model.attn_implementation": "sdpa"})
    assert settle_auto_attention(named, Gemma2Config()) is named
