"""The training recipe: resolve and check, hold the output folder, build, then `for step: take a step, log, maybe
eval, maybe checkpoint`.

The pieces live beside it: the planner's gate (gate.py), the folder's lock (run_lock.py), how a run starts in its
folder (run_start.py, with what a resume may change in resume_rules.py), checkpoints (checkpoints.py), the run
folder and its metrics (run_folder.py), signals (signals.py); the model and the step itself are the engine's
(engine/).
"""

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from torch._dynamo.exc import BackendCompilerFailed
from transformers import set_seed

from qlora_trainer.data.batches import collate, micro_batches
from qlora_trainer.data.prepare import DataStats, TokenizedData, prepare_data, truncation_warning
from qlora_trainer.data.sampling import steps_for_epochs
from qlora_trainer.engine.base import load_model_config, load_tokenizer, settle_auto_attention
from qlora_trainer.engine.build import Session, build, check_before_loading
from qlora_trainer.engine.compiled_layers import uncompile_decoder_layers
from qlora_trainer.engine.distributed import Processes, adapter_state, launch_facts, optimizer_state, process_group
from qlora_trainer.engine.step import StepResult, eval_loss, train_step
from qlora_trainer.errors import OutOfMemoryAbort, UserError
from qlora_trainer.export.generate import prompt_format
from qlora_trainer.hardware import GIB, Hardware, apply_memory_cap, detect_hardware, peak_memory_bytes
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.training import checkpoints
from qlora_trainer.training.gate import fallback_warning, fit_to_budget
from qlora_trainer.training.reporting import TENSORBOARD_DIR, RunReporter, Summary
from qlora_trainer.training.run_folder import (ADAPTER, MetricsLog, earlier_run_kept, output_dir_of,
                                               recover_interrupted_replacement, save_final_adapter, write_run_record)
from qlora_trainer.training.run_lock import hold_run_folder
from qlora_trainer.training.run_start import RunStart, plan_start
from qlora_trainer.training.signals import Interrupted, stop_on_signals


class TrainingDiverged(UserError):
    """Too many consecutive steps with a NaN/inf loss or gradient, or a step that gave the adapter no gradient at
    all. Exit 4."""

    exit_code = 4


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this process
    eval_loss: Optional[float] = None  # at the last evaluation
    best_eval: Optional[tuple[int, float]] = None  # (step, loss): the lowest eval loss of this process
    tokens_per_second: Optional[float] = None  # median over the steps after two warm-up steps
    peak_allocated_bytes: Optional[int] = None  # GPU only
    peak_reserved_bytes: Optional[int] = None  # GPU only
    is_main: bool = True  # this process reports the run: the only one, or rank 0 of several


