"""torch.compile of each decoder layer: its many small ops (norms, rotary embedding, SwiGLU, the adapters) become a
few fused kernels, which matters at micro-batch 1 where a 7B model's GPU otherwise waits on Python dispatch.

Layers share one compiled graph (their parameters are graph inputs), so the cost is one compilation, paid on the
first step. Gradient checkpointing (checkpointing.py) wraps the compiled call; it is not traced. Whether layers are
compiled is the resolved run's `compile_layers` (spec/resolve.py).
"""

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer in place; returns how many were compiled."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
