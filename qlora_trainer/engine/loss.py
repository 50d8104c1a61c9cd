"""Causal-LM loss computed chunk by chunk, so the vocab x tokens logits never exist all at once.

A plain forward materialises bf16 logits for every position plus an fp32 copy for the loss: 2.4 GiB at
seq 8192 with a 32k vocabulary, 11 GiB with a 152k one. Here the decoder's hidden states are gathered at the
labelled positions only (prompt tokens cost nothing), and lm_head + cross-entropy run on `chunk_tokens` of
them at a time under a checkpoint, so one chunk's logits are alive at any moment, in forward and backward.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossParts:
    loss_sum: torch.Tensor  # summed token cross-entropy (fp32, differentiable)
    label_tokens: int  # how many tokens it sums over


def _supports_chunked(causal_lm: nn.Module) -> bool:
    """Models that scale logits in ways we don't reproduce fall back to their own forward."""
    config = causal_lm.config
    return (
        getattr(causal_lm, "base_model", causal_lm) is not causal_lm
        and causal_lm.get_output_embeddings() is not None
        and getattr(config, "logit_scale", None) is None
        and getattr(config, "logits_scaling", None) is None
    )


def _chunk_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, softcap: float) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def causal_lm_loss(causal_lm: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> LossParts:
    """Summed next-token loss of `batch` (input_ids, attention_mask, labels) under `causal_lm`."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    label_tokens = int(keep.sum())
    if not _supports_chunked(causal_lm):
        logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
        return LossParts(loss_sum, label_tokens)
    hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1][keep]
    targets = labels[keep]
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None) or 0.0
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, label_tokens, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            loss_sum = loss_sum + checkpoint(
                _chunk_cross_entropy, hidden[piece], targets[piece], lm_head, softcap, use_reentrant=False
            )
        else:
            loss_sum = loss_sum + _chunk_cross_entropy(hidden[piece], targets[piece], lm_head, softcap)
    return LossParts(loss_sum, label_tokens)
