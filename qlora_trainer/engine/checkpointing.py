"""Checkpointed decoder layers (our reentrant checkpoint), their inputs kept on the GPU or in pinned CPU memory.

Gradient checkpointing keeps one tensor per layer on the GPU, the layer's input (layers x tokens x hidden x 2 bytes:
4 GiB for a 7B model at 16k tokens). With offloading, that input is copied to pinned host memory during the
forward and copied back when backward reaches the layer, which then recomputes its activations as usual. It is
a reentrant checkpoint: the layer runs without autograd in the forward and again, with autograd, inside this
function's backward, under the forward's autocast and RNG state so that dropout masks match.

Offloading is the default on GPUs (training.offload_checkpoints; nothing is offloaded on the CPU). Without it, this
is still our checkpoint: its no-grad forward skips the saved-tensor hooks that torch's non-reentrant checkpoint runs
for every tensor. With compiled layers on an H100 (Llama-2-7B, seq 2048) the offloaded reentrant path beat torch's
non-reentrant checkpoint in two of three same-run comparisons and lost one
(benchmarks/results/vs-reference-h100/development-2026-11-23.jsonl); it also wraps the layer from outside, which
keeps the checkpoint out of torch.compile's graphs on every transformers version (`_CheckpointedLayer` below).
"""

import weakref
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_trainer.engine.class_mixing import mixed_class


class _HostCopies:
    """The offloaded inputs' copies between GPU and pinned host memory, on one side CUDA stream per device so that
    they overlap the layers' compute: the forward's copy out runs while the next layers compute, and when backward
    reaches a layer, the input of the layer before it (in forward order) is copied back while this one recomputes
    (`prefetch`; it holds one more input on the GPU, so runs with chunked MLPs, at the edge of their memory, copy each
    input back when its layer needs it: spec/resolve.py `prefetch_checkpoints`).

    Copies on the compute stream instead made a Llama-2-7B step at seq 2048 14% slower on an H100 than keeping the
    inputs on the GPU (benchmarks/results/defaults-h100/llama-2-7b-s2048-2026-12-06.jsonl): the layers waited for
    them. GPU memory of a copied-back input is taken on the compute stream, so the allocator's order is the
    compute stream's; a layer's input on the GPU is kept from reuse until its copy out is done (record_stream).
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[weakref.ReferenceType] = []  # offloaded checkpoints' contexts, in forward order

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def copy_out(self, ctx, hidden_states: torch.Tensor) -> None:
        """Start copying `hidden_states` to pinned host memory (ctx.stored); `ctx` waits in line for backward."""
        stream = self._stream(hidden_states.device)
        stream.wait_stream(torch.cuda.current_stream(hidden_states.device))
        with torch.cuda.stream(stream):
            ctx.stored = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=True)
            ctx.stored.copy_(hidden_states, non_blocking=True)
        hidden_states.record_stream(stream)
        ctx.on_gpu, ctx.copied_back = None, None
        self._pending = [ref for ref in self._pending if ref() is not None and ref().stored is not None]
        self._pending.append(weakref.ref(ctx))

    def _copy_back(self, ctx) -> None:
        if ctx.on_gpu is not None or ctx.stored is None:
            return
        compute = torch.cuda.current_stream(ctx.device)
        ctx.on_gpu = torch.empty(ctx.stored.shape, dtype=ctx.stored.dtype, device=ctx.device)
        stream = self._stream(ctx.device)
        stream.wait_stream(compute)  # the memory taken above is free on the compute stream from here on
        with torch.cuda.stream(stream):
            ctx.on_gpu.copy_(ctx.stored, non_blocking=True)
            ctx.copied_back = torch.cuda.Event()
            ctx.copied_back.record(stream)

    def take_back(self, ctx, prefetch: bool) -> torch.Tensor:
        """`ctx`'s input on the GPU, once copied; with `prefetch`, the copy of the input before it is started."""
        self._copy_back(ctx)
        torch.cuda.current_stream(ctx.device).wait_event(ctx.copied_back)
        hidden_states = ctx.on_gpu
        ctx.on_gpu = ctx.copied_back = None
        contexts = [ref() for ref in self._pending]
        self._pending = [ref for ref, other in zip(self._pending, contexts) if other is not None and other is not ctx]
        earlier = [other for other in contexts[:contexts.index(ctx)] if other is not None] if ctx in contexts else []
        if earlier and prefetch:
            self._copy_back(earlier[-1])
        return hidden_states


_HOST_COPIES = _HostCopies()

