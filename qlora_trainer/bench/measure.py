"""Measure one fine-tuning method for a few real steps: parameter, gradient and optimizer-state bytes, peaks, speed.

Methods: `full` (fp32 master weights, bf16 autocast, AdamW), `full-8bit` (bf16 weights, 8-bit AdamW), and the
trainer's own runs `lora` (16-bit base), `qlora` (NF4 + double quantization base), `loha` and `lokr` (NF4 base),
each a `RunSpec` built by `method_spec` and built and stepped by the engine exactly as `train` does. Full
fine-tuning is not something the trainer does; it gets its model here and the engine's step. Every method uses
gradient checkpointing and the same chunked loss. Run one method per process (`python -m qlora_trainer.bench.measure
...`) so each starts from an empty CUDA allocator.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, get_scheduler

from qlora_trainer.bench.methods import ADAPTER_METHODS, FULL_METHODS, METHODS
from qlora_trainer.engine import adapters
from qlora_trainer.engine.base import device_for
from qlora_trainer.engine.loss import LossModule
from qlora_trainer.engine.build import Session, build, build_optimizer
from qlora_trainer.engine.checkpointing import enable_activation_checkpointing
from qlora_trainer.engine.step import train_step
from qlora_trainer.hardware import apply_memory_cap, detect_hardware
from qlora_trainer.spec import ResolvedRun, RunSpec, resolve



def method_spec(method: str, model_path: str, seq_len: int, micro_batch_size: int, rank: int = 16,
                target_modules: str = "all-linear", steps: int = 6) -> RunSpec:
    """The run specification of one method: rows of `seq_len` random tokens, one sequence per row (no packing, no
    padding), dropout 0. Full methods are described as a 16-bit run (what their activations cost) and are never
    compiled."""
    values = {"model.path": model_path, "training.max_seq_len": seq_len, "training.micro_batch_size": micro_batch_size,
              "training.max_steps": steps, "training.learning_rate": 1e-5, "training.lr_scheduler": "constant",
              "adapter.r": rank, "adapter.lora_alpha": 2.0 * rank, "adapter.lora_dropout": 0.0,
              "adapter.target_modules": target_modules}
    values |= ADAPTER_METHODS.get(method, {"quantization.mode": "none", "training.compile_layers": "off"})
    return RunSpec().with_values(values)


@dataclass(frozen=True)
class Measurement:
    method: str
    device_name: str
    trainable_params: int
    weight_bytes: int  # every parameter and quantization constant of the model, adapters included
    gradient_bytes: int  # .grad tensors after a backward pass
    optimizer_state_bytes: int  # the optimizer's own state tensors, summed
    peak_allocated_bytes: Optional[int]  # GPU only
    peak_reserved_bytes: Optional[int]  # GPU only
    tokens_per_second: float  # median of the timed steps after two warm-up steps


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers as stored, plus the absmax/code tensors of 4-bit quantization states."""
    total = sum(_tensor_bytes(p) for p in model.parameters()) + sum(_tensor_bytes(b) for b in model.buffers())
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        total += _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
        if state.nested:
            total += _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.state2.code)
            total += _tensor_bytes(state.offset) if torch.is_tensor(state.offset) else 0
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its per-parameter state."""
    return sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def build_full(method: str, run: ResolvedRun) -> Session:
    """Full fine-tuning of every weight: fp32 with AdamW, or bf16 with 8-bit AdamW; checkpointed like the trainer."""
    spec, device = run.spec, device_for(run.device_type)
    dtype = torch.float32 if method == "full" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=dtype, use_safetensors=True).to(device)
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    trainable = list(model.parameters())
    optimizer = build_optimizer("adamw" if method == "full" else "adamw8bit", trainable, spec.training.learning_rate,
                                0.0, fused=device.type == "cuda")
    scheduler = get_scheduler("constant", optimizer)
    trainable_count, total = adapters.count_params(model)
    summary = adapters.AdapterSummary([], 0, trainable_count, trainable_count, total)
    return Session(run, model, model, None, device, trainable, optimizer, scheduler, None, summary,
                   LossModule(model, spec.training.loss_chunk_tokens))


def measure(method: str, spec: RunSpec) -> Measurement:
    """Train `spec.training.max_steps` steps on random tokens through the engine and read what the method costs."""
    run = resolve(spec, detect_hardware())
    session = build_full(method, run) if method in FULL_METHODS else build(run)
    weights = model_bytes(session.model)
    training, device = spec.training, session.device
    vocab = session.causal_lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    speeds = []
    for _ in range(training.max_steps):
        tokens = torch.randint(0, vocab, (training.micro_batch_size, training.max_seq_len), generator=generator)
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
        started = _clock(device)
        step = train_step(session, [batch])
        speeds.append(step.input_tokens / (_clock(device) - started))
    on_gpu = device.type == "cuda"
    return Measurement(
        method=method,
        device_name=torch.cuda.get_device_name(device) if on_gpu else "cpu",
        trainable_params=sum(p.numel() for p in session.trainable),
        weight_bytes=weights,
        # backward gives every trainable tensor a .grad of its own shape and dtype (the step frees them again)
        gradient_bytes=sum(_tensor_bytes(p) for p in session.trainable),
        optimizer_state_bytes=optimizer_state_bytes(session.optimizer),
        peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if on_gpu else None,
        tokens_per_second=statistics.median(speeds[2:] or speeds),
    )


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description="measure one method (run by the bench harness)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--cap-gib", type=float, default=0.0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    apply_memory_cap(args.cap_gib)
    spec = method_spec(args.method, args.model_path, args.seq_len, args.micro_batch_size, args.rank, args.targets,
                       args.steps)
    args.out.write_text(json.dumps(asdict(measure(args.method, spec))))


if __name__ == "__main__":
    main()
