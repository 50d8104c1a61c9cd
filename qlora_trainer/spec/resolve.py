"""Resolve a run specification for the hardware it runs on: everything derived is fixed here, once.

`resolve(spec, hardware)` decides the compute dtype (honouring `quantization.compute_dtype`), loss scaling, the
speed paths that apply on this device (compiled layers, fused LoRA) and the memory budget with its one `fits`
rule. `train`, `plan-memory`, `bench` and the peer comparison all go through it, and the planner's search returns
a `ResolvedRun` of a changed spec (`with_values`), resolved for the same hardware.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional

from qlora_trainer.errors import ConfigError
from qlora_trainer.hardware import CUDA_CONTEXT_BYTES, GIB, Hardware
from qlora_trainer.spec.sections import RunSpec

PACKED_VARLEN = "qlora_packed_varlen"  # engine/packed_attention.py ATTENTION_NAME (the spec stays free of torch)

# from measurement: benchmarks/results/planner-accuracy-h100.md, whose largest under-prediction is 3.8%, plus
# headroom: the share of the budget a plan leaves free
SAFETY_MARGIN_FRACTION = 0.05


@dataclass(frozen=True)
class Budget:
    """The GPU memory a run may use, and the one rule for whether a predicted peak fits it."""

    device_name: str  # e.g. "T4", "NVIDIA H100 80GB HBM3 capped at 15 GiB"
    budget_bytes: int  # the card's usable memory, or the cap

    @property
    def usable_bytes(self) -> int:
        """What PyTorch's pool may reserve: the budget less the safety margin and the CUDA context."""
        return int(self.budget_bytes * (1 - SAFETY_MARGIN_FRACTION)) - CUDA_CONTEXT_BYTES

    def fits(self, predicted_peak_bytes: int) -> bool:
        return predicted_peak_bytes <= self.usable_bytes

    @staticmethod
    def needed_for(predicted_peak_bytes: int) -> int:
        """The smallest budget a predicted peak fits."""
        return math.ceil((predicted_peak_bytes + CUDA_CONTEXT_BYTES) / (1 - SAFETY_MARGIN_FRACTION))


@dataclass(frozen=True)
class ResolvedRun:
    """A run specification with everything that depends on the hardware decided."""

    spec: RunSpec
    hardware: Hardware
    compute_dtype: str  # "bfloat16" | "float16" | "float32": the base's matmuls and autocast
    loss_scaling: bool  # fp16 on a GPU: a gradient scaler guards against underflow
    compile_layers: bool  # torch.compile each decoder layer (training.compile_layers, auto = on capable GPUs)
    fused_lora: bool  # fused LoRA-on-4-bit forward (training.fused_lora, for LoRA over a 4-bit base)
    fused_loss: bool  # Liger's fused lm_head + cross-entropy (training.loss_kernel), else the chunked loss
    fused_optimizer: bool  # torch's fused AdamW: training.optimizer adamw with its parameters on a GPU
    attention: str  # the attn_implementation the model loads with (model.attn_implementation, or packed varlen)
    budget: Optional[Budget]  # None on the CPU

    @property
    def device_type(self) -> str:
        """Where tensors live: "cuda" or "cpu"."""
        return self.hardware.device_type

    @property
    def mlp_chunked(self) -> bool:
        """Whether engine/token_chunks.py splits this run's sequences (only those longer than the chunk)."""
        return 0 < self.spec.training.mlp_chunk_tokens < self.spec.training.max_seq_len

    @property
    def attention_chunked(self) -> bool:
        """Whether engine/chunked_attention.py splits this run's sequences (only those longer than the chunk)."""
        return 0 < self.spec.training.attention_chunk_tokens < self.spec.training.max_seq_len

    @property
    def layer_backward_chunked(self) -> bool:
        """Whether checkpointed decoder layers take their whole backward a chunk of queries at a time, not only
        their attention (engine/chunked_attention.py): with chunked attention and no adapter dropout, whose masks,
        drawn a chunk at a time, would not be the forward's."""
        training = self.spec.training
        return self.attention_chunked and training.gradient_checkpointing and self.spec.adapter.lora_dropout == 0

    @property
    def key_blocks(self) -> bool:
        """Whether a layer backward in chunks takes the keys of a plain causal row a block at a time (engine/
        key_blocks.py): through the flash kernel's own ops, which run on the CPU and on CUDA GPUs of compute
        capability 8.0 and up (elsewhere the row's keys go at once, through SDPA)."""
        gpu = self.hardware.gpu
        return self.layer_backward_chunked and (self.device_type == "cpu" or (
            gpu is not None and gpu.compute_capability >= (8, 0)))

    @property
    def keys_recomputed(self) -> bool:
        """Whether a layer backward in chunks makes each block of keys and values where it uses them, never the
        row's (training.recompute_keys; engine/key_blocks.py): with key blocks, on plain causal rows."""
        return self.key_blocks and self.spec.training.recompute_keys

    @property
    def prefetch_checkpoints(self) -> bool:
        """Whether offloaded checkpoint inputs are copied back one layer ahead of backward (engine/checkpointing.py;
        one more input on the GPU): where they are offloaded on a GPU, but not with chunked MLPs, the runs at the
        edge of their memory."""
        training = self.spec.training
        return (self.device_type == "cuda" and training.gradient_checkpointing and training.offload_checkpoints
                and not self.mlp_chunked)

    def with_values(self, values: dict[str, Any]) -> "ResolvedRun":
        """This run with some `section.key` values changed, resolved again for the same hardware."""
        return resolve(self.spec.with_values(values), self.hardware)