class _Feed:
    """The step's micro-batches from the seeded stream, re-entered at the data position after an OOM retry."""

    def __init__(self, examples: list, pad_id: int, micro_batch_size: int, accumulation: int, seed: int,
                 examples_done: int, processes: Processes):
        self.examples, self.pad_id, self.seed = examples, pad_id, seed
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.rank, self.world_size = processes.rank, processes.world_size
        self.stream = micro_batches(len(examples), micro_batch_size, seed, examples_done)

    @property
    def examples_per_step(self) -> int:
        """Of all processes together: micro_batch_size x gradient_accumulation_steps x world size."""
        return self.micro_batch_size * self.accumulation * self.world_size

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the step: of the one seeded stream, process r takes micro-batches
        r, r + W, r + 2W, ..., so W processes see exactly the examples one process would, none twice."""
        batches = []
        for _ in range(self.accumulation):
            ours = [next(self.stream) for _ in range(self.world_size)][self.rank]
            batches.append(collate([self.examples[i] for i in ours], self.pad_id))
        return batches

    def rewind(self, examples_done: int) -> None:
        """Go back to the data position `examples_done`: a step taken again takes the same examples."""
        self.stream = micro_batches(len(self.examples), self.micro_batch_size, self.seed, examples_done)

    def halve(self, examples_done: int) -> None:
        """Half the micro-batch, twice the accumulation: the same examples per step, less memory."""
        self.micro_batch_size, self.accumulation = self.micro_batch_size // 2, self.accumulation * 2
        self.rewind(examples_done)


def _oom_advice(spec: RunSpec) -> str:
    training = spec.training
    hints = []
    if training.micro_batch_size > 1:
        hints.append(f"training.micro_batch_size {training.micro_batch_size} -> {training.micro_batch_size // 2} "
                     f"with gradient_accumulation_steps {training.gradient_accumulation_steps * 2}")
    if not training.gradient_checkpointing:
        hints.append("training.gradient_checkpointing true")
    hints.append(f"training.max_seq_len {training.max_seq_len} -> {training.max_seq_len // 2}")
    return "; or ".join(hints) + " (training.oom_retry: halve-micro-batch does the first for you)"


def _after_oom(session: Session, feed: _Feed, state: checkpoints.TrainerState, save: Callable,
              reporter: RunReporter) -> None:
    """Out of GPU memory in a step: halve the micro-batch and go on where asked and possible, else checkpoint the
    last completed step and stop with the planner's kind of advice (exit 3)."""
    session.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    spec = session.run.spec
    # a retry or a checkpoint needs every process, and the others are inside the step: with several, stop this one
    # (the launcher stops the rest) and keep the last periodic checkpoint
    alone = session.processes.world_size == 1
    if alone and spec.training.oom_retry == "halve-micro-batch" and feed.micro_batch_size > 1:
        feed.halve(state.examples_done)
        reporter.write(f"out of memory at step {state.step + 1}: retrying with micro_batch_size "
                       f"{feed.micro_batch_size} and gradient_accumulation_steps {feed.accumulation}")
        return
    reporter.close()
    where = f"; checkpoint of step {state.step} at {save(state)}" if state.step and alone else ""
    raise OutOfMemoryAbort(f"out of GPU memory at step {state.step + 1}{where}. Lower {_oom_advice(spec)}") from None


def compiler_failed(error: Exception) -> bool:
    """Whether torch.compile failed while compiling a frame: its backend (BackendCompilerFailed) or Dynamo itself,
    which stamps what escapes its compilation of a frame with that compilation's id (torch/_dynamo/convert_frame.py,
    exc.get_exc_message; seen on an H100 with torch 2.11: an AssertionError from Dynamo's tracer on chunked MLPs
    with symbolic sizes)."""
    return isinstance(error, BackendCompilerFailed) or hasattr(error, "compile_id")


def _after_compile_failure(session: Session, feed: _Feed, state: checkpoints.TrainerState, reporter: RunReporter,
                           failure: Exception) -> None:
    """torch.compile failed on a decoder layer's graph (a compiler bug, engine/compiled_layers.py): no optimizer step
    was taken, so the step is taken again from the same examples with every layer eager, which computes the same
    step, and the run says so. A failure with nothing compiled is not ours to hide."""
    if not session.run.compile_layers or session.processes.world_size > 1:  # the others could not retake it with us
        raise failure
    session.optimizer.zero_grad(set_to_none=True)
    uncompile_decoder_layers(session.model)
    session.run = dataclasses.replace(session.run, compile_layers=False)
    feed.rewind(state.examples_done)
    inner = getattr(failure, "inner_exception", None) or failure  # what the compiler raised
    cause = f"{type(inner).__name__}: {str(inner).strip()}"[:160]
    reporter.write(f"note: torch.compile failed on a decoder layer at step {state.step + 1} ({cause}); the run "
                   "goes on with eager layers: the same arithmetic, slower, with more memory"
                   + fallback_warning(session.run, session.causal_lm.config))


def _skip_step(step: StepResult, state: checkpoints.TrainerState, bad_steps: int, max_bad_steps: int,
               output_dir: Path, reporter: RunReporter) -> None:
    """A step whose loss or gradient was not finite was skipped; too many in a row stop the run (exit 4)."""
    reporter.write(f"step {state.step + 1} skipped: loss {step.loss}, gradient norm {step.grad_norm}")
    if bad_steps >= max_bad_steps:
        reporter.close()
        latest = checkpoints.latest_valid_checkpoint(output_dir)
        raise TrainingDiverged(
            f"training.max_bad_steps: {bad_steps} consecutive steps had a non-finite loss or gradient "
            f"(at step {state.step + 1}); last good checkpoint: {latest or 'none yet'}. "
            "Lower training.learning_rate or check the data")


