"""GPU catalogue (memory, bf16 support), detection of the GPU at hand through torch or NVML, and the facts about
this machine that resolving a run needs (`Hardware`)."""

import os
import re
from dataclasses import dataclass
from typing import Optional

from qlora_trainer.errors import UserError

GIB = 2**30
MIB = 2**20
# from measurement: benchmarks/results/cuda-context-h100.json (benchmarks/cuda_context.py: NVML's used memory less
# PyTorch's reserved pool after an NF4 + LoRA + SDPA forward and backward, H100, torch 2.11 / CUDA 13); it sits on
# the card outside PyTorch's pool
CUDA_CONTEXT_BYTES = 764 * MIB


@dataclass(frozen=True)
class GpuSpec:
    name: str
    total_bytes: int  # memory on the card, as nvidia-smi lists it
    usable_bytes: int  # what the CUDA runtime offers a process (torch total_memory): total less the ECC/driver reserve
    supports_bf16: bool  # compute capability >= 8.0 (Ampere and later)
    compute_capability: tuple[int, int]


def _spec(name: str, total_mib: int, usable_gib: float, capability: tuple[int, int]) -> GpuSpec:
    return GpuSpec(name, total_mib * MIB, round(usable_gib * GIB / MIB) * MIB, capability >= (8, 0), capability)


# total: nvidia-smi's total; usable: the "total capacity" torch reports on that card (ECC on where the card has
# it), as printed in its out-of-memory messages. The CUDA context comes out of `usable` too; the planner
# counts it separately (spec/resolve.py: CUDA_CONTEXT_BYTES).
GPU_CATALOGUE: dict[str, GpuSpec] = {spec.name: spec for spec in (
    _spec("T4", 15360, 14.75, (7, 5)),
    _spec("V100-16GB", 16160, 15.78, (7, 0)),
    _spec("L4", 23034, 22.03, (8, 9)),
    _spec("A10G", 23028, 22.19, (8, 6)),
    _spec("RTX3090", 24576, 23.69, (8, 6)),
    _spec("RTX4090", 24564, 23.65, (8, 9)),
    _spec("A100-40GB", 40960, 39.59, (8, 0)),
    _spec("A100-80GB", 81920, 79.15, (8, 0)),
    _spec("H100-80GB", 81559, 79.19, (9, 0)),
)}
_ALIASES = {"3090": "RTX3090", "4090": "RTX4090", "H100": "H100-80GB"}


def _normalised(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def lookup_gpu(name: str) -> GpuSpec:
    """A catalogue entry by name (case, spaces and dashes ignored), or a UserError listing the known ones."""
    key = _normalised(_ALIASES.get(name.strip().upper(), name))
    for spec_name, spec in GPU_CATALOGUE.items():
        if _normalised(spec_name) == key:
            return spec
    raise UserError(f"--gpu {name}: unknown GPU; choose one of {', '.join(GPU_CATALOGUE)}, or give --vram GIB")


def budget_gpu(vram_gib: float) -> GpuSpec:
    """A card with `vram_gib` GiB usable (as torch reports it), for any GPU outside the catalogue.

    Its bf16 support and compute capability are unknown and assumed those of a current card (bf16 and fp16 take the
    same bytes, so the plan's memory is unchanged; compiled layers, which need capability 7.0, are planned).
    """
    if not vram_gib > 0 or vram_gib == float("inf"):
        raise UserError(f"--vram {vram_gib:g}: not allowed; give the GPU's memory in GiB, a number > 0 (e.g. 15.5)")
    usable = int(vram_gib * GIB)
    return GpuSpec(f"{vram_gib:g} GiB GPU", usable, usable, True, (8, 0))


def detect_gpu() -> Optional[GpuSpec]:
    """The first visible CUDA GPU, through torch or else NVML; None on a machine without one."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            capability = (props.major, props.minor)
            return GpuSpec(props.name, props.total_memory, props.total_memory, capability >= (8, 0), capability)
    except (ImportError, RuntimeError):
        pass
    try:  # a CPU build of torch on a GPU machine still sees the card through the driver
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            name = pynvml.nvmlDeviceGetName(handle)
        finally:
            pynvml.nvmlShutdown()
        name = name if isinstance(name, str) else name.decode()
        return GpuSpec(name, total, total, capability >= (8, 0), capability)
    except pynvml.NVMLError:  # no driver, or no device
        return None


@dataclass(frozen=True)
class Hardware:
    """What a run is resolved for: a GPU (detected here, or named for planning) or the CPU."""

    gpu: Optional[GpuSpec]  # the card whose memory is the budget; None: no GPU
    device_type: str = "cuda"  # where tensors live: "cuda", or "cpu" (no GPU, or a CPU build of torch beside one)
    triton: bool = True  # Triton is installed, so torch.compile can generate GPU kernels (a planned card: assumed)
    varlen_attention: bool = True  # torch has variable-length flash attention (>= 2.10; a planned card: assumed)
    liger: bool = True  # Liger-Kernel is installed (a dependency on Linux; a planned card: assumed)

    @staticmethod
    def planned(gpu: GpuSpec) -> "Hardware":
        """A named or described card, planned for as a user's CUDA build of torch would run on it."""
        return Hardware(gpu, "cuda")


CPU = Hardware(None, "cpu")


def detect_hardware() -> Hardware:
    """This machine: its first GPU, if any, and where torch will put tensors."""
    import importlib.util

    import torch

    return Hardware(detect_gpu(), "cuda" if torch.cuda.is_available() else "cpu",
                    importlib.util.find_spec("triton") is not None,
                    importlib.util.find_spec("torch.nn.attention.varlen") is not None,
                    importlib.util.find_spec("liger_kernel") is not None)


# Growable segments instead of fixed blocks: less reserved-but-unused memory, and a predictable peak.
ALLOCATOR_SETTINGS = "expandable_segments:True"


def configure_allocator() -> None:
    """Our CUDA allocator settings, unless PYTORCH_CUDA_ALLOC_CONF says otherwise; before CUDA starts."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTINGS)


def apply_memory_cap(cap_gib: float) -> None:
    """Hold this process to cap_gib of the GPU (to share a card, or to behave as a smaller one would): PyTorch's pool
    gets the cap less the CUDA context, which the process holds outside it, as on a card of cap_gib."""
    import torch

    if cap_gib <= 0 or not torch.cuda.is_available():
        return
    total_bytes = torch.cuda.get_device_properties(0).total_memory
    pool_bytes = max(int(cap_gib * GIB) - CUDA_CONTEXT_BYTES, 0)
    torch.cuda.set_per_process_memory_fraction(min(1.0, pool_bytes / total_bytes), 0)


def peak_memory_bytes(device_type: str) -> tuple[Optional[int], Optional[int]]:
    """(peak allocated, peak reserved) bytes on the GPU since the last reset of the statistics; (None, None) on the
    CPU."""
    if device_type != "cuda":
        return None, None
    import torch

    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