# An empty leaf that requires grad, passed to every checkpoint so that its output requires grad even where the
# layer's input does not (the first layer's, from frozen embeddings) and its backward still gives the layer's
# adapter its gradients. The usual way, making the embeddings' output require grad (enable_input_require_grads),
# keeps that output alive on the GPU through the whole backward (autograd's accumulator of a leaf holds it; an
# offloaded checkpoint's input is otherwise only in host memory) and stores a gradient for it that nothing reads.
_NEEDS_GRAD = torch.empty(0, requires_grad=True)


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function: Callable, offload: bool, prefetch: bool, hidden_states: torch.Tensor,
                needs_grad: torch.Tensor, backward_function: Optional[Callable] = None):
        ctx.run_function, ctx.backward_function = run_function, backward_function
        ctx.device = hidden_states.device
        ctx.autocast = (torch.is_autocast_enabled(ctx.device.type), torch.get_autocast_dtype(ctx.device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        ctx.offloaded, ctx.prefetch = offload and ctx.device.type == "cuda", prefetch
        if ctx.offloaded:
            _HOST_COPIES.copy_out(ctx, hidden_states)
        else:
            ctx.stored = hidden_states.detach()
        with torch.no_grad():  # detached: every layer's no-grad forward sees the same kind of input (one graph)
            return run_function(hidden_states.detach())

    @staticmethod
    def backward(ctx, *grad_outputs):
        stored = _HOST_COPIES.take_back(ctx, ctx.prefetch) if ctx.offloaded else ctx.stored
        # the recomputed input requires grad whatever the forward's did, so a compiled layer sees one kind of input
        # (one graph); its gradient is returned only where the input needs one
        input_needs_grad = ctx.needs_input_grad[3]
        hidden_states = stored.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        if ctx.backward_function is not None and len(grad_outputs) == 1:  # the layer's own chunked backward
            with torch.random.fork_rng(devices=devices), torch.autocast(ctx.device.type, dtype=dtype,
                                                                           enabled=enabled):
                grad = ctx.backward_function(stored.detach(), grad_outputs[0])
            if grad is not None:
                ctx.stored = None
                return None, None, None, grad if input_needs_grad else None, None, None
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.run_function(hidden_states)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.stored = None
        return None, None, None, hidden_states.grad if input_needs_grad else None, None, None


def layer_checkpoint(function: Callable, hidden_states: torch.Tensor, offload: bool = False,
                     prefetch: bool = False, backward_function: Optional[Callable] = None) -> torch.Tensor:
    """`function(hidden_states)`, checkpointed; its input kept in pinned CPU memory when `offload` (and, with
    `prefetch`, the input before it copied back while this layer's backward runs). `backward_function(input,
    output's gradient)`, where given, takes the backward instead of recomputing `function` whole (the input's
    gradient, or None to recompute after all)."""
    return _LayerCheckpoint.apply(function, offload, prefetch, hidden_states, _NEEDS_GRAD, backward_function)


class _CheckpointedLayer:
    """Mixed into a decoder layer's class: its call runs under `layer_checkpoint` above.

    The checkpoint wraps the module call from outside, so a compiled layer (compiled_layers.py) compiles the
    layer alone, whichever way the installed transformers hooks its own checkpointing in.
    """

    offload_checkpoint: bool
    prefetch_checkpoint: bool

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return nn.Module.__call__(self, hidden_states, *args, **kwargs)
        run = partial(_call_module, self, args=args, kwargs=kwargs)
        in_chunks = getattr(self, "backward_in_chunks", None)  # engine/chunked_attention.py
        backward = partial(in_chunks, args=args, kwargs=kwargs) if in_chunks is not None else None
        return layer_checkpoint(run, hidden_states, self.offload_checkpoint, self.prefetch_checkpoint, backward)


def _call_module(module: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    return nn.Module.__call__(module, hidden_states, *args, **kwargs)


def enable_activation_checkpointing(model: nn.Module, checkpointed_layers: Optional[int] = None,
                                    offload: bool = False, prefetch: bool = False) -> None:
    """Checkpointing of the first `checkpointed_layers` decoder layers (None = all of them) with our
    reentrant checkpoint (above), their inputs kept in pinned CPU memory when `offload`, copied back one layer
    ahead of backward when `prefetch`.

    The last layers are the ones left out: backward reaches them first, so their kept activations are freed
    before any checkpointed layer recomputes its own. transformers' own checkpointing stays off.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = False
        if checkpointed_layers is None or index < checkpointed_layers:
            layer.__class__ = mixed_class(_CheckpointedLayer, type(layer))
            layer.offload_checkpoint, layer.prefetch_checkpoint = offload, prefetch


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether `enable_activation_checkpointing` checkpointed this decoder layer."""
    return isinstance(layer, _CheckpointedLayer)
