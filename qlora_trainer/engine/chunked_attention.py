"""Decoder attention, and a checkpointed layer's whole backward, over long sequences a chunk of queries at a time.

At long sequences the largest thing a layer's backward holds is its attention's: the normed input, the queries,
keys, values and attention output, their gradients, and the attention kernel's fp32 accumulator for the queries'
gradient, each for every token (benchmarks/results/defaults-h100/README.md: about 145 KB per token of a Llama-2-7B
step at its peak). Here the attention module keeps only its input. Its forward computes the keys and values a chunk
of tokens at a time, then the queries, attention and output projection a chunk at a time; its backward recomputes
the same way, one chunk of queries after another, last to first, each against the keys and values of the tokens up
to the chunk's end, and sums their gradients in fp32. Whole-sequence tensors left in its backward: the input and its
gradient, the keys and values and their fp32 gradients. Causal attention makes the chunks exact: a query sees no key
after it.

Each chunk's random state (LoRA dropout) is recorded in the forward and set again when it is recomputed. Rows may be
packed (torch's variable-length kernel on the GPU, engine/packed_attention.py: each chunk's queries see their own
example's keys), carry transformers' 4D mask (sliced per chunk), or be plain causal rows.

Attention alone still leaves the rest of the layer whole in backward (the norms, the residual, the MLP's input, the
gradients between them). So under our layer checkpoint (engine/checkpointing.py), where the run has no adapter
dropout (ResolvedRun.layer_backward_chunked), the layer's whole backward goes a chunk of queries at a time
(`_LayerBackwardInChunks`): keys and values recomputed whole without autograd, then for each chunk, last first, the
layer recomputed and differentiated from its input's chunk to its output's, then the keys' and values' projections
chunk by chunk. What stays whole: the layer's input, its output's gradient (overwritten chunk by chunk with the
input's, which a chunk's backward no longer needs), the keys and values and their fp32 gradients. On plain causal
rows a chunk's attention takes the keys a block at a time (engine/key_blocks.py), so no gradient as wide as the keys
it sees is made; rows with a mask or packed rows take them all at once. The planner
counts it (planner/memory.py `layer_backward_in_chunks_bytes`): on an H100 its longest Llama-2-7B sequence under a
15 GiB cap, 110,336 tokens, lay between lengths that trained and did not (benchmarks/results/defaults-h100/).

It applies to the layers and attention modules whose forward it repeats (LAYER_CLASSES: x + attention(norm(x)),
then h + mlp(norm(h)); ATTENTION_CLASSES: projections, rotary embedding, attention, output projection, nothing
else); another class, a sliding window or attention dropout is refused rather than computed differently.
Generation and evaluation (no gradient) go through the module's own forward.
"""

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from qlora_trainer.engine.class_mixing import mixed_class
from qlora_trainer.engine.key_blocks import KeyBlockAttention, KeysValues, sliced
from qlora_trainer.spec.resolve import PACKED_VARLEN
from qlora_trainer.errors import ConfigError

# transformers' attention classes whose forward is exactly q/k/v projections, rotary embedding, attention, o_proj
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


@dataclass(frozen=True)
class _Chunk:
    """Queries [start, end) of the flattened tokens and the keys [key_start, end) they may see; for packed rows,
    the cumulative lengths of the examples' pieces on each side (queries, keys)."""

    start: int
    end: int
    key_start: int
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_q: int = 0
    max_k: int = 0


def plan_chunks(tokens: int, chunk_tokens: int, example_starts: Optional[list[int]] = None) -> list[_Chunk]:
    """The chunks of `tokens` queries. With `example_starts` (cumulative example lengths, 0 first and `tokens`
    last) a chunk's keys begin where the example of its first query begins, and each example the chunk touches is
    one piece: its queries inside the chunk, its keys from the example's start to the end of those queries."""
    chunks = []
    for start in range(0, tokens, chunk_tokens):
        end = min(start + chunk_tokens, tokens)
        if example_starts is None:
            chunks.append(_Chunk(start, end, 0))
            continue
        first = max(i for i, s in enumerate(example_starts[:-1]) if s <= start)
        q_lengths, k_lengths = [], []
        for index in range(first, len(example_starts) - 1):
            begin, finish = example_starts[index], example_starts[index + 1]
            if begin >= end:
                break
            q_lengths.append(min(end, finish) - max(start, begin))
            k_lengths.append(min(end, finish) - begin)
        cu_q = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32)
        chunks.append(_Chunk(start, end, example_starts[first], cu_q, cu_k, max(q_lengths), max(k_lengths)))
    return chunks