def _no_gradient_message(step_number: int, step: StepResult, session: Session) -> str:
    fix = "set training.compile_layers: off" if session.run.compile_layers else "check adapter.target_modules"
    return (f"training: step {step_number} gave the adapter no gradient at all (norm 0 over {step.label_tokens} "
            f"labelled tokens), so the run would train nothing; {fix}")


def _log_record(step: int, result: StepResult, tokens_per_second: float, session: Session, micro_batch_size: int,
                tokens_seen: int, stats: DataStats) -> dict:
    peak_allocated, peak_reserved = peak_memory_bytes(session.device.type)
    return {"step": step, "loss": result.loss, "learning_rate": session.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm, "tokens_per_second": tokens_per_second, "peak_vram_bytes": peak_reserved,
            "peak_allocated_bytes": peak_allocated, "tokens_seen": tokens_seen, "micro_batch_size": micro_batch_size,
            "rows_skipped": stats.rows_bad, "rows_truncated": stats.rows_truncated, "rows_dropped": stats.rows_dropped,
            "label_tokens_lost": stats.label_tokens_lost, "label_tokens": stats.label_tokens,
            "compiled_layers": session.run.compile_layers}


def _resume(start: RunStart, session: Session, output_dir: Path) -> checkpoints.TrainerState:
    """Weights, optimizer, schedule, RNG and data position from the newest intact checkpoint (step 0 when none
    was written yet); metrics of later steps dropped, so the file reads as one run."""
    if session.processes.is_main:
        checkpoints.discard_unusable(start.checkpoints)
    state = checkpoints.TrainerState(step=0, examples_done=0, tokens_seen=0)
    latest = start.checkpoints.newest_valid
    if latest is not None:
        state = checkpoints.load_checkpoint(latest, session.model, session.optimizer, session.scheduler,
                                            session.scaler,
                                            session.loss_sum if session.processes.strategy == "fsdp" else None)
        print(f"resumed from {latest} (step {state.step})")
    if session.processes.is_main:
        MetricsLog(output_dir).truncate_after(state.step)
    return state


_Decision = TypeVar("_Decision")


def _decided_by_main(processes: Processes, decide: Callable[[], _Decision]) -> _Decision:
    """Rank 0 alone looks at the folder and decides; the others take its decision, or stop quietly (its exit code)
    where it refused, since rank 0 says why."""
    if processes.is_main:
        try:
            decision = decide()
        except UserError as refused:
            processes.from_main(("refused", refused.exit_code))
            raise
        return processes.from_main(("decided", decision))[1]
    verdict, value = processes.from_main(None)
    if verdict == "refused":
        raise SystemExit(value)
    return value


def _start_in_folder(output_dir: Path, spec: RunSpec, resume: bool, world_size: int) -> RunStart:
    recover_interrupted_replacement(output_dir)
    return plan_start(output_dir, spec, resume, world_size)  # fresh, replace or resume: checked, nothing changed yet


