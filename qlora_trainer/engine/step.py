"""The one training step: micro-batches forward and backward, the loss normalised by label tokens, loss scaling
on fp16, clipping, then the optimizer and the schedule; and the eval loss. `train`, `bench` and the peer
comparison all step through here.

A step synchronises with the GPU once, to read its loss and gradient norm: a skipped (non-finite) step must be
known before the optimizer runs, and nothing else needs the host to wait.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from qlora_trainer.data.batches import collate
from qlora_trainer.engine.base import DTYPES
from qlora_trainer.engine.build import Session
from qlora_trainer.engine.loss import IGNORE_INDEX, causal_lm_loss


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean token loss over all micro-batches of the step (as one large batch would give)
    grad_norm: float  # before clipping
    stepped: bool  # False: the loss or gradient was not finite and the optimizer did not run
    input_tokens: int  # tokens fed to the model (padding excluded)
    label_tokens: int  # tokens the loss was taken on


def _autocast(session: Session):
    """Mixed precision on the GPU, in the resolved compute dtype; plain dtypes on the CPU."""
    if session.device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=DTYPES[session.run.compute_dtype])


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on: labelled positions after the first."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_step(session: Session, batches: list[dict[str, torch.Tensor]]) -> StepResult:
    """One optimizer step over `batches` (collated micro-batches, on the CPU)."""
    run = session.run.spec.training
    labelled = sum(label_tokens(b) for b in batches)
    total_labels = max(labelled, 1)
    loss_total = torch.zeros((), device=session.device)
    for batch in batches:
        batch = {k: v.to(session.device, non_blocking=True) for k, v in batch.items()}
        with _autocast(session):
            loss = causal_lm_loss(session.causal_lm, batch, run.loss_chunk_tokens).loss_sum / total_labels
        (session.scaler.scale(loss) if session.scaler else loss).backward()
        loss_total += loss.detach()
    if session.scaler:
        session.scaler.unscale_(session.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(session.trainable, run.max_grad_norm or math.inf)
    loss_value, norm_value = torch.stack([loss_total.float(), grad_norm.float().to(session.device)]).tolist()
    # with fp16 the scaler owns gradient overflow: it skips that step itself and lowers the scale
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or session.scaler is not None)
    if finite:
        session.scaler.step(session.optimizer) if session.scaler else session.optimizer.step()
        session.scheduler.step()
    if session.scaler:
        session.scaler.update()
    session.optimizer.zero_grad(set_to_none=True)
    input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return StepResult(loss_value, norm_value, finite, input_tokens, labelled)


def eval_loss(session: Session, examples: list[dict[str, list[int]]], micro_batch_size: int) -> float:
    """Token-averaged loss over `examples`, without gradients."""
    session.model.eval()
    pad_id = session.tokenizer.pad_token_id
    loss_sum, tokens = torch.zeros((), device=session.device), 0
    with torch.no_grad():
        for start in range(0, len(examples), micro_batch_size):
            batch = collate(examples[start:start + micro_batch_size], pad_id)
            batch = {k: v.to(session.device) for k, v in batch.items()}
            with _autocast(session):
                parts = causal_lm_loss(session.causal_lm, batch, session.run.spec.training.loss_chunk_tokens)
            loss_sum += parts.loss_sum.float()
            tokens += parts.label_tokens
    session.model.train()
    return float(loss_sum) / max(tokens, 1)
