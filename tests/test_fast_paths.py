"""The speed paths against the plain computation on the real bitsandbytes CPU kernels: fused LoRA-on-NF4 (against
peft), compiled decoder layers and chunked MLPs (against eager)."""

import pytest
import torch

from qlora_trainer import adapters, fused_lora
from qlora_trainer.config import AdapterConfig, ModelConfig, QuantizationConfig
from qlora_trainer.model import load_base, load_model_config


def _adapted(tiny_llama_dir, dtype: str, dropout: float = 0.0, checkpointing: bool = True,
             compute_dtype: str = "bfloat16"):
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "all-linear")
    base = load_base(ModelConfig(path=str(tiny_llama_dir)), QuantizationConfig(compute_dtype=compute_dtype),
                     checkpointing).model
    torch.manual_seed(0)
    peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, dropout=dropout, dtype=dtype), keys, layers)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a non-zero B, so that every path contributes
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    return peft_model.train()


def _grads(peft_model, x, autocast: bool):
    peft_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = peft_model(input_ids=x).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "compute_dtype, dtype, autocast, tolerance",
    [("float32", "float32", False, 1e-5),  # no rounding to 16 bits anywhere: the paths agree to fp32 precision
     ("bfloat16", "float32", False, 0.03), ("bfloat16", "bfloat16", False, 0.03),
     ("bfloat16", "float32", True, 0.03), ("bfloat16", "bfloat16", True, 0.03)],
    ids=["fp32", "bf16-base", "bf16-all", "autocast-fp32-adapter", "autocast-bf16-adapter"],
)
def test_fused_path_matches_peft_outputs_and_gradients(tiny_llama_dir, compute_dtype, dtype, autocast, tolerance):
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
    # relative error norms; in 16 bits the two paths round the same products at different points
    assert (got_logits - want_logits).norm() / want_logits.norm() < tolerance
    assert want.keys() == got.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name, grad in got.items():
        assert grad.dtype == want[name].dtype
        error = (grad.float() - want[name].float()).norm() / want[name].float().norm()
        assert error < 2 * tolerance, (name, error.item())


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


def test_compiled_layers_trace_in_one_graph_with_the_same_gradients(tiny_llama_dir):
    """compile_decoder_layers under checkpointing: one graph for all layers in each of the checkpoint's two passes
    (the no-grad forward, the recomputation with grad), no graph break, eager's gradients.

    aot_eager runs the captured graphs without generating kernels, so this checks what torch.compile traces
    (the fused LoRA function and bitsandbytes' dequantization included) in seconds rather than a C++ build.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qlora_trainer.compiled_layers import compile_decoder_layers

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32")
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


def test_chunked_mlps_keep_gradients_and_run_the_mlp_again_in_backward(tiny_llama_dir):
    """8-token chunks of a 24-token sequence: the MLPs only ever see 8 tokens, and the results equal the unchunked
    model's. (How often a chunk reruns in backward is up to torch's nested non-reentrant checkpoints.)"""
    from qlora_trainer.chunked_mlp import chunk_mlps

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32")
    fused_lora.use_fused_lora(model)
    want_logits, want = _grads(model, x, autocast=False)
    assert chunk_mlps(model, chunk_tokens=8) == 2
    mlp_calls = []
    for layer in model.get_base_model().model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda module, args, out: mlp_calls.append(args[0].shape[1]))
    got_logits, got = _grads(model, x, autocast=False)
    assert set(mlp_calls) == {8} and len(mlp_calls) > 3 * 2  # 3 chunks x 2 layers in the forward, more in backward
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def test_compilation_is_automatic_on_gpus_only():
    from qlora_trainer.compiled_layers import should_compile

    cpu = torch.device("cpu")
    assert not should_compile("auto", cpu) and should_compile("on", cpu) and not should_compile("off", cpu)
