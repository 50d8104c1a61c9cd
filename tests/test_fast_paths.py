"""The speed paths against the plain computation on the real bitsandbytes CPU kernels: fused LoRA-on-NF4 (against
peft), compiled decoder layers and chunked MLPs (against eager)."""

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn as bnb_nn
import pytest
import torch
from torch import nn

from conftest import tiny_base
from qlora_trainer.engine import adapters, fused_lora
from qlora_trainer.engine.base import load_model_config
from qlora_trainer.spec import AdapterConfig, ModelConfig


def _adapted(tiny_llama_dir, dtype: str, dropout: float = 0.0, checkpointing: bool = True,
             compute_dtype: str = "bfloat16", targets: str = "all-linear"):
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, targets)
    base = tiny_base(tiny_llama_dir, checkpointing, compute_dtype=compute_dtype).model
    torch.manual_seed(0)
    peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, lora_dropout=dropout, dtype=dtype), keys, layers)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a non-zero B, so that every path contributes; drawn in fp32 whatever the adapter's
            # dtype (torch's bf16 normal_ draws other numbers), so fp32 and bf16 builds agree up to bf16 rounding
            b = torch.empty(param.shape).normal_(std=0.1, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                param.copy_(b)
    return peft_model.train()


def _grads(peft_model, x, autocast: bool):
    peft_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = peft_model(input_ids=x).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _fp32_reference(tiny_llama_dir, model, x):
    """Logits and gradients of `model`'s weights computed in fp32 throughout: compute dtype, adapters, no autocast.

    The reference is built like `model` (same checkpoint, same seeds), checked to hold the same weights up to
    bf16 rounding, then given `model`'s own float weights exactly (an exact upcast: bf16 adapters, and peft
    initialises lora_A in the base's bf16 before casting fp32 adapters up), so only the arithmetic differs. The
    NF4 base is quantized from the same bf16 checkpoint in both: the same packed bits and quantization state,
    dequantizing to the same weights, which the 16-bit compute dtype rounds to bf16.
    """
    reference = _adapted(tiny_llama_dir, "float32", compute_dtype="float32")
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == ref_params.keys()
    with torch.no_grad():
        for name, param in params.items():
            ref_param = ref_params[name]
            if not param.is_floating_point():  # packed NF4
                assert torch.equal(ref_param, param), name
                continue
            assert torch.equal(ref_param.to(torch.bfloat16), param.to(torch.bfloat16)), name
            ref_param.copy_(param)
    modules = dict(model.named_modules())
    quantized = [(name, module) for name, module in reference.named_modules() if isinstance(module, bnb_nn.Linear4bit)]
    assert len(quantized) == 2 * 7
    for name, ref_module in quantized:
        weight = modules[name].weight
        ref_weight = bnb_functional.dequantize_4bit(ref_module.weight, ref_module.weight.quant_state)
        assert ref_weight.dtype == torch.float32 and torch.equal(
            ref_weight.to(weight.quant_state.dtype), bnb_functional.dequantize_4bit(weight, weight.quant_state)), name
    return _grads(reference, x, autocast=False)


# bfloat16's unit roundoff: 8 significand bits, so rounding one value errs by at most 2**-8 relative
BF16_UNIT_ROUNDOFF = 2.0 ** -8


@pytest.mark.parametrize(
    "compute_dtype, dtype, autocast",
    [("float32", "float32", False),
     ("bfloat16", "float32", False), ("bfloat16", "bfloat16", False),
     ("bfloat16", "float32", True), ("bfloat16", "bfloat16", True)],
    ids=["fp32", "bf16-base", "bf16-all", "autocast-fp32-adapter", "autocast-bf16-adapter"],
)
def test_fused_path_matches_peft_outputs_and_gradients(tiny_llama_dir, compute_dtype, dtype, autocast):
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, dtype, compute_dtype=compute_dtype)
    want_logits, want = _grads(model, x, autocast)
    assert fused_lora.use_fused_lora(model) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    calls = []
    original = fused_lora._LoRAOn4bitFunction.apply
    fused_lora._LoRAOn4bitFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        got_logits, got = _grads(model, x, autocast)
    finally:
        fused_lora._LoRAOn4bitFunction.apply = original
    assert len(calls) == 2 * 2 * 7  # forward and the checkpointed recomputation
    assert want.keys() == got.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name, grad in got.items():
        assert grad.dtype == want[name].dtype
    if compute_dtype == "float32" and not autocast:
        # no rounding to 16 bits anywhere: the paths agree to fp32 precision (relative error norms)
        tolerance = 1e-5
        assert _relative_error(got_logits, want_logits) < tolerance
        for name, grad in got.items():
            error = _relative_error(grad, want[name])
            assert error < 2 * tolerance, (name, error)
        return
    # In 16 bits the two paths round the same products at different points, so neither matches the other to a fixed
    # tolerance: the size of their errors depends on bf16 and on the CPU's bf16 kernels (AVX512-BF16 ones round
    # differently from AVX2 ones). Both are measured against the exact arithmetic, an fp32 run of the same weights,
    # and peft's own error there is the accepted standard: for the logits and every gradient, the fused path's
    # relative error norm is at most max(2 x peft's, 4 u), u = 2**-8 bfloat16's unit roundoff. Rounding at
    # different points gives errors of the same size (not the same errors) as peft's, hence the factor 2, which
    # is no fixed constant but a multiple of the error bf16 makes here; 4 u floors it where peft's error happens
    # to be only a few roundings (one rounding of a tensor already errs by up to u). A real mistake in the fused
    # path, such as a LoRA update 10% off, is well beyond this.
    ref_logits, ref = _fp32_reference(tiny_llama_dir, model, x)
    assert ref.keys() == got.keys()
    results = [("logits", got_logits, want_logits, ref_logits)]
    results += [(name, got[name], want[name], ref[name]) for name in ref]
    for name, fused_result, peft_result, ref_result in results:
        peft_error = _relative_error(peft_result, ref_result)
        fused_error = _relative_error(fused_result, ref_result)
        # the reference is the same model: peft's error is bf16's, well below the O(1) of other weights
        assert peft_error < 0.5, (name, peft_error)
        bound = max(2 * peft_error, 4 * BF16_UNIT_ROUNDOFF)
        assert fused_error <= bound, (name, fused_error, peft_error, bound)