def train(spec: RunSpec, resume: bool = False, show_progress: bool = True, force: bool = False,
          hardware: Optional[Hardware] = None) -> TrainResult:
    """Run the whole recipe for `spec` on `hardware` (this machine's by default), as one process or as one of
    those torchrun / accelerate launch started (engine/distributed.py): then rank 0 alone holds the folder, writes
    and prints, and the others train beside it."""
    output_dir = output_dir_of(spec)

    # 1. Everything that can be decided or checked without weights, before the slow load.
    model_config = load_model_config(spec.model)
    spec = settle_auto_attention(spec, model_config)
    run = fit_to_budget(resolve(spec, hardware or detect_hardware()), model_config, force,
                        launch_facts(os.environ)[1])
    spec, training = run.spec, run.spec.training
    usability = check_before_loading(run, model_config)
    if usability:
        print(f"note: {usability}", file=sys.stderr)

    with (process_group(run.device_type, training.distributed) as processes,
          # for the run's lifetime: a second run on this folder is refused
          hold_run_folder(output_dir) if processes.is_main else contextlib.nullcontext()):
        start = _decided_by_main(processes, lambda: _start_in_folder(output_dir, spec, resume, processes.world_size))

        # 2. Read the data and build the model: every input is checked before an earlier run is touched.
        set_seed(training.seed)
        data: TokenizedData = prepare_data(spec.data, load_tokenizer(spec.model), training.max_seq_len,
                                           training.seed)
        if training.num_epochs:  # the schedule is laid over max_steps when build() makes it
            run = dataclasses.replace(run, spec=spec.with_values({"training.max_steps": steps_for_epochs(
                data.stats.train_examples, training.micro_batch_size * processes.world_size,
                training.gradient_accumulation_steps, training.num_epochs)}))
        apply_memory_cap(training.memory_cap_gib)
        session = build(run, processes)
        train_sha256 = start.check_data(output_dir, spec, data.train)
        stats = data.stats
        print(f"data: {stats.train_examples} train / {stats.eval_examples} eval examples from {stats.rows_read} rows; "
              f"{stats.rows_bad} bad rows skipped {dict(stats.bad_reasons) or ''}".rstrip()
              + f"; {stats.rows_truncated} truncated, {stats.rows_dropped} dropped at max_seq_len "
              f"({stats.label_tokens_lost / max(stats.label_tokens, 1):.1%} of label tokens lost)")
        warning = truncation_warning(stats, training.max_seq_len)
        if warning:
            print(warning, file=sys.stderr)
        print(session.summary.line())
        if processes.strategy != "single":
            offload = ", parameters, gradients and optimizer states offloaded to the CPU" if (
                processes.strategy == "fsdp" and training.fsdp_cpu_offload) else ""
            print(f"distributed: {processes.strategy} over {processes.world_size} process"
                  f"{'es' if processes.world_size > 1 else ''}{offload}")

        # 3. Take the folder over; an earlier run being replaced is kept aside until the first checkpoint.
        with earlier_run_kept(output_dir, processes.is_main and start.mode == "replace") as drop_earlier_run:
            state = (_resume(start, session, output_dir) if start.mode == "resume"
                     else checkpoints.TrainerState(step=0, examples_done=0, tokens_seen=0))
            if processes.is_main:
                write_run_record(output_dir, spec, train_sha256, processes.world_size)

            def save(at: checkpoints.TrainerState) -> Path:
                adapter = adapter_state(session.model, processes)  # FSDP: gathered from every rank
                optimizer = optimizer_state(session.loss_sum, session.optimizer, processes)  # the same
                saved = None
                if processes.is_main:
                    saved = checkpoints.save_checkpoint(output_dir, at, session.model, session.optimizer,
                                                        session.scheduler, training.save_total_limit, session.scaler,
                                                        adapter, optimizer)
                    drop_earlier_run()
                return processes.from_main(saved)  # also the barrier: no rank goes on while rank 0 writes

            # 4. The loop.
            return _loop(session, data, state, output_dir, save, show_progress)


