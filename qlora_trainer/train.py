"""The training recipe: load, prepare, then `for step: forward, backward, step, log, maybe eval, maybe checkpoint`."""

import functools
import json
import math
import shutil
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from qlora_trainer import adapters, checkpoint, data, model as model_loading
from qlora_trainer.chunked_mlp import chunk_mlps
from qlora_trainer.compiled_layers import compile_decoder_layers, should_compile
from qlora_trainer.fused_lora import use_fused_lora
from qlora_trainer.config import RunConfig, config_to_dict
from qlora_trainer.errors import ConfigError, OutOfMemoryAbort, UserError
from qlora_trainer.hardware import apply_memory_cap, detect_gpu
from qlora_trainer.planner import apply_planned_choices, fixed_choices, plan_from_run_config
from qlora_trainer.planner.memory import estimate_memory, model_shape
from qlora_trainer.planner.search import search_plan, usable
from qlora_trainer.loss import causal_lm_loss

METRICS = "metrics.jsonl"
ADAPTER = "adapter"
RUN_CONFIG = "run_config.json"
_RUN_ARTIFACTS = (METRICS, ADAPTER, RUN_CONFIG, checkpoint.CHECKPOINTS)


class TrainingDiverged(UserError):
    """Too many consecutive steps with a NaN/inf loss or gradient. Exit 4."""

    exit_code = 4


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was written at the step boundary."""

    def __init__(self, signum: int, checkpoint_dir: Optional[Path]):
        super().__init__(f"stopped by signal {signum}; checkpoint at {checkpoint_dir}")
        self.exit_code = 128 + signum


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this process
    eval_loss: Optional[float] = None
    tokens_per_second: Optional[float] = None  # median over the steps after two warm-up steps
    peak_allocated_bytes: Optional[int] = None  # GPU only
    peak_reserved_bytes: Optional[int] = None  # GPU only


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an earlier run unless asked; --overwrite removes only this tool's artifacts."""
    existing = [name for name in _RUN_ARTIFACTS if (output_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise UserError(
            f"output.dir: {output_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir"
        )
    if existing and overwrite and not resume:
        for name in existing:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def use_speed_paths(peft_model: torch.nn.Module, fused: bool, mlp_chunk_tokens: int, compile_setting: str,
                    device: torch.device) -> None:
    """training.fused_lora, training.mlp_chunk_tokens and training.compile_layers, in that order: the compiled
    graphs trace the fused and chunked forwards."""
    if fused:
        use_fused_lora(peft_model)
    if mlp_chunk_tokens:
        chunk_mlps(peft_model, mlp_chunk_tokens)
    if should_compile(compile_setting, device):
        compile_decoder_layers(peft_model)


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """torch AdamW, or bitsandbytes 8-bit AdamW (optionally in paged unified memory)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n_examples, generator=generator).tolist())


def micro_batches(n_examples: int, micro_batch_size: int, seed: int, start_example: int) -> Iterator[list[int]]:
    """An endless, seeded stream of example indices, one list per micro-batch, from example `start_example` on.

    Epoch e is a permutation drawn from a generator seeded with (seed, e), and a micro-batch runs on into the
    next epoch when one ends, so the stream can be re-entered at any example, with any micro-batch size.
    """
    position = start_example
    while True:
        batch = []
        for _ in range(micro_batch_size):
            epoch, offset = divmod(position, n_examples)
            batch.append(_epoch_order(n_examples, seed, epoch)[offset])
            position += 1
        yield batch


@contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag the loop reads at the next step boundary."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _peak_memory(device: torch.device) -> tuple[Optional[int], Optional[int]]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def evaluate(peft_model, examples: list[dict], pad_token_id: int, micro_batch_size: int, chunk_tokens: int,
             accelerator: Accelerator, device: torch.device) -> float:
    """Token-averaged loss over the eval split."""
    peft_model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), micro_batch_size):
            batch = data.collate(examples[start:start + micro_batch_size], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                parts = causal_lm_loss(peft_model.get_base_model(), batch, chunk_tokens)
            loss_sum += float(parts.loss_sum)
            tokens += parts.label_tokens
    peft_model.train()
    return loss_sum / max(tokens, 1)


def _write_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records of steps after the checkpoint, so metrics.jsonl reads as one run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def save_final_adapter(peft_model, output_dir: Path) -> Path:
    """output_dir/adapter in standard PEFT format, replaced atomically."""
    final = output_dir / ADAPTER
    tmp = output_dir / f".tmp-{ADAPTER}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp)
    checkpoint.replace_folder_atomically(tmp, final)
    return final


@dataclass
class _Session:
    """What the loop works with, once everything is loaded."""

    model: torch.nn.Module  # the peft model, as prepared by accelerate
    causal_lm: torch.nn.Module  # the transformers model inside it
    optimizer: object
    scheduler: object
    accelerator: Accelerator
    trainable: list[torch.nn.Parameter]
    device: torch.device
    loss_scaling: bool  # fp16: the grad scaler owns overflow handling


def _optimizer_step(run: _Session, batches: list[dict], max_grad_norm: float, chunk_tokens: int
                    ) -> tuple[float, float, bool]:
    """Forward and backward over the accumulated micro-batches, then one optimizer step unless not finite.

    Returns (loss, grad_norm, stepped). The loss is token-weighted over the whole accumulation, so it equals
    the loss of one large batch.
    """
    label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss_total = 0.0
    for batch in batches:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with run.accelerator.autocast():
            parts = causal_lm_loss(run.causal_lm, batch, chunk_tokens)
        loss = parts.loss_sum / max(label_tokens, 1)
        run.accelerator.backward(loss)
        loss_total += float(loss.detach())
    grad_norm = float(run.accelerator.clip_grad_norm_(run.trainable, max_grad_norm or math.inf))
    finite = math.isfinite(loss_total) and (math.isfinite(grad_norm) or run.loss_scaling)
    if finite:
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm, finite


def _oom_advice(config: RunConfig) -> str:
    tcfg = config.training
    hints = []
    if tcfg.micro_batch_size > 1:
        hints.append(f"training.micro_batch_size {tcfg.micro_batch_size} -> {tcfg.micro_batch_size // 2} "
                     f"with gradient_accumulation_steps {tcfg.gradient_accumulation_steps * 2}")
    if not tcfg.gradient_checkpointing:
        hints.append("training.gradient_checkpointing true")
    hints.append(f"training.max_seq_len {tcfg.max_seq_len} -> {tcfg.max_seq_len // 2}")
    return "; or ".join(hints) + " (training.oom_retry: halve-micro-batch does the first for you)"


def _memory_budget(tcfg) -> tuple[Optional[int], str]:
    """The bytes this run may use on the GPU at hand (its cap, or the card's usable memory), or None on the CPU."""
    gpu = detect_gpu()
    if gpu is None:
        return None, "cpu"
    if tcfg.memory_cap_gib > 0:
        return min(int(tcfg.memory_cap_gib * 2**30), gpu.usable_bytes), f"{gpu.name} capped at {tcfg.memory_cap_gib:g} GiB"
    return gpu.usable_bytes, gpu.name


def check_plan(config: RunConfig, model_config, force: bool) -> RunConfig:
    """Run the planner before loading anything: fill the choices left open (training.plan: auto), and refuse a
    run predicted not to fit the GPU unless forced."""
    budget, gpu_name = _memory_budget(config.training)
    if budget is None:
        return config
    gpu = detect_gpu()
    compute_dtype = "bfloat16" if gpu.supports_bf16 else "float16"
    shape = model_shape(model_config)
    if config.training.plan == "auto":
        config = apply_planned_choices(config, search_plan(
            shape, budget, plan_from_run_config(config, compute_dtype), fixed_choices(config),
            config.training.micro_batch_size * config.training.gradient_accumulation_steps))
    estimate = estimate_memory(shape, plan_from_run_config(config, compute_dtype))
    print(f"planner: predicted peak {estimate.predicted_peak_bytes / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB "
          f"on {gpu_name}")
    if estimate.predicted_peak_bytes > usable(budget) and not force:
        advice = search_plan(shape, budget, plan_from_run_config(config, compute_dtype), fixed_choices(config)).advice
        raise UserError(f"training: predicted peak {estimate.predicted_peak_bytes / 2**30:.2f} GiB does not fit "
                        f"{gpu_name} ({budget / 2**30:.2f} GiB); planner: {advice}; --force trains anyway")
    return config


def train(config: RunConfig, resume: bool = False, show_progress: bool = True, force: bool = False) -> TrainResult:
    """Run the whole recipe for `config`; returns the losses and measurements of this process's steps."""
    tcfg = config.training
    output_dir = Path(config.output.dir)
    resume = resume or tcfg.resume == "auto"

    # 1. Everything that can be checked without weights, before the slow load.
    model_config = model_loading.load_model_config(config.model)
    config = check_plan(config, model_config, force)
    tcfg = config.training
    target_keys, target_layers = adapters.resolve_targets(
        adapters.meta_model(model_config, config.model.trust_remote_code), config.adapter.target_modules
    )
    adapters.check_rank(config.adapter, target_layers)
    if (tcfg.checkpointed_layers or 0) > model_config.num_hidden_layers:
        raise ConfigError(f"training.checkpointed_layers: {tcfg.checkpointed_layers} is more than the model's "
                          f"{model_config.num_hidden_layers} decoder layers; use 0 to {model_config.num_hidden_layers}")
    prepare_output_dir(output_dir, resume, config.output.overwrite)

    # 2. Load the base, the data and the adapter.
    set_seed(tcfg.seed)
    apply_memory_cap(tcfg.memory_cap_gib)
    base = model_loading.load_base(config.model, config.quantization, tcfg.gradient_checkpointing,
                                   checkpointed_layers=tcfg.checkpointed_layers,
                                   offload_checkpoints=tcfg.offload_checkpoints)
    tokenized = data.prepare_data(config.data, base.tokenizer, tcfg.max_seq_len, tcfg.seed)
    stats = tokenized.stats
    print(f"data: {stats.train_examples} train / {stats.eval_examples} eval examples from {stats.rows_read} rows; "
          f"{stats.rows_bad} bad rows skipped {dict(stats.bad_reasons) or ''}".rstrip())
    peft_model, summary = adapters.attach_adapter(base.model, config.adapter, target_keys, target_layers)
    print(summary.line())
    use_speed_paths(peft_model, tcfg.fused_lora, tcfg.mlp_chunk_tokens, tcfg.compile_layers, base.device)
    (output_dir / RUN_CONFIG).write_text(json.dumps(config_to_dict(config), indent=1))

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(tcfg.optimizer, trainable, tcfg.learning_rate, tcfg.weight_decay)
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=tcfg.max_steps)
    mixed_precision = "no"
    if base.device.type == "cuda":
        mixed_precision = "bf16" if base.compute_dtype == torch.bfloat16 else "fp16"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=base.device.type == "cpu")
    peft_model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
    run = _Session(peft_model, accelerator.unwrap_model(peft_model).get_base_model(), optimizer, scheduler,
                   accelerator, trainable, base.device, loss_scaling=mixed_precision == "fp16")

    # 3. Resume from the newest complete checkpoint.
    state = checkpoint.TrainerState(step=0, examples_done=0, tokens_seen=0)
    metrics_path = output_dir / METRICS
    if resume:
        latest = checkpoint.latest_valid_checkpoint(output_dir)
        if latest is not None:
            state = checkpoint.load_checkpoint(latest, accelerator.unwrap_model(peft_model), optimizer, scheduler)
            print(f"resumed from {latest} (step {state.step})")
        _truncate_metrics(metrics_path, state.step)

    def save(at: checkpoint.TrainerState) -> Path:
        return checkpoint.save_checkpoint(output_dir, at, accelerator.unwrap_model(peft_model), optimizer,
                                          scheduler, tcfg.save_total_limit)

    # 4. The loop.
    pad_id = base.tokenizer.pad_token_id
    micro_batch_size, accumulation = tcfg.micro_batch_size, tcfg.gradient_accumulation_steps
    stream = micro_batches(len(tokenized.train), micro_batch_size, tcfg.seed, state.examples_done)
    result = TrainResult(output_dir=output_dir, adapter_dir=output_dir / ADAPTER, final_step=state.step)
    step_speeds: list[float] = []
    bad_steps = 0
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    peft_model.train()
    progress = tqdm(total=tcfg.max_steps, initial=state.step, disable=not show_progress, desc="train")
    with stop_on_signals() as signals:
        while state.step < tcfg.max_steps:
            started = time.perf_counter()
            batches = [data.collate([tokenized.train[i] for i in next(stream)], pad_id) for _ in range(accumulation)]
            input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            try:
                loss, grad_norm, stepped = _optimizer_step(run, batches, tcfg.max_grad_norm, tcfg.loss_chunk_tokens)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                batches = None
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                if tcfg.oom_retry == "halve-micro-batch" and micro_batch_size > 1:
                    micro_batch_size, accumulation = micro_batch_size // 2, accumulation * 2
                    stream = micro_batches(len(tokenized.train), micro_batch_size, tcfg.seed, state.examples_done)
                    progress.write(f"out of memory at step {state.step + 1}: retrying with micro_batch_size "
                                   f"{micro_batch_size} and gradient_accumulation_steps {accumulation}",
                                   file=sys.stderr)
                    continue
                progress.close()
                where = f"; checkpoint of step {state.step} at {save(state)}" if state.step else ""
                raise OutOfMemoryAbort(f"out of GPU memory at step {state.step + 1}{where}. "
                                       f"Lower {_oom_advice(config)}") from None
            consumed = micro_batch_size * accumulation
            if not stepped:
                bad_steps += 1
                state = checkpoint.TrainerState(state.step, state.examples_done + consumed, state.tokens_seen)
                progress.write(f"step {state.step + 1} skipped: loss {loss}, gradient norm {grad_norm}",
                               file=sys.stderr)
                if bad_steps >= tcfg.max_bad_steps:
                    progress.close()
                    latest = checkpoint.latest_valid_checkpoint(output_dir)
                    raise TrainingDiverged(
                        f"training.max_bad_steps: {bad_steps} consecutive steps had a non-finite loss or gradient "
                        f"(at step {state.step + 1}); last good checkpoint: {latest or 'none yet'}. "
                        "Lower training.learning_rate or check the data"
                    )
                continue
            bad_steps = 0
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            elapsed = time.perf_counter() - started
            state = checkpoint.TrainerState(step=state.step + 1, examples_done=state.examples_done + consumed,
                                            tokens_seen=state.tokens_seen + input_tokens)
            tokens_per_second = input_tokens / elapsed
            step_speeds.append(tokens_per_second)
            result.losses.append(loss)
            peak_allocated, peak_reserved = _peak_memory(base.device)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}",
                                 vram=f"{(peak_reserved or 0) / 2**30:.2f}G")
            is_last = state.step == tcfg.max_steps
            record = None
            if state.step % tcfg.logging_steps == 0 or is_last:
                record = {
                    "step": state.step, "loss": loss, "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_second": tokens_per_second,
                    "peak_vram_bytes": peak_reserved, "peak_allocated_bytes": peak_allocated,
                    "tokens_seen": state.tokens_seen, "micro_batch_size": micro_batch_size,
                    "rows_skipped": stats.rows_bad,
                }
            if tokenized.eval and ((tcfg.eval_steps and state.step % tcfg.eval_steps == 0) or is_last):
                result.eval_loss = evaluate(peft_model, tokenized.eval, pad_id, micro_batch_size,
                                            tcfg.loss_chunk_tokens, accelerator, base.device)
                record = (record or {"step": state.step}) | {"eval_loss": result.eval_loss}
            if record is not None:
                _write_metrics(metrics_path, record)
            saved = None
            if is_last or signals or (tcfg.save_steps and state.step % tcfg.save_steps == 0):
                saved = save(state)
            if signals and not is_last:
                progress.close()
                raise Interrupted(signals[0], saved)
    progress.close()
    result.final_step = state.step
    save_final_adapter(accelerator.unwrap_model(peft_model), output_dir)
    timed = step_speeds[2:] or step_speeds
    result.tokens_per_second = statistics.median(timed) if timed else None
    result.peak_allocated_bytes, result.peak_reserved_bytes = _peak_memory(base.device)
    return result
