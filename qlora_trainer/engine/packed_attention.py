"""Attention for packed rows on the GPU without a block-diagonal mask: torch's variable-length flash kernel.

Packed rows keep their examples apart (data/prepare.py). With SDPA, transformers does that with a dense
block-diagonal mask, which sends SDPA to its memory-efficient kernel and keeps a seq x seq mask per layer; measured
on an H100 (Llama-2-7B, seq 4096, documents of 100-2000 tokens) that cost 24% of the step against letting examples
attend to each other. `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, compute capability 8.0 and up) runs
the flash kernel per example from cumulative example lengths instead: the same attention, causal within each
example, nothing across. spec/resolve.py picks it for packed runs where it exists (`ResolvedRun.attention`);
engine/loss.py hands the model the examples' boundaries (`packed_inputs`).

It is registered with transformers' attention and mask interfaces under ATTENTION_NAME. Without the boundaries
(an unpacked batch) it is transformers' own SDPA, with the mask transformers builds for SDPA.
"""

from typing import Optional

import torch
from torch import nn

from qlora_trainer.spec.resolve import PACKED_VARLEN as ATTENTION_NAME


def cumulative_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each example starts in the rows laid end to end, and their total length (int32, as the kernel takes
    it): an example starts wherever the position ids restart at 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:  # a row that does not start at 0 is still its own example
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_lengths: torch.Tensor, max_length: int,
            scale: Optional[float], window: tuple[int, int]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu_lengths, cu_lengths, max_length, max_length, scale=scale,
                       window_size=window)


def packed_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query/key/value (batch, heads, seq, head_dim); returns
    (batch, seq, heads, head_dim)."""
    cu_lengths = kwargs.get("cu_seq_lens_q")
    if cu_lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout or kwargs.get("softcap"):
        raise ValueError("packed varlen attention has no attention dropout or logit softcapping; "
                         "set model.attn_implementation: eager for this model")
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads != heads:  # grouped-query attention: the kernel wants as many key/value heads as query heads
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    # (batch, heads, seq, dim) -> (tokens, heads, dim): the rows laid end to end
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, head_dim) for t in (query, key, value))
    sliding = kwargs.get("sliding_window")  # the model passes its layer's window, as to flash attention
    window = (sliding - 1, 0) if sliding else (-1, 0)  # causal; a query sees its last `sliding` tokens, itself too
    out = _varlen(q, k, v, cu_lengths, kwargs.get("max_length_q") or seq, scaling, window)
    return out.reshape(batch, seq, heads, head_dim), None


def _mask(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """Packed rows come without a 2D mask and need none (the lengths carry the boundaries); an unpacked batch gets
    the mask transformers builds for SDPA."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ATTENTION_NAME a valid `attn_implementation` for transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_varlen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)
    return ATTENTION_NAME