def _rotary(module: nn.Module) -> Callable:
    """The module's own model file's apply_rotary_pos_emb."""
    attention_class = next(c for c in type(module).__mro__ if c.__name__ in ATTENTION_CLASSES)
    return sys.modules[attention_class.__module__].apply_rotary_pos_emb


def _keys_values(module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated keys and values of a chunk of tokens, (batch, tokens, kv_heads, head_dim)."""
    shape = (*hidden.shape[:-1], -1, module.head_dim)
    key = module.k_proj(hidden).view(shape)
    value = module.v_proj(hidden).view(shape)
    _, key = _rotary(module)(key, key, cos, sin, unsqueeze_dim=2)
    return key, value


def _queries(module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotated queries of a chunk of tokens, (batch, tokens, heads, head_dim)."""
    query = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)
    query, _ = _rotary(module)(query, query, cos, sin, unsqueeze_dim=2)
    return query


def _attend(module: nn.Module, chunk: _Chunk, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """o_proj(attention(chunk's queries, keys, values)) for the chunk's tokens, (batch, tokens, hidden)."""
    query = _queries(module, hidden, cos, sin)
    heads, kv_heads = query.shape[2], keys.shape[2]
    if chunk.cu_q is not None:  # packed rows: batch 1, the examples' pieces laid end to end
        out = _packed_attention(module, chunk, query[0], keys[0], values[0])[None]
    else:
        q, k, v = (t.transpose(1, 2) for t in (query, keys, values))  # (batch, heads, tokens, head_dim)
        if mask is not None:
            attn_mask = mask[:, :, chunk.start:chunk.end, :chunk.end]
        else:
            attn_mask = causal_lower_right(q.shape[2], k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=module.scaling,
                                             enable_gqa=heads != kv_heads).transpose(1, 2)
    return module.o_proj(out.reshape(*hidden.shape[:-1], -1))


def _attend_in_key_blocks(module: nn.Module, chunk: _Chunk, hidden: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, key_values: KeysValues, grad_keys: torch.Tensor,
                          grad_values: torch.Tensor, block: int) -> torch.Tensor:
    """_attend for a plain causal row, the keys a block at a time (engine/key_blocks.py, `key_values(first, last)`
    giving them): in backward the keys' and values' gradients go straight into `grad_keys` and `grad_values`, a
    block at a time."""
    query = _queries(module, hidden, cos, sin)
    out = KeyBlockAttention.apply(query.transpose(1, 2), key_values, grad_keys, grad_values, chunk.start, block,
                                  module.scaling).transpose(1, 2)
    return module.o_proj(out.reshape(*hidden.shape[:-1], -1))


def _packed_attention(module: nn.Module, chunk: _Chunk, query: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """Causal attention of each example's queries in the chunk to its keys, (tokens, heads, head_dim): torch's
    variable-length flash kernel on a GPU (bottom-right causal: an example's last query sees its last key), the same
    example by example with SDPA elsewhere."""
    heads, kv_heads = query.shape[1], keys.shape[1]
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        grouped = {}
        if kv_heads != heads:
            if "enable_gqa" in inspect.signature(varlen_attn).parameters:  # torch >= 2.13: grouped heads as they are
                grouped = {"enable_gqa": True}
            else:  # as engine/packed_attention.py: as many key/value heads as queries
                keys = keys.repeat_interleave(heads // kv_heads, dim=1)
                values = values.repeat_interleave(heads // kv_heads, dim=1)
        device = query.device
        return varlen_attn(query, keys, values, chunk.cu_q.to(device), chunk.cu_k.to(device), chunk.max_q,
                           chunk.max_k, scale=module.scaling, window_size=(-1, 0), **grouped)
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    pieces = []
    for index in range(len(chunk.cu_q) - 1):
        q = query[chunk.cu_q[index]:chunk.cu_q[index + 1]].transpose(0, 1)
        k = keys[chunk.cu_k[index]:chunk.cu_k[index + 1]].transpose(0, 1)
        v = values[chunk.cu_k[index]:chunk.cu_k[index + 1]].transpose(0, 1)
        mask = causal_lower_right(q.shape[1], k.shape[1])
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=module.scaling).transpose(0, 1))
    return torch.cat(pieces)


class _RandomStates:
    """The CPU's and the device's random state before each chunk, to run it again with the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.states: list[tuple] = []

    def record(self) -> None:
        cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        self.states.append((torch.get_rng_state(), cuda))

    def restore(self, index: int) -> None:
        cpu, cuda = self.states[index]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


def _all_keys_values(module: nn.Module, chunks: list[_Chunk], hidden: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, states: _RandomStates, record: bool):
    pairs = []
    for index, chunk in enumerate(chunks):
        if record:
            states.record()
        else:
            states.restore(index)
        pairs.append(_keys_values(module, hidden[:, chunk.start:chunk.end], cos[:, chunk.start:chunk.end],
                                  sin[:, chunk.start:chunk.end]))
    return torch.cat([k for k, _ in pairs], dim=1), torch.cat([v for _, v in pairs], dim=1)


def _add_keys_values_backward(module: nn.Module, chunks: list[_Chunk], hidden: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, grad_keys: torch.Tensor, grad_values: torch.Tensor,
                              grad_hidden: torch.Tensor, norm: Callable = lambda x: x,
                              states: Optional[_RandomStates] = None) -> None:
    """The keys' and values' projections differentiated chunk by chunk, given their summed fp32 gradients; each
    chunk's input gradient added into `grad_hidden` (`norm`: what the input goes through first; `states`: each
    chunk's random state, set again)."""
    for index, chunk in enumerate(chunks):
        window = slice(chunk.start, chunk.end)
        if states is not None:
            states.restore(index)
        with torch.enable_grad():
            piece = hidden[:, window].detach().requires_grad_(True)
            key, value = _keys_values(module, norm(piece), cos[:, window], sin[:, window])
            torch.autograd.backward([key, value], [grad_keys[:, window].to(key.dtype),
                                                   grad_values[:, window].to(value.dtype)])
        grad_hidden[:, window] += piece.grad


def _chunked_forward(module: nn.Module, chunks: list[_Chunk], hidden: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, mask: Optional[torch.Tensor], states: _RandomStates) -> torch.Tensor:
    """The attention module's output, without autograd: keys and values chunk by chunk, then the queries."""
    with torch.no_grad():
        keys, values = _all_keys_values(module, chunks, hidden, cos, sin, states, record=True)
        outputs = []
        for chunk in chunks:
            states.record()
            window = slice(chunk.start, chunk.end)
            outputs.append(_attend(module, chunk, hidden[:, window], cos[:, window], sin[:, window],
                                   keys[:, chunk.key_start:chunk.end], values[:, chunk.key_start:chunk.end], mask))
        return torch.cat(outputs, dim=1)


class _ChunkedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module: nn.Module, chunks: list[_Chunk], hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: Optional[torch.Tensor], needs_grad: torch.Tensor) -> torch.Tensor:
        ctx.module, ctx.chunks, ctx.mask = module, chunks, mask
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        ctx.states = _RandomStates(hidden.device)
        ctx.save_for_backward(hidden, cos, sin)
        return _chunked_forward(module, chunks, hidden, cos, sin, mask, ctx.states)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, cos, sin = ctx.saved_tensors
        module, chunks, mask = ctx.module, ctx.chunks, ctx.mask
        enabled, dtype = ctx.autocast
        device = hidden.device
        devices = [device] if device.type == "cuda" else []
        grad_hidden = torch.empty_like(hidden)
        with torch.random.fork_rng(devices=devices), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            with torch.no_grad():
                keys, values = _all_keys_values(module, chunks, hidden, cos, sin, ctx.states, record=False)
            grad_keys = torch.zeros(keys.shape, dtype=torch.float32, device=device)
            grad_values = torch.zeros(values.shape, dtype=torch.float32, device=device)
            for index in reversed(range(len(chunks))):  # queries, last chunk first
                chunk, window = chunks[index], slice(chunks[index].start, chunks[index].end)
                ctx.states.restore(len(chunks) + index)
                with torch.enable_grad():
                    piece = hidden[:, window].detach().requires_grad_(True)
                    seen_keys = keys[:, chunk.key_start:chunk.end].detach().requires_grad_(True)
                    seen_values = values[:, chunk.key_start:chunk.end].detach().requires_grad_(True)
                    out = _attend(module, chunk, piece, cos[:, window], sin[:, window], seen_keys, seen_values, mask)
                    torch.autograd.backward(out, grad_output[:, window])
                grad_hidden[:, window] = piece.grad
                grad_keys[:, chunk.key_start:chunk.end] += seen_keys.grad
                grad_values[:, chunk.key_start:chunk.end] += seen_values.grad
                del piece, seen_keys, seen_values, out
            del keys, values
            _add_keys_values_backward(module, chunks, hidden, cos, sin, grad_keys, grad_values, grad_hidden,
                                      states=ctx.states)
        ctx.module = ctx.chunks = ctx.mask = ctx.states = None
        return None, None, grad_hidden, None, None, None, None


# requires grad and holds nothing: the function's output then requires grad even where its input does not (the
# first layer's, without checkpointing), so its backward still gives the projections' adapters their gradients
_NEEDS_GRAD = torch.empty(0, requires_grad=True)


class _ChunkedAttention:
    """Mixed into an attention module's class (chunk_attention below): training forwards longer than one chunk
    run through _ChunkedAttentionFunction."""

    chunk_tokens: int

    @torch._dynamo.disable  # Python-level chunk loop with its own backward: a compiled layer calls it as it is
    def forward(self, hidden_states: torch.Tensor, position_embeddings: Optional[tuple] = None,
                attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if args or cache is not None or not self.training or hidden_states.shape[1] <= self.chunk_tokens:
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        layout = _Layout.of(hidden_states, position_embeddings, attention_mask, kwargs, self.chunk_tokens)
        if torch.is_grad_enabled():
            out = _ChunkedAttentionFunction.apply(self, layout.chunks, layout.flat(hidden_states), layout.cos,
                                                  layout.sin, layout.mask, _NEEDS_GRAD)
        else:  # a checkpointed layer's first pass: chunks bound its transient memory too
            out = _chunked_forward(self, layout.chunks, layout.flat(hidden_states), layout.cos, layout.sin,
                                   layout.mask, _RandomStates(hidden_states.device))
        return out.reshape(hidden_states.shape[0], hidden_states.shape[1], -1), None


@dataclass
class _Layout:
    """How a call's tokens are chunked: packed rows laid end to end as one row (their examples' starts from
    transformers' cumulative lengths), or rows as they are with transformers' 4D mask or none."""

    chunks: list[_Chunk]
    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]
    packed: bool

    @staticmethod
    def of(hidden_states: torch.Tensor, position_embeddings: tuple, attention_mask: Optional[torch.Tensor],
           kwargs: dict, chunk_tokens: int) -> "_Layout":
        batch, seq = hidden_states.shape[:2]
        cos, sin = position_embeddings
        cu_lengths = kwargs.get("cu_seq_lens_q")
        if cu_lengths is not None:  # packed rows: the rows laid end to end, chunked as one
            cos, sin = (t.reshape(1, batch * seq, t.shape[-1]) for t in (cos, sin))
            return _Layout(plan_chunks(batch * seq, chunk_tokens, cu_lengths.tolist()), cos, sin, None, True)
        mask = attention_mask if torch.is_tensor(attention_mask) else None
        if mask is not None and mask.dim() != 4:
            raise ValueError("chunked attention takes transformers' 4D attention mask or none")
        return _Layout(plan_chunks(seq, chunk_tokens), cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), mask,
                       False)

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, seq, width) as the chunks index it."""
        return tensor.reshape(1, -1, tensor.shape[-1]) if self.packed else tensor


# transformers' decoder layers whose forward is exactly x + attention(norm(x)), then h + mlp(norm(h))
LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


class _LayerBackwardInChunks:
    """Mixed into a decoder layer's class (chunk_attention below): under our checkpoint (checkpointing.py) its
    backward recomputes and differentiates the whole layer a chunk of queries at a time, keys and values whole."""

    def backward_in_chunks(self, hidden_states: torch.Tensor, grad_output: torch.Tensor, args: tuple,
                           kwargs: dict) -> Optional[torch.Tensor]:
        """The gradient of the layer's input, the adapters' gradients accumulated; None where the call is not one
        it takes (one chunk, a cache, arguments by position), for the checkpoint's whole recomputation.

        Whole-sequence tensors it holds: the input, the output's gradient (the input's is written in its place,
        chunk by chunk, where that gradient is a tensor of its own), the keys and values and their fp32 gradients,
        and while a chunk's attention runs backward, the gradients of the keys and values that chunk saw (as wide as
        the queries with grouped heads: the flash kernel expands them). The norms, the queries, the attention
        output, the residual and the MLP exist for one chunk at a time."""
        attention = self.self_attn
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        position_embeddings = kwargs.get("position_embeddings")
        if args or cache is not None or position_embeddings is None:
            return None
        if hidden_states.shape[1] <= attention.chunk_tokens:
            return None
        layout = _Layout.of(hidden_states, position_embeddings, kwargs.get("attention_mask"), kwargs,
                            attention.chunk_tokens)
        reuse = _reusable(grad_output, hidden_states)
        hidden, grad_output = layout.flat(hidden_states), layout.flat(grad_output)
        chunks, cos, sin, mask = layout.chunks, layout.cos, layout.sin, layout.mask
        device = hidden.device
        enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)

        def block_keys_values(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Tokens [first, last)'s keys and values, from the layer's input (also where a chunk's backward runs)."""
            window = slice(first, last)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                return _keys_values(attention, self.input_layernorm(hidden[:, window]), cos[:, window],
                                    sin[:, window])

        # plain causal rows: a block of keys at a time (key_blocks.py), so no chunk's key gradients are whole; where
        # the run recomputes them, each block's keys and values are made where they are used, never the row's
        in_blocks = attention.key_blocks and mask is None and not layout.packed
        if in_blocks and attention.recompute_keys:
            keys = values = None
            key_values = block_keys_values
        else:
            pairs = [block_keys_values(c.start, c.end) for c in chunks]
            keys, values = torch.cat([k for k, _ in pairs], dim=1), torch.cat([v for _, v in pairs], dim=1)
            del pairs
            key_values = sliced(keys, values)
        kv_shape = (*hidden.shape[:2], attention.config.num_key_value_heads, attention.head_dim)
        grad_keys = torch.zeros(kv_shape, dtype=torch.float32, device=device)
        grad_values = torch.zeros(kv_shape, dtype=torch.float32, device=device)
        # a chunk's output gradient is read by that chunk's backward alone, so the input's gradient can take its
        # place chunk by chunk (one whole-sequence buffer fewer) where the output's is a tensor of its own
        grad_hidden = grad_output if reuse else torch.empty_like(hidden)
        for chunk in reversed(chunks):  # everything but the keys and values, last chunk first
            window = slice(chunk.start, chunk.end)
            with torch.enable_grad():
                piece = hidden[:, window].detach().requires_grad_(True)
                normed = self.input_layernorm(piece)
                if in_blocks:
                    seen_keys = seen_values = None
                    attended = _attend_in_key_blocks(attention, chunk, normed, cos[:, window], sin[:, window],
                                                     key_values, grad_keys, grad_values, attention.chunk_tokens)
                else:
                    seen_keys = keys[:, chunk.key_start:chunk.end].detach().requires_grad_(True)
                    seen_values = values[:, chunk.key_start:chunk.end].detach().requires_grad_(True)
                    attended = _attend(attention, chunk, normed, cos[:, window], sin[:, window], seen_keys,
                                       seen_values, mask)
                middle = piece + attended
                out = middle + self.mlp(self.post_attention_layernorm(middle))
                torch.autograd.backward(out, grad_output[:, window])
            grad_hidden[:, window] = piece.grad
            if not in_blocks:
                grad_keys[:, chunk.key_start:chunk.end] += seen_keys.grad
                grad_values[:, chunk.key_start:chunk.end] += seen_values.grad
            del piece, normed, attended, seen_keys, seen_values, middle, out
        del keys, values, key_values
        _add_keys_values_backward(attention, chunks, hidden, cos, sin, grad_keys, grad_values, grad_hidden,
                                  norm=self.input_layernorm)
        return grad_hidden.reshape(hidden_states.shape)


