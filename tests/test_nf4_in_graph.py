"""NF4 dequantization as torch ops (engine/nf4_in_graph.py) against bitsandbytes' own kernels (the CPU ones here;
`-k on_the_gpu` the CUDA ones), and compiled layers that dequantize in their own graphs."""

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn as bnb_nn
import pytest
import torch
from torch import fx

from qlora_trainer.engine import fused_lora, nf4_in_graph
from test_fast_paths import _adapted, _grads, _kept_tensors


def _quantized(rows: int, cols: int, dtype: torch.dtype, quant_type: str, nested: bool, device: str = "cpu"):
    weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype).to(device)
    return bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
def test_the_ops_give_bitsandbytes_values_bit_for_bit(dtype, nested):
    """384 x 320 weights: 1,920 absmax values, so the double quantization's last block of 256 is partial."""
    packed, state = _quantized(384, 320, dtype, "nf4", nested)
    assert state.absmax.numel() % 256 and state.nested == nested
    want = bnb_functional.dequantize_4bit(packed, state)
    got = nf4_in_graph.dequantize_ops(packed, state, state.dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_packed_bytes_stored_as_floats_read_the_same(storage):
    """FSDP shards 4-bit weights stored in a float dtype (bitsandbytes' quant_storage): the same bytes, read as
    codes."""
    weight = (torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True,
                                                 quant_storage=storage)
    assert packed.dtype == storage
    assert torch.equal(nf4_in_graph.dequantize_ops(packed, state, torch.bfloat16),
                       bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("nested", [False, True])
def test_compiled_ops_on_the_gpu_give_the_cuda_kernels_values(nested):
    """Compiled, on the GPU (one generated kernel), against bitsandbytes' CUDA kernel on a Llama-sized weight. The
    compiler may fuse the nested absmax's multiply-add (one fp32 rounding instead of two); a bf16 weight then
    differs from bitsandbytes' by at most one unit in its last place, where an fp32 product lies on a rounding
    boundary."""
    packed, state = _quantized(4096, 4096, torch.bfloat16, "nf4", nested, device="cuda")
    want = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(nf4_in_graph.dequantize_ops(packed, state, torch.bfloat16), want)  # eagerly: the same bits
    got = torch.compile(nf4_in_graph.dequantize_ops, fullgraph=True)(packed, state, torch.bfloat16)
    if not nested:
        assert torch.equal(got, want)
    one_ulp = 2.0 ** (torch.frexp(want.float().abs())[1] - 8)  # bf16: 8 significant bits
    assert ((got.float() - want.float()).abs() <= one_ulp).all()
    assert (got != want).float().mean() < 1e-3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_only_nf4_dequantizes_in_the_graph(quant_type):
    """Traced, NF4 becomes the ops above; FP4 stays bitsandbytes' op (its CUDA kernel was not compared to them)."""
    import torch._dynamo

    packed, state = _quantized(128, 64, torch.bfloat16, quant_type, nested=True)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(lambda p: nf4_in_graph.dequantize(p, state, torch.float32), fullgraph=True,
                             backend=lambda graph, _inputs: graphs.append(graph) or graph.forward)
    assert torch.equal(compiled(packed), bnb_functional.dequantize_4bit(packed, state).float())
    assert ("bitsandbytes" in _graph_code(graphs)) == (quant_type == "fp4")


def _graph_code(graphs: list[fx.GraphModule]) -> str:
    modules = [module for graph in graphs for module in graph.modules()]
    return "\n".join(module.code for module in modules if isinstance(module, fx.GraphModule))


@pytest.mark.parametrize("targets,autocast", [("all-linear", False), ("attn", False), ("attn", True)])
def test_compiled_layers_dequantize_in_their_own_graph_with_the_same_gradients(tiny_llama_dir, monkeypatch,
                                                                               targets, autocast):
    """With in-graph dequantization the layers' forward graphs hold no bitsandbytes op: the adapted (fused LoRA)
    and, with attention adapted only, the frozen MLP linears dequantize with the ops above; only a frozen weight's
    backward calls bitsandbytes. Logits and gradients are those of the same layers compiled with bitsandbytes' ops:
    the same values computed by other ops. Under bf16 autocast over an fp32 base (fp32 adapters) the frozen matmul
    stays in fp32, as bitsandbytes' op (which autocast does not touch) computes it."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func

    from qlora_trainer.engine.compiled_layers import compile_decoder_layers

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))

    def compiled_grads(backend, in_graph: bool):
        model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32", targets=targets)
        fused_lora.use_fused_lora(model)
        assert nf4_in_graph.use_in_graph_dequantization(model) == 2 * 7  # every 4-bit base layer, adapted or not
        with monkeypatch.context() as patch:
            if not in_graph:  # the layers as they were compiled before: bitsandbytes' ops in the graphs
                patch.setattr(nf4_in_graph, "_in_graph", lambda packed, quant_state: False)
            torch._dynamo.reset()
            counters.clear()
            assert compile_decoder_layers(model, backend=backend) == 2
            result = _grads(model, x, autocast=autocast)
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
        return result

    forward_graphs, backward_graphs = [], []

    def keeping(graphs: list):
        def compiler(graph: fx.GraphModule, _inputs):
            graphs.append(graph)
            return make_boxed_func(graph.forward)
        return compiler

    want_logits, want = compiled_grads("aot_eager", in_graph=False)
    got_logits, got = compiled_grads(aot_autograd(fw_compiler=keeping(forward_graphs),
                                                  bw_compiler=keeping(backward_graphs)), in_graph=True)
    forward_code, backward_code = _graph_code(forward_graphs), _graph_code(backward_graphs)
    assert "bitsandbytes" not in forward_code and "bitwise_and" in forward_code
    assert ("bitsandbytes.dequantize_4bit" in backward_code) == (targets == "attn")
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def _kept_for_backward(model) -> list[tuple]:
    """Shapes and dtypes of what checkpointed layers compiled with inductor's partitioner keep for backward, the
    4-bit weights' tensors among them."""
    import torch._dynamo

    from qlora_trainer.engine.compiled_layers import compile_decoder_layers

    torch._dynamo.reset()
    compile_decoder_layers(model, backend="aot_eager_decomp_partition")
    return sorted((tuple(t.shape), t.numel(), str(t.dtype)) for t in _kept_tensors(model))


def test_in_graph_dequantization_keeps_what_bitsandbytes_ops_kept(tiny_llama_dir):
    """The memory a layer holds in backward does not change (the planner counts it): with attention adapted, the
    adapted weights are kept in 16 bits as before (the merged dequantization) and no frozen MLP weight is, though
    its forward dequantizes in the graph."""
    models = []
    for in_graph in (False, True):
        model = _adapted(tiny_llama_dir, "float32", targets="attn")
        fused_lora.use_fused_lora(model)
        if in_graph:
            nf4_in_graph.use_in_graph_dequantization(model)
        models.append(model)
    before, after = (_kept_for_backward(model) for model in models)
    def weights(kept: list, shapes: set) -> list:
        return [k for k in kept if k[0] in shapes and k[2] == "torch.bfloat16"]

    assert not weights(after, {(64, 128), (128, 64)})  # the MLP's
    assert weights(after, {(32, 64), (64, 64)}) == weights(before, {(32, 64), (64, 64)}) != []  # attention's
    # everything else the same sizes (a frozen linear's output may be kept as another view); the packed weights
    # are graph inputs, no longer saved by MatMul4Bit
    def others(kept: list) -> list:
        return sorted(k[1:] for k in kept if k[2] != "torch.uint8")

    assert others(after) == others(before)


def test_outside_a_compiled_graph_the_frozen_linear_is_bitsandbytes_own(tiny_llama_dir):
    """Eager calls keep bitsandbytes' kernels (the ops would allocate indices the size of the weight)."""
    model = _adapted(tiny_llama_dir, "float32", checkpointing=False, compute_dtype="float32", targets="attn")
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    assert type(layer) is bnb_nn.Linear4bit
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    want = layer(x)
    nf4_in_graph.use_in_graph_dequantization(model)
    assert type(layer) is nf4_in_graph.Linear4bitInGraph
    calls = []
    original = nf4_in_graph.dequantize_ops
    nf4_in_graph.dequantize_ops = lambda *a: calls.append(1) or original(*a)
    try:
        got = layer(x)
    finally:
        nf4_in_graph.dequantize_ops = original
    assert not calls and torch.equal(got, want)
