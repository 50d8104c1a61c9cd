"""Modules that act on each token alone (the decoder MLPs, the model's final norm), run over the sequence a chunk of
tokens at a time, each chunk recomputed in backward (training.mlp_chunk_tokens).

At long sequences the MLP's intermediates are the largest activations a layer's backward holds: gate, up and
act(gate), each intermediate_size wide (2.7x hidden in Llama, 5.3x in Qwen2.5-7B), for every token. The final norm,
run whole and eagerly (it is outside the compiled layers), keeps its input upcast to fp32 and its backward makes
several more fp32 tensors of the whole sequence: about 100 KB a token at a 4,096-wide hidden state (counted op by
op on the CPU), the peak of a Llama-3-8B step once its layers' backward went a chunk at a time. Splitting the
sequence changes nothing in either result; checkpointing each chunk means one chunk's intermediates exist at a time,
for the price of running the module once more in backward. It only acts on sequences longer than the chunk, so
short runs pay nothing.
"""

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_trainer.errors import ConfigError
from qlora_trainer.engine.class_mixing import mixed_class


class _ChunkedForward:
    chunk_tokens: int

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        module_forward = super().forward
        if hidden_states.shape[1] <= self.chunk_tokens:
            return module_forward(hidden_states)
        pieces = hidden_states.split(self.chunk_tokens, dim=1)
        if not torch.is_grad_enabled():  # e.g. a checkpoint's first pass: chunks only bound the transient memory
            return torch.cat([module_forward(piece) for piece in pieces], dim=1)
        return torch.cat([checkpoint(module_forward, piece, use_reentrant=False) for piece in pieces], dim=1)


def run_in_chunks(module: nn.Module, chunk_tokens: int) -> None:
    """`module` (one that acts on each token alone, its input (batch, tokens, ...)) from now on a chunk of tokens at a
    time, each chunk recomputed in backward."""
    module.__class__ = mixed_class(_ChunkedForward, type(module))
    module.chunk_tokens = chunk_tokens


# what transformers' decoder stacks call the norm after their last layer (Llama, Mistral, Qwen2, Gemma, Phi-3: norm;
# GPT-2: ln_f; Phi: final_layernorm)
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm")


def final_norm(model: nn.Module) -> Optional[nn.Module]:
    """The norm after the last decoder layer: of the module whose list holds the decoder layers, the child named as
    in FINAL_NORM_NAMES; None where it has none."""
    for module in model.modules():
        holds_layers = any(isinstance(child, nn.ModuleList) and any(isinstance(m, GradientCheckpointingLayer)
                                                                     for m in child)
                           for child in module.children())
        if holds_layers:
            norms = [getattr(module, name) for name in FINAL_NORM_NAMES if isinstance(getattr(module, name, None),
                                                                                      nn.Module)]
            return norms[0] if norms else None
    return None


def chunk_mlps(model: nn.Module, chunk_tokens: int) -> int:
    """Give every decoder layer's `mlp`, and the final norm, the chunked forward; returns how many MLPs got it."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not layers or any(mlp is None for mlp in mlps):
        raise ConfigError("training.mlp_chunk_tokens: this model's decoder layers have no `mlp` module; use 0")
    for mlp in mlps:
        run_in_chunks(mlp, chunk_tokens)
    norm = final_norm(model)
    if norm is not None:
        run_in_chunks(norm, chunk_tokens)
    return len(mlps)
