"""torch.compile of each decoder layer: its many small ops (norms, rotary embedding, SwiGLU, the adapters) become a
few fused kernels, which matters at micro-batch 1 where a 7B model's GPU otherwise waits on Python dispatch.

Layers share one compiled graph (their parameters are graph inputs), so the cost is one compilation, paid on the
first step. Gradient checkpointing (model.py, offload.py) wraps the compiled call; it is not traced.
"""

import importlib.util

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def should_compile(setting: str, device: torch.device) -> bool:
    """`auto` compiles on CUDA GPUs that Triton can generate kernels for (compute capability 7.0 and up, Triton
    installed); on the CPU it would add a C++ build to every run."""
    if setting != "auto":
        return setting == "on"
    return (device.type == "cuda" and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device) >= (7, 0))


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer in place; returns how many were compiled."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
