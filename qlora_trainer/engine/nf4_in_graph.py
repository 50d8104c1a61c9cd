"""NF4 dequantization written in torch ops, so that a compiled decoder layer generates it inside its own graph.

In a compiled layer bitsandbytes' dequantization is an opaque custom op: every call crosses the dispatcher into
Python (bitsandbytes' CUDA backend allocates and launches from there, and a double-quantized absmax is a second
kernel), and the frozen linears go through its `gemm_4bit` op the same way. At micro-batch 1 that host work is
what a 7B step waits on (benchmarks/results/vs-reference-h100-profile.txt: the bitsandbytes ops took about a fifth
of the step's host time). Written as torch ops, the compiler makes one kernel of each weight's dequantization, nested
absmax included, launched by the graph's own code. What a layer keeps for backward is unchanged: the adapted
weights' forward and backward dequantizations merge into one kept weight (compiled_layers.py), as they did as
bitsandbytes ops, and a frozen weight's backward still dequantizes with bitsandbytes (below).

The values are bitsandbytes' own: each weight is `code[q] * absmax` in fp32, rounded once to the weight's dtype, and
a double-quantized absmax is `code2[q2] * absmax2 + offset` in fp32 (bitsandbytes' kDequantizeBlockwise and
dequantize_4bit). Measured on an H100 against bitsandbytes' CUDA kernel, a 4096 x 4096 bf16 weight: the same
bits for the ops run eagerly (with and without double quantization) and compiled (without). Compiled, the nested
absmax's multiply-add may be fused into one rounding, which can move a weight by one unit in its last place; the
GPU-only tests (tests/test_nf4_in_graph.py `-k on_the_gpu`, compiled Triton kernels, with and without double
quantization) allow that much, and passed on an H100 on 2026-12-06. Only NF4 with whole blocks
takes this path (FP4, which bitsandbytes' CUDA kernel decodes by a decision tree, was not compared on a GPU);
anything else, and every call outside a compiled graph, is bitsandbytes' kernel (in eager mode these ops would
allocate indices the size of the weight). It is used where the resolved run compiles its layers (engine/build.py).
"""

from typing import Optional

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn as bnb_nn
import torch
import torch.nn.functional as F
from torch import nn


def quant_state_of(base: nn.Module):
    """The 4-bit weight's quantization state; under FSDP the gathered weight is a plain tensor and the state is
    bitsandbytes' copy on the module (Linear4bit.quant_state, kept there for FSDP)."""
    return getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)


def _in_graph(packed: torch.Tensor, quant_state) -> bool:
    """Whether this dequantization is being traced into a compiled graph and has the layout the ops below read."""
    if not torch.compiler.is_compiling() or quant_state.quant_type != "nf4":
        return False
    if getattr(quant_state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512 layout, another order
        return False
    count = quant_state.shape.numel()
    whole = count % quant_state.blocksize == 0 and quant_state.absmax.numel() == count // quant_state.blocksize
    return whole and packed.numel() * packed.element_size() * 2 == count


def _absmax(quant_state) -> torch.Tensor:
    """The fp32 absmax of each block; a double-quantized one dequantized as bitsandbytes does."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    inner = quant_state.state2
    count = quant_state.absmax.numel()
    scale = inner.absmax.float()[:, None].expand(-1, inner.blocksize).reshape(-1)[:count]
    return inner.code.float()[quant_state.absmax.long()] * scale + quant_state.offset.float()


def dequantize_ops(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight in `dtype`, as torch ops: each byte holds two codes, the first in its high half."""
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
    values = quant_state.code.float()[codes.long()].view(-1, quant_state.blocksize)
    return (values * _absmax(quant_state)[:, None]).to(dtype).view(quant_state.shape)


def dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight in `dtype`: the ops above inside a compiled graph, bitsandbytes' kernel elsewhere."""
    if _in_graph(packed, quant_state):  # as bitsandbytes: in the state's dtype, then cast
        return dequantize_ops(packed, quant_state, quant_state.dtype).to(dtype)
    return bnb_functional.dequantize_4bit(packed, quant_state).to(dtype)


class _FrozenLinear4bitFunction(torch.autograd.Function):
    """`x W^T + bias` for a frozen 4-bit W, as bitsandbytes' MatMul4Bit computes it for more than 1,536 rows
    (dequantize to the input's dtype, then a matmul, outside autocast), the forward's dequantization in the graph.

    The backward dequantizes again with bitsandbytes' kernel and keeps nothing but the packed weight, as MatMul4Bit
    does. Written as the same ops, the compiler's common-subexpression pass would merge it with the forward's, and
    since its partitioner does not recompute gathers, every frozen weight of the layer would be kept in 16 bits
    through the layer's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor]) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # a custom op, bitsandbytes' matmul ignores autocast
            out = F.linear(x, dequantize_ops(packed, quant_state, x.dtype), bias)
        ctx.packed, ctx.quant_state, ctx.has_bias = packed, quant_state, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ bnb_functional.dequantize_4bit(ctx.packed, ctx.quant_state).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Linear4bitInGraph(bnb_nn.Linear4bit):
    """bitsandbytes' frozen 4-bit linear, whose forward inside a compiled graph dequantizes with the graph's own
    ops (the function above); elsewhere bitsandbytes' forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_state = quant_state_of(self)
        if quant_state is None or self.compute_dtype is None or not _in_graph(self.weight, quant_state):
            return super().forward(x)
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias: Optional[torch.Tensor] = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _FrozenLinear4bitFunction.apply(x, self.weight, quant_state, bias)
        return out if out.dtype == in_dtype else out.to(in_dtype)  # no no-op .to() on the function's output


def use_in_graph_dequantization(model: nn.Module) -> int:
    """Give every frozen bitsandbytes 4-bit linear (the base layers under adapters included) the forward above;
    returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is bnb_nn.Linear4bit:
            module.__class__ = Linear4bitInGraph
            count += 1
    return count