def test_dropout_masks_and_gradients_match_peft(tiny_llama_dir):
    """With dropout the fused path draws peft's masks (its own dropout modules, same RNG order)."""
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", dropout=0.3, compute_dtype="float32")
    torch.manual_seed(5)
    want_logits, want = _grads(model, x, autocast=False)
    fused_lora.use_fused_lora(model)
    torch.manual_seed(5)
    got_logits, got = _grads(model, x, autocast=False)
    torch.manual_seed(6)
    other_logits, _ = _grads(model, x, autocast=False)
    assert (other_logits - want_logits).abs().max() > 1e-3  # the masks matter, so agreeing below means they match
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def test_disabled_and_merged_adapters_take_peft_path(tiny_llama_dir):
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    original = fused_lora._LoRAOn4bitFunction.apply
    fused_lora._LoRAOn4bitFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        model = _adapted(tiny_llama_dir, "float32", checkpointing=False).eval()
        with torch.no_grad(), model.disable_adapter():
            base_logits = model(input_ids=x).logits
        fused_lora.use_fused_lora(model)
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, base_logits)
        assert calls == []
        with torch.no_grad():
            adapted = model(input_ids=x).logits
        assert len(calls) == 14 and (adapted - base_logits).abs().max() > 1e-3
        model.merge_adapter()  # the delta now lives in the requantized base: peft's path
        with torch.no_grad():
            merged = model(input_ids=x).logits
        assert len(calls) == 14
        assert (merged - adapted).norm() < 0.5 * (adapted - base_logits).norm()  # requantizing costs some
    finally:
        fused_lora._LoRAOn4bitFunction.apply = original