def _reusable(grad_output: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether the output's gradient may be overwritten with the input's: a dense tensor of its own (not a view,
    which an expanded or sliced gradient would be) of the input's shape and dtype."""
    return (grad_output._base is None and grad_output.is_contiguous() and grad_output.shape == hidden.shape
            and grad_output.dtype == hidden.dtype)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _decoder_attention(model: nn.Module) -> list[nn.Module]:
    return [getattr(m, "self_attn", None) for m in _decoder_layers(model)]


def check_attention_chunking(model: nn.Module, attention: str) -> None:
    """A ConfigError where the attention implementation is not one chunked attention reproduces (SDPA, eager,
    the packed variable-length kernel: flash-attention-2 finds packed examples by itself, which chunks would not
    see), or a decoder layer's attention is not one whose forward it repeats, or uses a sliding window or attention
    dropout (which it does not apply): refused rather than computed differently."""
    if attention not in ("sdpa", "eager", PACKED_VARLEN):
        raise ConfigError(f"training.attention_chunk_tokens: not with model.attn_implementation {attention}; use "
                          "sdpa, eager or auto, or training.attention_chunk_tokens: 0")
    for layer in _decoder_layers(model):
        if not any(c.__name__ in LAYER_CLASSES for c in type(layer).__mro__):
            raise ConfigError(f"training.attention_chunk_tokens: {type(layer).__name__} layers are not supported "
                              f"(supported: {', '.join(LAYER_CLASSES)}); use 0")
    for module in _decoder_attention(model):
        name = type(module).__name__ if module is not None else "this model's decoder layers have no self_attn: their"
        if name not in ATTENTION_CLASSES:
            raise ConfigError(f"training.attention_chunk_tokens: {name} attention is not supported (supported: "
                              f"{', '.join(ATTENTION_CLASSES)}); use 0")
        window = getattr(module, "sliding_window", None)  # Qwen2: set on the layers that slide
        if window is None and not hasattr(module.config, "use_sliding_window"):  # Mistral: every layer, if set
            window = getattr(module.config, "sliding_window", None)
        if window:
            raise ConfigError(f"training.attention_chunk_tokens: {name} uses a {window}-token sliding window, which "
                              "chunked attention does not apply; use 0")
        if getattr(module, "attention_dropout", 0.0):
            raise ConfigError("training.attention_chunk_tokens: the model has attention dropout; use 0")


def chunk_attention(model: nn.Module, chunk_tokens: int, whole_layers: bool = True,
                    key_blocks: bool = True, recompute_keys: bool = False) -> int:
    """Give every decoder layer's `self_attn` the chunked forward (after check_attention_chunking) and, with
    `whole_layers` (the resolved run's `layer_backward_chunked`), every layer the chunked backward its checkpoint
    takes, plain rows' keys a block at a time there with `key_blocks` (`ResolvedRun.key_blocks`: where the flash
    kernel's ops run), each block's keys and values made where they are used with `recompute_keys` (the resolved
    run's `keys_recomputed`); returns how many attention modules were chunked."""
    check_attention_chunking(model, model.config._attn_implementation)
    layers = _decoder_layers(model) if whole_layers else []
    # dropout masks drawn a chunk at a time would not be the forward's (ResolvedRun.layer_backward_chunked leaves
    # such runs out; this is its guard): such a layer recomputes whole, its attention alone in chunks
    # (_ChunkedAttentionFunction restores each chunk's random state)
    if any(isinstance(m, nn.Dropout) and m.p > 0 for layer in layers for m in layer.modules()):
        raise ValueError("a decoder layer with dropout cannot take its backward in chunks")
    modules = _decoder_attention(model)
    for module in modules:
        module.__class__ = mixed_class(_ChunkedAttention, type(module))
        module.chunk_tokens, module.key_blocks, module.recompute_keys = chunk_tokens, key_blocks, recompute_keys
    for layer in layers:
        layer.__class__ = mixed_class(_LayerBackwardInChunks, type(layer))
    return len(modules)
