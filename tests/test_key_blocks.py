"""engine/key_blocks.py: a chunk of queries over blocks of keys gives the attention kernel's output and gradients,
the keys' and values' added into fp32 sums; nothing as wide as the keys the chunk sees is made."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from qlora_trainer.engine.key_blocks import KeyBlockAttention, blocks_of, sliced


def test_blocks_cover_the_keys_a_chunk_sees_once():
    assert blocks_of(0, 5, 4) == [(0, 5, True)]
    assert blocks_of(8, 11, 4) == [(0, 4, False), (4, 8, False), (8, 11, True)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("start,end", [(0, 16), (32, 48), (48, 53)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_key_blocks_give_the_kernels_output_and_gradients(kv_heads, start, end, dtype, device):
    """Queries [start, end) of a 53-token row, 16-key blocks, against SDPA over keys [0, end) (bottom-right causal),
    on the CPU's kernels and on a GPU's flash kernel (bf16 only there). fp32: equal to rounding (1e-5 relative);
    bf16: both round every product to 2^-8 relative and sum blocks in a different order, so within four roundings
    of the gradients' norm. The GPU cases passed on an H100 on 2026-12-06 (benchmarks/results/defaults-h100/)."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the flash kernel takes 16-bit inputs")
    generator = torch.Generator().manual_seed(start)
    heads, dim, tokens, scale = 4, 64 if device == "cuda" else 16, 53, 0.25
    query = torch.randn(1, heads, end - start, dim, generator=generator).to(device, dtype)
    keys = torch.randn(1, tokens, kv_heads, dim, generator=generator).to(device, dtype)
    values = torch.randn(1, tokens, kv_heads, dim, generator=generator).to(device, dtype)
    grad_out = torch.randn(1, heads, end - start, dim, generator=generator).to(device, dtype)

    leaf_q = query.clone().requires_grad_(True)
    seen_k = keys[:, :end].clone().requires_grad_(True)
    seen_v = values[:, :end].clone().requires_grad_(True)
    want = F.scaled_dot_product_attention(leaf_q, seen_k.transpose(1, 2), seen_v.transpose(1, 2),
                                          attn_mask=causal_lower_right(end - start, end), scale=scale,
                                          enable_gqa=heads != kv_heads)
    want.backward(grad_out)

    q = query.clone().requires_grad_(True)
    grad_keys = torch.zeros(keys.shape, dtype=torch.float32, device=device)
    grad_values = torch.zeros(values.shape, dtype=torch.float32, device=device)
    got = KeyBlockAttention.apply(q, sliced(keys, values), grad_keys, grad_values, start, 16, scale)
    got.backward(grad_out)

    tolerance = 1e-5 if dtype == torch.float32 else 4 * 2**-8
    pairs = {"output": (got, want), "query": (q.grad, leaf_q.grad), "keys": (grad_keys[:, :end], seen_k.grad),
             "values": (grad_values[:, :end], seen_v.grad)}
    for name, (g, w) in pairs.items():
        error = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert error < tolerance, (name, error)
    assert not grad_keys[:, end:].any() and not grad_values[:, end:].any()  # keys after the chunk are not seen
