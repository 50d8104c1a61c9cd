"""The one training step: micro-batches forward and backward, the loss normalised by label tokens, loss scaling
on fp16, clipping, then the optimizer and the schedule; and the eval loss. `train`, `bench` and the peer
comparison all step through here.

A step synchronises with the GPU once, to read its loss and gradient norm: a skipped (non-finite) step must be
known before the optimizer runs, and nothing else needs the host to wait.

With several processes (engine/distributed.py) each takes its own micro-batches, and the step is the one step a
single process would take over all of them: the loss is normalised by the label tokens of every process's
micro-batches (summed before any forward), gradients are summed across processes on the last micro-batch only,
and the loss, gradient norm and token counts it reports are those of the whole step.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from qlora_trainer.data.batches import collate
from qlora_trainer.engine.base import DTYPES
from qlora_trainer.engine.build import Session
from qlora_trainer.engine.distributed import accumulating, full_tensor
from qlora_trainer.engine.loss import IGNORE_INDEX


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean token loss over all micro-batches of the step, of every process (as one large batch would give)
    grad_norm: float  # before clipping
    stepped: bool  # False: the loss or gradient was not finite and the optimizer did not run
    input_tokens: int  # tokens fed to the model (padding excluded), by every process
    label_tokens: int  # tokens the loss was taken on, by every process


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
    run, processes = session.run.spec.training, session.processes
    input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    labelled, input_tokens = map(int, processes.sum([sum(label_tokens(b) for b in batches), input_tokens]))
    total_labels = max(labelled, 1)
    loss_total = torch.zeros((), device=session.device)
    for index, batch in enumerate(batches):
        batch = {k: v.to(session.device, non_blocking=True) for k, v in batch.items()}
        with accumulating(session.loss_sum, last=index == len(batches) - 1):
            with _autocast(session):
                loss = session.loss_sum(batch) / total_labels
            # DDP and FSDP average gradients over the processes: times their number, the sum a single process takes
            to_backward = loss * processes.world_size if processes.world_size > 1 else loss
            (session.scaler.scale(to_backward) if session.scaler else to_backward).backward()
        loss_total += loss.detach()
    if session.scaler:
        session.scaler.unscale_(session.optimizer)
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(session.trainable, run.max_grad_norm or math.inf))
    loss_value, norm_value = torch.stack([loss_total.float(), grad_norm.float().to(session.device)]).tolist()
    loss_value = processes.sum([loss_value])[0]
    # with fp16 the scaler owns gradient overflow: it skips that step itself and lowers the scale
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or session.scaler is not None)
    if finite:
        session.scaler.step(session.optimizer) if session.scaler else session.optimizer.step()
        session.scheduler.step()
    if session.scaler:
        session.scaler.update()
    session.optimizer.zero_grad(set_to_none=True)
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
                loss_sum += session.loss_sum(batch).float()  # every process evaluates all (FSDP needs them all)
            tokens += label_tokens(batch)
    session.model.train()
    return float(loss_sum) / max(tokens, 1)
