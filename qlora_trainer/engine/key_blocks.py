"""A chunk of queries attending to the keys before it one block of keys at a time, for engine/chunked_attention.py's
layer backward: each block's key and value gradients are added straight into the whole sequence's fp32 sums.

Whole, the attention kernel's backward returns the gradients of every key and value the chunk sees: for the last
chunk of a long sequence, the whole sequence's, and with grouped heads as wide as the queries (the flash kernel
expands them). A block at a time nothing wider than a block exists. It stays exact because a softmax row splits:
each block's kernel gives its output and log-sum-exp; the row's log-sum-exp is theirs combined and its output their
outputs weighted by exp(block's - row's), merged block by block as they come. The flash kernel's backward, given a
block of keys with the row's output and log-sum-exp, gives exactly that block's key and value gradients and its share
of the queries' gradient.

Rows are plain causal rows (no mask, not packed) and blocks are the chunks themselves: a chunk's own block is causal
(square), the blocks before it are seen whole. No dropout (the layer backward in chunks never has any).

The keys and values come from a function of a block's token range: slices of the row's, or, where the run
recomputes them (training.recompute_keys), each block's made from the layer's input as it is used, so that no
tensor of the whole row's keys exists (in the chunk's forward and again in its backward).
"""

from typing import Callable

import torch

# the attention kernels with a log-sum-exp, (batch, heads, tokens, head_dim) in and out
_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_CUDA = torch.ops.aten._scaled_dot_product_flash_attention
_CUDA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward


def _widened(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, kv_heads, head_dim) -> (batch, heads, tokens, head_dim), grouped heads repeated."""
    tensor = tensor.transpose(1, 2)
    groups = heads // tensor.shape[1]
    return tensor.repeat_interleave(groups, dim=1) if groups > 1 else tensor


def _narrowed(gradient: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of _widened's output back to (batch, tokens, kv_heads, head_dim), summed over each group."""
    batch, heads, tokens, dim = gradient.shape
    if heads != kv_heads:
        gradient = gradient.view(batch, kv_heads, heads // kv_heads, tokens, dim).sum(2)
    return gradient.transpose(1, 2)


def _forward(query, key, value, causal: bool, scale: float):
    """The block's output and log-sum-exp, and on CUDA what else the kernel returned that its backward takes (the
    rows' cumulative lengths and the dropout's seed and offset: for plain rows without dropout, the same for every
    block), passed back as the kernel gave them."""
    if query.is_cuda:
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = _CUDA(query, key, value, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, seed, offset)
    out, lse = _CPU(query, key, value, 0.0, causal, scale=scale)
    return out, lse, None


def _backward(grad, query, key, value, out, lse, causal: bool, scale: float, extras):
    if query.is_cuda:
        cum_q, cum_k, seed, offset = extras
        return _CUDA_BACKWARD(grad, query, key, value, out, lse, cum_q, cum_k, query.shape[2], key.shape[2], 0.0,
                              causal, seed, offset, scale=scale)
    return _CPU_BACKWARD(grad, query, key, value, out, lse, 0.0, causal, scale=scale)


def blocks_of(start: int, end: int, block: int) -> list[tuple[int, int, bool]]:
    """The key blocks queries [start, end) see, as (first key, end, causal): those before `start`, `block` keys
    each, seen whole, then the chunk's own keys, causal."""
    return [(b, min(b + block, start), False) for b in range(0, start, block)] + [(start, end, True)]


KeysValues = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def sliced(keys: torch.Tensor, values: torch.Tensor) -> KeysValues:
    """The key_values of KeyBlockAttention for a row's keys and values held whole."""
    return lambda first, last: (keys[:, first:last], values[:, first:last])


class KeyBlockAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for queries [start, end) of a plain causal row, `key_values(first, last)` giving
    the row's keys and values [first, last) (batch, tokens, kv_heads, head_dim), not differentiated: backward adds
    their gradients into `grad_keys` and `grad_values` (fp32, the row's keys' shape) block by block and returns the
    queries'."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key_values: KeysValues, grad_keys: torch.Tensor,
                grad_values: torch.Tensor, start: int, block: int, scale: float) -> torch.Tensor:
        heads, end = query.shape[1], start + query.shape[2]
        out, lse = None, None  # the blocks so far, merged as each comes (one chunk-sized fp32 output at a time)
        for first, last, causal in blocks_of(start, end, block):
            keys, values = key_values(first, last)
            block_out, block_lse, extras = _forward(query, _widened(keys, heads), _widened(values, heads), causal,
                                                    scale)
            del keys, values
            if out is None:
                out, lse = block_out.float(), block_lse
                continue
            merged = torch.logaddexp(lse, block_lse)
            out = (out * torch.exp(lse - merged).unsqueeze(-1)
                   + block_out.float() * torch.exp(block_lse - merged).unsqueeze(-1))
            lse = merged
        out = out.to(query.dtype)
        ctx.save_for_backward(query, out, lse)
        ctx.key_values, ctx.grad_keys, ctx.grad_values = key_values, grad_keys, grad_values
        ctx.start, ctx.block, ctx.scale, ctx.extras = start, block, scale, extras
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, out, lse = ctx.saved_tensors
        heads, kv_heads = query.shape[1], ctx.grad_keys.shape[2]
        grad_out = grad_out.contiguous()
        grad_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        for first, last, causal in blocks_of(ctx.start, ctx.start + query.shape[2], ctx.block):
            keys, values = ctx.key_values(first, last)
            key, value = _widened(keys, heads), _widened(values, heads)
            del keys, values
            grad_q, grad_k, grad_v = _backward(grad_out, query, key, value, out, lse, causal, ctx.scale, ctx.extras)
            del key, value
            grad_query += grad_q
            ctx.grad_keys[:, first:last] += _narrowed(grad_k, kv_heads)
            ctx.grad_values[:, first:last] += _narrowed(grad_v, kv_heads)
        ctx.key_values = None
        return grad_query.to(query.dtype), None, None, None, None, None, None
