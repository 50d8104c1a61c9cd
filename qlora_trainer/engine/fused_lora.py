"""LoRA on a 4-bit base in one autograd function per layer, instead of peft's and bitsandbytes' chains of ops.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`, the base through bitsandbytes' MatMul4Bit: with
fp32 adapters under autocast that is a dozen kernels and as many Python dispatches per layer and direction, and at
micro-batch 1 a 7B model's GPU waits on them (benchmarks/results/vs-reference-h100-profile.txt). Here the forward is
dequantize, x W^T (+ bias), then `+= scaling (x A^T) B^T` in one addmm; the backward dequantizes again (as
bitsandbytes does) rather than keeping the 16-bit weight, and saves only x and x A^T, the tensors peft saves too.
Inside a compiled layer the dequantization is the graph's own (nf4_in_graph.py).

With dropout, the adapter's input is peft's own dropout module's output (same masks, same RNG order), passed in
beside x. It applies to plain LoRA (no DoRA) on one active, unmerged adapter; anything else (several adapters,
disabled or merged adapters, mixed-batch inference) goes through peft's own forward.
"""

from typing import Optional

import torch
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from torch import nn

from qlora_trainer.engine.nf4_in_graph import dequantize, quant_state_of


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, but the tensor itself when it has that dtype: torch 2.11's torch.compile dropped this
    function's adapter gradients (all zero) when its output was a no-op `.to()` of a tensor computed inside it
    (benchmarks/results/engine-h100.md)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _LoRAOn4bitFunction(torch.autograd.Function):
    """`x W^T + bias + scaling (lora_x A^T) B^T` with W dequantized from NF4; lora_x None means x itself (no dropout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_x: Optional[torch.Tensor], packed: torch.Tensor, quant_state,
                bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                base_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        base_in = flat.to(base_dtype)
        weight = dequantize(packed, quant_state, base_dtype)
        out = torch.addmm(bias.to(base_dtype), base_in, weight.t()) if bias is not None else base_in @ weight.t()
        lora_in = (flat if lora_x is None else lora_x.reshape(-1, x.shape[-1])).to(lora_dtype)
        a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
        xa = lora_in @ a.t()
        if lora_dtype == base_dtype:
            out.addmm_(xa, b.t(), alpha=scaling)
        else:
            out.add_((xa @ b.t()).mul_(scaling).to(base_dtype))
        ctx.save_for_backward(lora_in, xa, a, b)
        ctx.packed, ctx.quant_state, ctx.scaling = packed, quant_state, scaling
        ctx.dtypes = (x.dtype, base_dtype, lora_a.dtype, lora_b.dtype)
        ctx.in_shape, ctx.separate_lora_x = x.shape, lora_x is not None
        return _cast(out.view(*x.shape[:-1], out.shape[-1]), x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        lora_in, xa, a, b = ctx.saved_tensors
        x_dtype, base_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_lora = grad.to(lora_in.dtype)
        grad_xa = (grad_lora @ b).mul_(ctx.scaling)  # tokens x r
        grad_x = grad_lora_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(ctx.packed, ctx.quant_state, base_dtype)
            grad_x = grad.to(base_dtype) @ weight
            if not ctx.separate_lora_x and lora_in.dtype == base_dtype:
                grad_x.addmm_(grad_xa, a)
            elif not ctx.separate_lora_x:
                grad_x.add_((grad_xa @ a).to(base_dtype))
            grad_x = _cast(grad_x.view(ctx.in_shape), x_dtype)
        if ctx.separate_lora_x and ctx.needs_input_grad[1]:
            grad_lora_x = _cast((grad_xa @ a).view(ctx.in_shape), x_dtype)
        if ctx.needs_input_grad[5]:
            grad_a = _cast(grad_xa.t() @ lora_in, a_dtype)
        if ctx.needs_input_grad[6]:
            grad_b = _cast((grad_lora.t() @ xa).mul_(ctx.scaling), b_dtype)
        return grad_x, grad_lora_x, None, None, None, grad_a, grad_b, None, None, None


class FusedLoRALinear4bit(PeftLinear4bit):
    """peft's LoRA layer over a bitsandbytes 4-bit linear, whose forward takes the fused path when it can."""

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
            return None
        if getattr(self, "use_dora", {}).get(name):
            return None
        if quant_state_of(self.get_base_layer()) is None or x.shape[-1] != self.in_features:
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        base_dtype = getattr(base, "compute_dtype", None) or x.dtype
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        device = x.device.type
        lora_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a.dtype
        if torch.is_autocast_enabled(device):
            base_dtype = lora_dtype
        dropout = self.lora_dropout[name]
        lora_x = None if isinstance(dropout, nn.Identity) else dropout(x)
        return _LoRAOn4bitFunction.apply(x, lora_x, base.weight, quant_state_of(base), base.bias, lora_a, lora_b,
                                         self.scaling[name], base_dtype, lora_dtype)


def use_fused_lora(model: nn.Module) -> int:
    """Give every peft LoRA layer over a 4-bit base the fused forward; returns how many layers got it."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLinear4bit:
            module.__class__ = FusedLoRALinear4bit
            count += 1
    return count