def _compute_dtype(spec: RunSpec, hardware: Hardware) -> str:
    requested = spec.quantization.compute_dtype
    bf16 = hardware.gpu is None or hardware.device_type == "cpu" or hardware.gpu.supports_bf16
    if requested == "auto":
        return "bfloat16" if bf16 else "float16"
    if requested == "bfloat16" and not bf16:
        raise ConfigError(f"quantization.compute_dtype: bfloat16 is not supported by {hardware.gpu.name}; "
                          "use float16 or auto")
    return requested


def _compiles(setting: str, hardware: Hardware) -> bool:
    """`auto` compiles every decoder layer on CUDA GPUs Triton can generate kernels for (compute capability 7.0 and
    up, Triton installed); on the CPU it would add a C++ build to every run for little gain. Measured learning as
    eager does, and faster, on an H100 (benchmarks/results/engine-h100.md)."""
    if setting != "auto":
        return setting == "on"
    gpu = hardware.gpu
    return (hardware.device_type == "cuda" and gpu is not None and hardware.triton
            and gpu.compute_capability >= (7, 0))


def _fused_loss(spec: RunSpec, hardware: Hardware) -> bool:
    """`auto` fuses lm_head and cross-entropy with Liger-Kernel's Triton kernel on CUDA GPUs that run Triton
    (compute capability 7.0 and up) where it is installed, unless lm_head itself is adapted (the kernel reads its
    frozen weight alone). `fused` asks for it and is refused where it cannot run."""
    setting = spec.training.loss_kernel
    if setting == "chunked":
        return False
    gpu = hardware.gpu
    targets = spec.adapter.target_modules
    runs = (hardware.device_type == "cuda" and gpu is not None and gpu.compute_capability >= (7, 0)
            and hardware.triton and hardware.liger)
    adapted_head = not isinstance(targets, str) and "lm_head" in targets
    if setting == "fused" and not (runs and not adapted_head):
        why = ("cannot read an adapter on lm_head" if runs
               else "needs a CUDA GPU (compute capability 7.0+) with liger-kernel installed")
        raise ConfigError(f"training.loss_kernel: fused {why}; use auto or chunked")
    return runs and not adapted_head


def _attention(spec: RunSpec, hardware: Hardware) -> str:
    """`auto` is SDPA, and on packed rows torch's variable-length flash kernel where it runs (torch >= 2.10, compute
    capability 8.0 and up): the same attention, kept inside each example by the examples' lengths instead of a
    block-diagonal mask (engine/packed_attention.py). A named implementation is used as named."""
    requested = spec.model.attn_implementation
    if requested != "auto":
        return requested
    gpu = hardware.gpu
    if (spec.data.packing and hardware.device_type == "cuda" and gpu is not None
            and gpu.compute_capability >= (8, 0) and hardware.varlen_attention):
        return PACKED_VARLEN
    return "sdpa"


def _budget(spec: RunSpec, hardware: Hardware) -> Optional[Budget]:
    gpu = hardware.gpu
    if gpu is None:
        return None
    cap = spec.training.memory_cap_gib
    if cap > 0:
        return Budget(f"{gpu.name} capped at {cap:g} GiB", min(int(cap * GIB), gpu.usable_bytes))
    return Budget(gpu.name, gpu.usable_bytes)


def resolve(spec: RunSpec, hardware: Hardware) -> ResolvedRun:
    """Everything `spec` leaves to the hardware, decided for `hardware`."""
    compute_dtype = _compute_dtype(spec, hardware)
    return ResolvedRun(
        spec=spec,
        hardware=hardware,
        compute_dtype=compute_dtype,
        loss_scaling=compute_dtype == "float16" and hardware.device_type == "cuda",
        compile_layers=_compiles(spec.training.compile_layers, hardware),
        fused_lora=(spec.training.fused_lora and spec.adapter.type == "lora"
                    and spec.quantization.mode in ("nf4", "fp4")),
        fused_loss=_fused_loss(spec, hardware),
        # one launch for every parameter and no temporaries (the foreach step allocates one tensor per parameter);
        # not under FSDP's CPU offload, whose step runs on the CPU
        fused_optimizer=(spec.training.optimizer == "adamw" and hardware.device_type == "cuda"
                         and not (spec.training.distributed == "fsdp" and spec.training.fsdp_cpu_offload)),
        attention=_attention(spec, hardware),
        budget=_budget(spec, hardware),
    )
