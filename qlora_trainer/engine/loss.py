"""Causal-LM loss computed without the vocab x tokens logits ever existing all at once.

A plain forward materialises bf16 logits for every position plus an fp32 copy for the loss: 2.4 GiB at
seq 8192 with a 32k vocabulary, 11 GiB with a 152k one. Here the decoder's hidden states are gathered at the
labelled positions only (prompt tokens cost nothing), then lm_head + cross-entropy run either fused
(Liger-Kernel's fused linear cross-entropy on CUDA: it takes the gradient of its input in forward, a chunk of
about tokens x hidden / vocab rows at a time, so its logits never outgrow the hidden states; `fused`) or on
`chunk_tokens` of them at a time under a checkpoint, so one chunk's logits are alive at any moment, in forward
and backward. Both compute the logits in the compute dtype and the cross-entropy in fp32.

Packed rows (several examples per row, data/prepare.py `pack`) reach the model as position ids that restart at
every example and no attention_mask: transformers reads the restarts as sequence boundaries and gives each
example a causal mask of its own (`model_inputs`), so the row computes what its examples would alone.

`LossModule` is that loss as the module the step calls: what DDP and FSDP wrap with several processes
(engine/distributed.py).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_trainer.engine.packed_attention import cumulative_lengths
from qlora_trainer.spec.resolve import PACKED_VARLEN

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


def model_inputs(batch: dict[str, torch.Tensor], attention: str) -> dict[str, torch.Tensor | bool | int]:
    """The keyword arguments the model runs `batch` with, under the model's attention implementation `attention`.

    Unpacked rows: input_ids and the padding mask, as always. Packed rows: input_ids and position_ids, without
    the 2D mask and the cache, either of which turns off transformers' packed-sequence detection
    (masking_utils._preprocess_mask_arguments -> find_packed_sequence_indices; read in transformers 5.0, 5.17
    and 5.24): from where the position ids restart it builds a block-diagonal causal mask for SDPA and eager,
    sliding windows included. Flash attention finds the restarts only in a batch of one row
    (modeling_flash_attention_utils._is_packed_sequence, then its varlen kernel), so for it the rows are laid end
    to end; so they are for torch's varlen kernel (packed_attention.py), which is handed the examples' lengths.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "flash" in attention or attention == PACKED_VARLEN:
        inputs = {name: tensor.reshape(1, -1) for name, tensor in inputs.items()}
    if attention == PACKED_VARLEN:
        lengths = cumulative_lengths(batch["position_ids"])
        longest = batch["input_ids"].shape[1]  # no example is longer than its row: a bound the kernel accepts
        inputs |= {"cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths, "max_length_q": longest,
                   "max_length_k": longest}
    return inputs | {"use_cache": False}


def _chunk_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, softcap: float) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def _fused_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, softcap: float
                         ) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap or None)
    return fused(lm_head.weight, hidden, labels, lm_head.bias).float()


def causal_lm_loss(causal_lm: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int,
                   fused: bool = False) -> LossParts:
    """Summed next-token loss of `batch` (input_ids, attention_mask, labels) under `causal_lm`; `fused`: lm_head
    and cross-entropy in Liger-Kernel's kernel (a CUDA GPU; spec/resolve.py decides), else `chunk_tokens` at a
    time."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    label_tokens = int(keep.sum())
    inputs = model_inputs(batch, getattr(causal_lm.config, "_attn_implementation", None) or "sdpa")
    rows = batch["input_ids"].shape  # a flattened batch's outputs go back to rows
    if not _supports_chunked(causal_lm):
        logits = causal_lm(**inputs).logits.reshape(*rows, -1)
        loss_sum = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
        return LossParts(loss_sum, label_tokens)
    hidden = causal_lm.base_model(**inputs).last_hidden_state.reshape(*rows, -1)
    hidden = hidden[:, :-1][keep]
    targets = labels[keep]
    lm_head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None) or 0.0
    if fused and type(lm_head) is nn.Linear:  # an adapted lm_head is not one weight: resolve.py leaves it chunked
        return LossParts(_fused_cross_entropy(hidden, targets, lm_head, softcap), label_tokens)
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


class LossModule(nn.Module):
    """The step's forward as one module (the summed token loss of a batch), so DDP and FSDP see the forward that
    produces the gradients: engine/loss.py runs the backbone and lm_head apart, past the model's own forward."""

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int, fused: bool = False):
        super().__init__()
        self.causal_lm, self.chunk_tokens, self.fused = causal_lm, chunk_tokens, fused

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(self.causal_lm, batch, self.chunk_tokens, self.fused).loss_sum