def _loop(session: Session, data: TokenizedData, state: checkpoints.TrainerState, output_dir: Path,
          save: Callable[[checkpoints.TrainerState], Path], show_progress: bool) -> TrainResult:
    """`for step: take a step, log, maybe eval, maybe checkpoint` from `state` to training.max_steps, then the
    final adapter."""
    training, stats = session.run.spec.training, data.stats
    processes = session.processes
    metrics = MetricsLog(output_dir)
    feed = _Feed(data.train, session.tokenizer.pad_token_id, training.micro_batch_size,
                 training.gradient_accumulation_steps, training.seed, state.examples_done, processes)
    result = TrainResult(output_dir=output_dir, adapter_dir=output_dir / ADAPTER, final_step=state.step,
                         is_main=processes.is_main)
    speeds: list[float] = []
    bad_steps = 0
    if session.device.type == "cuda":  # what loading took (FSDP: a layer at a time), then training's own peaks
        allocated, reserved = peak_memory_bytes("cuda")
        print(f"model loaded: GPU peak {reserved / GIB:.2f} GiB reserved ({allocated / GIB:.2f} GiB allocated)")
        torch.cuda.reset_peak_memory_stats()
    reporter = RunReporter(training.max_steps, state.step, show_progress and processes.is_main,
                           output_dir / TENSORBOARD_DIR
                           if session.run.spec.output.tensorboard and processes.is_main else None)
    with stop_on_signals() as signals, contextlib.closing(reporter):
        while state.step < training.max_steps:
            started = time.perf_counter()
            try:
                step = train_step(session, feed.next_step())
            except torch.cuda.OutOfMemoryError:
                _after_oom(session, feed, state, save, reporter)
                continue
            except Exception as failure:  # noqa: BLE001 (only the compiler's failures are handled; the rest re-raised)
                if not compiler_failed(failure):
                    raise
                _after_compile_failure(session, feed, state, reporter, failure)
                continue
            if not step.stepped:
                bad_steps += 1
                _skip_step(step, state, bad_steps, training.max_bad_steps, output_dir, reporter)
                state = dataclasses.replace(state, examples_done=state.examples_done + feed.examples_per_step)
                continue
            bad_steps = 0
            if step.grad_norm == 0.0 and step.label_tokens:  # nothing would ever train: stop rather than pretend
                raise TrainingDiverged(_no_gradient_message(state.step + 1, step, session))
            if session.device.type == "cuda":
                torch.cuda.synchronize()
            tokens_per_second = step.input_tokens / (time.perf_counter() - started)
            state = checkpoints.TrainerState(step=state.step + 1,
                                             examples_done=state.examples_done + feed.examples_per_step,
                                             tokens_seen=state.tokens_seen + step.input_tokens)
            speeds.append(tokens_per_second)
            result.losses.append(step.loss)
            is_last = state.step == training.max_steps
            record = None
            if state.step % training.logging_steps == 0 or is_last:
                record = _log_record(state.step, step, tokens_per_second, session, feed.micro_batch_size,
                                     state.tokens_seen, stats)
            if data.eval and ((training.eval_steps and state.step % training.eval_steps == 0) or is_last):
                result.eval_loss = eval_loss(session, data.eval, feed.micro_batch_size)
                if result.best_eval is None or result.eval_loss < result.best_eval[1]:
                    result.best_eval = (state.step, result.eval_loss)
                record = (record or {"step": state.step}) | {"eval_loss": result.eval_loss}
            if record is not None and processes.is_main:
                metrics.write(record)
            reporter.step(step.loss, tokens_per_second, record)
            if record is not None and "eval_loss" in record:
                reporter.eval(state.step, result.eval_loss)
            saved = None
            stop = processes.largest(signals[0] if signals else 0)  # a signal to any process stops all at this step
            if is_last or stop or (training.save_steps and state.step % training.save_steps == 0):
                saved = save(state)
            if stop and not is_last:
                raise Interrupted(stop, saved)
    result.final_step = state.step
    adapter = adapter_state(session.model, processes)  # FSDP: gathered from every rank
    if processes.is_main:
        save_final_adapter(session.model, output_dir, prompt_format(session.run.spec.data, session.tokenizer),
                           adapter)
    processes.barrier()
    timed = speeds[2:] or speeds
    result.tokens_per_second = statistics.median(timed) if timed else None
    result.peak_allocated_bytes, result.peak_reserved_bytes = peak_memory_bytes(session.device.type)
    return result


def summary(result: TrainResult) -> Summary:
    """The closing summary's figures for `result`."""
    return Summary(result.final_step, result.adapter_dir, result.losses[-1] if result.losses else None,
                   result.eval_loss, result.best_eval, result.tokens_per_second, result.peak_reserved_bytes)
