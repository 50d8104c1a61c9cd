"""engine/token_chunks.py on the model's final norm: run a chunk of tokens at a time, its backward makes no fp32
tensor of the whole sequence (run whole, transformers' RMSNorm makes several), and its gradients are unchanged."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_trainer.engine.token_chunks import run_in_chunks

TOKENS, HIDDEN, CHUNK = 96, 64, 32


class _Made(TorchDispatchMode):
    """The element count of every fp32 tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.fp32_numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.fp32_numels.append(tensor.numel())
        return out


def _backward(chunked: bool) -> tuple[list[int], torch.Tensor]:
    """The fp32 tensors one bf16 backward of the final norm makes, and its input's gradient."""
    norm = LlamaRMSNorm(HIDDEN).to(torch.bfloat16)
    norm.weight.requires_grad_(False)  # frozen, as the base's are
    if chunked:
        run_in_chunks(norm, CHUNK)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, TOKENS, HIDDEN, generator=generator).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(1, TOKENS, HIDDEN, generator=generator).to(torch.bfloat16)
    out = norm(hidden)
    with _Made() as made:
        out.backward(grad)
    return made.fp32_numels, hidden.grad


def test_the_final_norm_in_chunks_makes_no_whole_sequence_fp32_tensor_in_backward():
    whole_made, whole_grad = _backward(chunked=False)
    chunked_made, chunked_grad = _backward(chunked=True)
    assert max(whole_made) == TOKENS * HIDDEN  # run whole: its fp32 upcast's gradients are the sequence's
    assert max(chunked_made) == CHUNK * HIDDEN
    # each token's arithmetic is the same; a CPU's kernels may still order a row's sum differently by the tensor's
    # size, so within one bf16 rounding (2^-8 relative) of the gradient's norm
    error = (chunked_grad.float() - whole_grad.float()).norm() / whole_grad.float().norm()
    assert error <= 2**-8
