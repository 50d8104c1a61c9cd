"""torch.compile of each decoder layer: its many small ops (norms, rotary embedding, SwiGLU, the adapters) become a
few fused kernels, which matters at micro-batch 1 where a 7B model's GPU otherwise waits on Python dispatch.

Layers share one compiled graph (their parameters are graph inputs), so the cost is one compilation, paid on the
first step. Gradient checkpointing (checkpointing.py) wraps the compiled call; it is not traced. Whether layers are
compiled is the resolved run's `compile_layers` (spec/resolve.py).

What a compiled layer keeps for backward is what AOTAutograd's partitioner chooses, not what each autograd function
saves. Its common-subexpression pass merges the fused LoRA's two dequantizations of a frozen weight (fused_lora.py:
one in forward, one in backward, in the graph's own ops: nf4_in_graph.py) into one, and since the partitioner does
not recompute a gather (nor, before, bitsandbytes' opaque op), the 16-bit weight is kept: for a layer that keeps its
activations, every adapted weight of the model in 16 bits (measured on an H100: Mistral-7B, all linear layers, no
checkpointing, 12.9 GiB more than counted; benchmarks/results/planner-accuracy-h100.md). The pass is therefore off
when any layer keeps its activations; with every layer checkpointed the merged weight lives only through one layer's
recomputation and backward, and saves a dequantization there.

The compiler itself can fail on a layer's graph (seen on an H100 with torch 2.11: inductor's min-cut partitioner
raised "Node add_687 was invalid, but is output" for Llama-3-8B at micro-batch 2, fp16, seq 8192, once in 12 card
plans; Dynamo's tracer raised an AssertionError on chunked MLPs compiled with symbolic sizes);
`uncompile_decoder_layers` turns every layer back to eager so the recipe can take that step again
(training/recipe.py `compiler_failed`).
"""

import torch._functorch.config as functorch_config
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_trainer.engine.checkpointing import is_checkpointed


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer in place; returns how many were compiled."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # a process-wide setting, read when the layers compile (their first call): one model is trained per process
    functorch_config.cse = all(is_checkpointed(layer) for layer in layers)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def uncompile_decoder_layers(model: nn.Module) -> int:
    """Every compiled decoder layer back to its eager forward (the same arithmetic); returns how many."""
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m._compiled_call_impl is not None]
    for layer in layers:
        layer._compiled_call_impl = None
    return len(layers)