@pytest.mark.parametrize("targets", ["all-linear", "attn"])
def test_compiled_layers_trace_in_one_graph_with_the_same_gradients(tiny_llama_dir, targets):
    """compile_decoder_layers under checkpointing: one graph for all layers in each of the checkpoint's two passes
    (the no-grad forward, the recomputation with grad), no graph break, eager's gradients. With attention adapted
    only, the MLP's frozen 4-bit linears (bitsandbytes' MatMul4Bit) are in the graph too.

    aot_eager runs the captured graphs without generating kernels, so this checks what torch.compile traces
    (the fused LoRA function and bitsandbytes' dequantization included) in seconds rather than a C++ build.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qlora_trainer.engine.compiled_layers import compile_decoder_layers

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32", targets=targets)
    fused_lora.use_fused_lora(model)
    want_logits, want = _grads(model, x, autocast=False)
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model, backend="aot_eager") == 2
    got_logits, got = _grads(model, x, autocast=False)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def test_chunked_mlps_keep_gradients_and_run_the_mlp_again_in_backward(tiny_llama_dir, monkeypatch):
    """8-token chunks of a 24-token sequence: the MLPs and the final norm only ever see 8 tokens, and the results
    equal the unchunked model's. (How often a chunk reruns in backward is up to torch's nested non-reentrant
    checkpoints.)"""
    from qlora_trainer.engine.token_chunks import chunk_mlps

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32")
    fused_lora.use_fused_lora(model)
    want_logits, want = _grads(model, x, autocast=False)
    assert chunk_mlps(model, chunk_tokens=8) == 2
    mlp_calls = []
    for layer in model.get_base_model().model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda module, args, out: mlp_calls.append(args[0].shape[1]))
    norm = model.get_base_model().model.norm
    norm_class = type(norm).__bases__[1]  # the model's own, under the chunked forward mixed in front of it
    norm_calls, norm_forward = [], norm_class.forward  # what the chunks call (the module's call sees the whole)

    def recorded(self, hidden):
        if self is norm:  # the layers' norms are of its class
            norm_calls.append(hidden.shape[1])
        return norm_forward(self, hidden)

    monkeypatch.setattr(norm_class, "forward", recorded)
    got_logits, got = _grads(model, x, autocast=False)
    assert set(mlp_calls) == {8} and len(mlp_calls) > 3 * 2  # 3 chunks x 2 layers in the forward, more in backward
    assert set(norm_calls) == {8} and len(norm_calls) == 2 * 3  # each chunk in the forward and again in backward
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def _dequantized_weights_kept(model) -> list[tuple]:
    """Shapes of the 16-bit tensors shaped like an adapted base weight that one compiled forward keeps for backward."""
    import torch._dynamo

    weight_shapes = {tuple(m.get_base_layer().weight.quant_state.shape) for m in model.modules()
                     if isinstance(m, fused_lora.FusedLoRALinear4bit)}
    assert weight_shapes
    torch._dynamo.reset()
    return [tuple(t.shape) for t in _kept_tensors(model)
            if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes]


def _kept_tensors(model) -> list[torch.Tensor]:
    """What one forward and backward of `model` (bf16 autocast, one 24-token row) keeps for backward."""
    kept = []
    x = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x).logits.float().square().mean().backward()
    return kept


def test_a_compiled_layer_that_keeps_its_activations_keeps_no_dequantized_weight(tiny_llama_dir):
    """Without checkpointing, what a compiled layer keeps is the partitioner's choice (compiled_layers.py): with
    common-subexpression elimination on, it keeps every adapted weight dequantized to 16 bits, which the planner
    does not count (and should not cost). `aot_eager_decomp_partition` partitions with inductor's min-cut
    rematerialization, without generating kernels."""
    import torch._functorch.config as functorch_config

    from qlora_trainer.engine.compiled_layers import compile_decoder_layers

    model = _adapted(tiny_llama_dir, "float32", checkpointing=False, targets="all-linear")
    fused_lora.use_fused_lora(model)
    compile_decoder_layers(model, backend="aot_eager_decomp_partition")
    assert not functorch_config.cse
    assert _dequantized_weights_kept(model) == []
    try:  # the reason: the same layers compiled with the pass on keep them
        functorch_config.cse = True
        assert _dequantized_weights_kept(model)
    finally:
        functorch_config.cse = True


def test_a_weight_gathered_without_its_quantization_state_still_takes_the_fused_path(tiny_llama_dir):
    """FSDP2 gathers a layer's packed weight into a plain tensor, without bitsandbytes' quant_state attribute; the
    fused path then reads the state bitsandbytes keeps on the module, and computes the same."""
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", checkpointing=False, compute_dtype="float32").eval()
    assert fused_lora.use_fused_lora(model) == 14
    with torch.no_grad():
        want = model(input_ids=x).logits
    for module in model.modules():
        if isinstance(module, fused_lora.FusedLoRALinear4bit):
            base = module.get_base_layer()
            base.weight = nn.Parameter(base.weight.data, requires_grad=False)  # as FSDP2's unsharded parameter
            assert getattr(base.weight, "quant_state", None) is None and base.quant_state is not None
    calls = []
    original = fused_lora._LoRAOn4bitFunction.apply
    fused_lora._LoRAOn4bitFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            got = model(input_ids=x).logits
    finally:
        fused_lora._LoRAOn4bitFunction.apply = original
    assert len(calls) == 14
    assert torch.equal(got, want)


def test_a_base_forward_in_eval_mode_leaves_the_4bit_weights_as_the_fused_path_reads_them(tiny_llama_dir):
    """bitsandbytes rewrites a 4-bit weight in place for its CPU kernel when its own forward runs in eval mode on an
    input needing no gradient (CPUs with AVX512-BF16); the fused path then read garbage after a base-only pass, as
    `generate --with-base` makes. The base is loaded with that repacking off, so the adapted outputs stay put."""
    model = _adapted(tiny_llama_dir, "float32", checkpointing=False, targets="attn").eval()
    assert all(not module.support_avx512bf16_for_cpu for module in model.modules()
               if isinstance(module, bnb_nn.Linear4bit))
    fused_lora.use_fused_lora(model)
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the outputs, so equal below means unchanged
    assert torch.equal(again, adapted)
