"""Measure the GPU memory a training process holds outside PyTorch's caching allocator (the CUDA context,
cuBLAS/cuDNN handles and kernels loaded), after a real NF4 + LoRA forward and backward.

    python benchmarks/cuda_context.py        # prints one JSON object

NVML's used memory minus torch.cuda.memory_reserved(), less what was in use before this process started.
"""

import json

import pynvml
import torch


def used_bytes() -> int:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used


def main() -> None:
    import bitsandbytes as bnb

    pynvml.nvmlInit()
    before = used_bytes()
    layer = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    lora_a = torch.nn.Linear(4096, 16, bias=False).cuda()
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x) + torch.nn.functional.scaled_dot_product_attention(
            *(x.view(1, 16, 2048, 256),) * 3, is_causal=True).reshape(2048, 4096) + lora_a(x).sum()
    y.float().sum().backward()
    torch.cuda.synchronize()
    outside = used_bytes() - before - torch.cuda.memory_reserved()
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "outside_pytorch_bytes": outside, "outside_pytorch_mib": round(outside / 2**20, 1)}))


if __name__ == "__main__":
    main()
