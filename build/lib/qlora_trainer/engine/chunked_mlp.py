"""Decoder MLPs that run over the sequence a chunk of tokens at a time, each chunk recomputed in backward.

At long sequences the MLP's intermediates are the largest activations a layer's backward holds: gate, up and
act(gate), each intermediate_size wide (2.7x hidden in Llama, 5.3x in Qwen2.5-7B), for every token. MLPs act on each
token alone, so splitting the sequence changes nothing in the result; checkpointing each chunk means one chunk's
intermediates exist at a time, for the price of running the MLP forward once more in backward. It only acts on
sequences longer than the chunk, so short runs pay nothing.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_trainer.errors import ConfigError
from qlora_trainer.engine.class_mixing import mixed_class


class _ChunkedForward:
    chunk_tokens: int

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp_forward = super().forward
        if hidden_states.shape[1] <= self.chunk_tokens:
            return mlp_forward(hidden_states)
        pieces = hidden_states.split(self.chunk_tokens, dim=1)
        if not torch.is_grad_enabled():  # e.g. a checkpoint's first pass: chunks only bound the transient memory
            return torch.cat([mlp_forward(piece) for piece in pieces], dim=1)
        return torch.cat([checkpoint(mlp_forward, piece, use_reentrant=False) for piece in pieces], dim=1)


def chunk_mlps(model: nn.Module, chunk_tokens: int) -> int:
    """Give every decoder layer's `mlp` the chunked forward; returns how many MLPs got it."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not layers or any(mlp is None for mlp in mlps):
        raise ConfigError("training.mlp_chunk_tokens: this model's decoder layers have no `mlp` module; use 0")
    for mlp in mlps:
        mlp.__class__ = mixed_class(_ChunkedForward, type(mlp))
        mlp.chunk_tokens = chunk_tokens
    return len(mlps)
