"""Measure one fine-tuning method for a few real steps: parameter, gradient and optimizer-state bytes, peaks, speed.

Methods: `full` (fp32 master weights, bf16 autocast, AdamW), `full-8bit` (bf16 weights, 8-bit AdamW), `lora`
(16-bit base), `qlora` (NF4 + double quantization base), `loha` and `lokr` (NF4 base). Every method uses
gradient checkpointing and the same chunked loss as the trainer. Run one method per process
(`python -m qlora_trainer.bench.measure ...`) so each starts from an empty CUDA allocator.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM

from qlora_trainer import adapters
from qlora_trainer.config import AdapterConfig, ModelConfig, QuantizationConfig
from qlora_trainer.loss import causal_lm_loss
from qlora_trainer.model import enable_activation_checkpointing, load_base, load_model_config, pick_device
from qlora_trainer.hardware import apply_memory_cap
from qlora_trainer.train import build_optimizer, use_speed_paths

METHODS = ("full", "full-8bit", "lora", "qlora", "loha", "lokr")
ADAPTER_METHODS = {"lora": ("lora", "none"), "qlora": ("lora", "nf4"), "loha": ("loha", "nf4"), "lokr": ("lokr", "nf4")}


@dataclass(frozen=True)
class MethodSpec:
    method: str
    model_path: str
    seq_len: int
    micro_batch_size: int
    rank: int = 16
    target_modules: str = "all-linear"
    steps: int = 6
    offload_checkpoints: bool = False  # adapter methods: checkpointed inputs in CPU memory
    fused_lora: bool = True  # LoRA methods: fused_lora.py's forward (training.fused_lora)
    compile_layers: str = "auto"  # adapter methods: torch.compile each decoder layer (training.compile_layers)
    mlp_chunk_tokens: int = 0  # adapter methods: MLPs a chunk of tokens at a time (training.mlp_chunk_tokens)


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


def load_method(spec: MethodSpec, device: torch.device):
    """The model with its trainable parameters and optimizer name, for one method."""
    if spec.method in ("full", "full-8bit"):
        dtype = torch.float32 if spec.method == "full" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype, use_safetensors=True).to(device)
        model.config.use_cache = False
        enable_activation_checkpointing(model)
        return model, model, "adamw" if spec.method == "full" else "adamw8bit"
    adapter_type, quant = ADAPTER_METHODS[spec.method]
    model_cfg = ModelConfig(path=spec.model_path)
    base = load_base(model_cfg, QuantizationConfig(mode=quant), gradient_checkpointing=True, device=device,
                     offload_checkpoints=spec.offload_checkpoints)
    keys, layers = adapters.resolve_targets(adapters.meta_model(load_model_config(model_cfg)), spec.target_modules)
    adapter = AdapterConfig(type=adapter_type, r=spec.rank, alpha=2 * spec.rank, dropout=0.0, target_modules=keys)
    peft_model, _ = adapters.attach_adapter(base.model, adapter, keys, layers)
    use_speed_paths(peft_model, spec.fused_lora, spec.mlp_chunk_tokens, spec.compile_layers, device)
    return peft_model, peft_model.get_base_model(), "adamw"


def measure(spec: MethodSpec) -> Measurement:
    """Train `spec.steps` steps on random tokens and read what the method costs."""
    device = pick_device()
    model, causal_lm, optimizer_name = load_method(spec, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_name, trainable, lr=1e-5, weight_decay=0.0)
    weights = model_bytes(model)
    vocab = causal_lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    speeds, gradient_bytes = [], 0
    for _ in range(spec.steps):
        tokens = torch.randint(0, vocab, (spec.micro_batch_size, spec.seq_len), generator=generator).to(device)
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast:
            parts = causal_lm_loss(causal_lm, batch, 1024)
        (parts.loss_sum / parts.label_tokens).backward()
        gradient_bytes = sum(_tensor_bytes(p.grad) for p in trainable if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speeds.append(tokens.numel() / (time.perf_counter() - started))
    on_gpu = device.type == "cuda"
    return Measurement(
        method=spec.method,
        device_name=torch.cuda.get_device_name(device) if on_gpu else "cpu",
        trainable_params=sum(p.numel() for p in trainable),
        weight_bytes=weights,
        gradient_bytes=gradient_bytes,
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if on_gpu else None,
        tokens_per_second=statistics.median(speeds[2:] or speeds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="measure one method (run by the bench harness)")
    parser.add_argument("--spec", required=True, help="MethodSpec as JSON")
    parser.add_argument("--cap-gib", type=float, default=0.0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    apply_memory_cap(args.cap_gib)
    result = measure(MethodSpec(**json.loads(args.spec)))
    args.out.write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
