"""engine/token_chunks.py on the model's final norm: the one found is the one the last layer's output goes through;
run a chunk of tokens at a time, its backward makes no fp32 tensor of the whole sequence (run whole, transformers'
RMSNorm makes several), and its gradients are unchanged."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_trainer.engine.token_chunks import final_norm, run_in_chunks

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


TINY = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
ARCHITECTURES = {
    "llama": LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),
    "qwen2": Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),
    "gemma": GemmaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=1, head_dim=16, **TINY),
    "phi3": Phi3Config(hidden_size=64, intermediate_size=96, num_key_value_heads=4, pad_token_id=0, **TINY),
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_final_norm_found_is_the_one_the_last_layers_output_goes_through(name):
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name])
    norm = final_norm(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    seen = {}
    layers[-1].register_forward_hook(lambda module, args, out: seen.update(last=out[0] if isinstance(out, tuple)
                                                                             else out))
    norm.register_forward_pre_hook(lambda module, args: seen.update(norm=args[0]))
    model(input_ids=torch.arange(12).reshape(1, 12))
    assert seen["norm"] is seen["last"]
