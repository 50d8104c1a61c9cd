"""Peak GPU memory of one training step of our trainer, component by component: a pure function of (model shape,
resolved run).

Every choice is read from the run's spec (`run.spec`: adapter.r, training.max_seq_len, quantization.mode, ...) and
from what resolving it for the hardware decided (`run.compute_dtype`, `run.compile_layers`, `run.fused_loss`).

No weights and no torch.cuda calls: shapes come from the model built on the meta device. What is stored
(base weights, adapters, gradients, optimizer states) is counted tensor by tensor exactly as bitsandbytes,
peft and torch allocate it, each rounded up to the CUDA caching allocator's 512-byte blocks. Activations
follow what autograd keeps for our forward (checked tensor by tensor on the CPU, see tests/test_planner_memory.py);
the few constants that only a GPU can tell are in `Calibration`.

bitsandbytes 0.50 storage of one quantized nn.Linear of n = d_in x d_out weights (d_out rows):
  4-bit (nf4 / fp4), blocks of 64 (Params4bit blocksize, nn/modules.py:231):
    packed codes          ceil(n / 2) uint8        (backends/cuda/ops.py:392, two codes per byte)
    quant_state.code      16 fp32                  (functional.get_4bit_type, a fresh tensor per layer)
    without double quant: absmax fp32 per block    (ceil(n / 64))
    with double quant (functional.py:939-940: absmax - mean, quantize_blockwise(blocksize=256)):
      absmax              ceil(n / 64) uint8
      offset              1 fp32 (the mean)
      state2.absmax       ceil(ceil(n / 64) / 256) fp32
      state2.code         256 fp32                 (functional.py:677, `code.to(device, copy=True)` per layer)
  8-bit (LLM.int8): int8 weight n bytes + SCB fp32 per output row (Int8Params._quantize, nn/modules.py:743).
  The bias stays a plain parameter in the compute dtype.
On the CPU, a 4-bit layer that runs a no-grad forward in eval mode on a CPU with AVX512-BF16 is repacked for
the CPU kernel (Linear4bit.forward, nn/modules.py:612-619, support flag from nn/modules.py:573): the
double-quantized absmax is expanded back into a bf16 absmax and `quant_state.nested` becomes False
(functional._convert_weight_packed_for_cpu, functional.py:1709-1726). That never happens on a GPU, nor on the
CPU while training; the layout above is what a GPU holds.
"""

import math
from dataclasses import dataclass, field
from typing import Union

from peft.tuners.lokr.layer import factorization
from transformers import PretrainedConfig

from qlora_trainer.planner.shapes import LinearShape, ModelShape, model_shape
from qlora_trainer.spec.resolve import CUDA_CONTEXT_BYTES, PACKED_VARLEN, ResolvedRun

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every block up to 512 bytes (CUDACachingAllocator kMinBlockSize)
NF4_BLOCK = 64  # Params4bit blocksize
NESTED_BLOCK = 256  # double quantization of the absmax: quantize_blockwise(blocksize=256)
OPTIM8_BLOCK = 256  # 8-bit optimizer state blocks (Optimizer2State.init_state, optim/optimizer.py:524)
OPTIM8_MIN_NUMEL = 4096  # smaller tensors keep fp32 states in 8-bit optimizers (min_8bit_size default)
PAGED_MIN_NUMEL = 100_000  # smaller states are not paged (Optimizer8bit.get_state_buffer, optim/optimizer.py:383)


@dataclass(frozen=True)
class Calibration:
    """Every constant of the estimate that only a GPU measurement can set; nothing else in the planner is a guess.

    Each is global (one value for all models and runs), never fitted per configuration. The CUDA context and the
    safety margin, which decide what a budget leaves PyTorch, are in spec/resolve.py (`Budget`).
    """

    # from measurement: benchmarks/results/planner-accuracy-h100.md: reserved - allocated at the peak. The
    # caching allocator keeps what the optimizer step's temporaries took (torch's foreach AdamW: one tensor per
    # parameter, an adapter's bytes; bitsandbytes' 8-bit steps make none: the grid's six 8-bit rows were
    # predicted +2.1% on average with an adapter's bytes counted for them too, +0.1% without) and a few
    # dequantization buffers of the largest base weight, plus small-pool segments.
    # Set once for the whole grid (3 models), never per row; cli.py sets expandable_segments.
    allocator_step_factor: float = 1.0
    allocator_weight_buffers: float = 3.0
    allocator_overhead_bytes: int = 64 * 2**20
    # counted from the chunk's backward in engine/loss.py (fp32 log-softmax output + its fp32 gradient + the fp32
    # gradient of the logits); the grid's rows that peak at the loss agree within 3% (planner-accuracy-h100.md)
    loss_bytes_per_logit: float = 12.0
    # from measurement: benchmarks/results/planner-accuracy-h100.md (counting the SwiGLU backward gives up to 3;
    # the grid's peaks, which grow with tokens, fit 1.5 across all three models): gradient buffers alive while
    # one decoder layer runs backward, in units of the layer's widest activation (compute dtype, per token)
    backward_gradient_widths: float = 1.5


CALIBRATION = Calibration()

# The model's final norm (RMSNorm: its input upcast to fp32), run whole and eagerly, at the peak of its backward:
# bytes per element of the hidden states. From autograd's formulas, at pow's backward: the saved fp32 input, the
# gradient through the scale, the mean's gradient expanded and pow's three temporaries, all fp32 (the gradient it was
# given and its bf16 copies are freed by then). On an H100 the Llama-3-8B probes of the layer backward in chunks
# agree (a first step, no optimizer state: 91,136 tokens trained, 95,232 did not, which puts it near 23.6 bytes)
FINAL_NORM_BACKWARD_BYTES = 24


@dataclass(frozen=True)
class PhaseBytes:
    """What one phase of the step holds at its own peak beyond the stored weights, adapter and optimizer states."""

    activations: int  # saved tensors, recomputed ones, backward buffers, the dequantized weight in use
    logits: int  # the loss chunk's logits and their gradients
    gradients: int  # the trainable gradients alive then
    step_temporaries: int  # the optimizer step's own temporaries


@dataclass(frozen=True)
class MemoryEstimate:
    breakdown: dict[str, int]  # component -> bytes at the predicted peak; sums to predicted_peak_bytes
    predicted_peak_allocated_bytes: int  # what torch.cuda.max_memory_allocated() will read
    predicted_peak_bytes: int  # what torch.cuda.max_memory_reserved() will read
    cuda_context_bytes: int  # outside PyTorch's pool, on the card all the same (spec/resolve.py)
    paged_optimizer_bytes: int  # paged 8-bit states in unified memory, outside PyTorch's pool; evictable to CPU RAM
    trainable_params: int
    total_params: int  # base + adapter
    target_layers: int
    phase: str  # where the peak happens: "layer backward", "loss" or "optimizer step"
    # every phase's own bytes, the peak's and the others (for estimates that shard or move some of them, such as
    # planner/distributed.py's per-GPU estimates of multi-GPU runs)
    phases: dict[str, PhaseBytes] = field(default_factory=dict)
    pinned_host_bytes: int = 0  # offloaded checkpoint inputs in pinned host memory (offloaded_input_bytes)

    @property
    def predicted_device_bytes(self) -> int:
        """What the card must hold: PyTorch's pool plus the CUDA context (paged states can move out)."""
        return self.predicted_peak_bytes + self.cuda_context_bytes


def fused_loss_chunk_bytes(tokens: int, hidden: int, vocab: int, compute_bytes: int) -> int:
    """The logits of one chunk of Liger-Kernel's fused linear cross-entropy (ops/fused_linear_cross_entropy.py,
    liger-kernel 0.8: chunks of next_power_of_2(ceil(tokens / ceil(vocab / hidden))) rows, at most `tokens`, in the
    compute dtype; the kernel writes the logits' gradient over them in place). Its other buffers, the gradient of
    its input and a loss per token, are the gathered hidden states' gradient the loss phase counts anyway."""
    rows = min(1 << (math.ceil(tokens / math.ceil(vocab / hidden)) - 1).bit_length(), tokens)
    return rows * vocab * compute_bytes + 4 * tokens


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator takes for a tensor of `nbytes`."""
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def quantized_weight_tensor_bytes(d_in: int, d_out: int, quant: str, double_quant: bool) -> tuple[int, ...]:
    """Bytes of each tensor bitsandbytes keeps for one quantized d_in -> d_out weight (layout in the docstring)."""
    n = d_in * d_out
    if quant in ("nf4", "fp4"):
        blocks = -(-n // NF4_BLOCK)
        common = ((n + 1) // 2, 16 * 4)  # packed codes, quant_state.code
        if not double_quant:
            return common + (blocks * 4,)
        return common + (blocks, 4, -(-blocks // NESTED_BLOCK) * 4, 256 * 4)
    if quant == "int8":
        return (n, d_out * 4)
    raise ValueError(f"not a quantized mode: {quant}")


def base_weight_tensor_bytes(shape: ModelShape, run: ResolvedRun) -> list[int]:
    """Bytes of every tensor of the loaded base: quantized linears, the other parameters and the buffers."""
    compute = DTYPE_BYTES[run.compute_dtype]
    other = 4 if run.spec.model.upcast_non_quantized else compute
    quant, double_quant = run.spec.quantization.mode, run.spec.quantization.double_quant
    sizes = []
    for linear in shape.linears:
        if quant == "none":
            sizes.append(linear.d_in * linear.d_out * other)
        else:
            sizes.extend(quantized_weight_tensor_bytes(linear.d_in, linear.d_out, quant, double_quant))
    sizes.extend(n * other for n in shape.other_param_numels)
    sizes.extend(shape.buffer_bytes)
    return sizes


def adapter_tensor_shapes(adapter_type: str, r: int, d_in: int, d_out: int, use_dora: bool = False
                          ) -> tuple[tuple[int, ...], ...]:
    """Shapes of the trainable tensors one adapter adds to a d_in -> d_out layer, as peft creates them (the
    optimizer keeps state per tensor, and FSDP shards each one on its first dimension)."""
    if adapter_type == "lora":  # lora_A (r x d_in), lora_B (d_out x r) [, DoRA magnitude (d_out)]
        return ((r, d_in), (d_out, r)) + (((d_out,),) if use_dora else ())
    if adapter_type == "loha":  # hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b
        return ((d_out, r), (r, d_in)) * 2
    if adapter_type == "lokr":  # lokr_w1 (out_l x in_m) and lokr_w2, low-rank when r < max(out_k, in_n) / 2
        in_m, in_n = factorization(d_in, -1)
        out_l, out_k = factorization(d_out, -1)
        w2 = ((out_k, r), (r, in_n)) if r < max(out_k, in_n) / 2 else ((out_k, in_n),)
        return ((out_l, in_m),) + w2
    raise ValueError(f"unknown adapter type: {adapter_type}")


def adapter_tensor_numels(adapter_type: str, r: int, d_in: int, d_out: int, use_dora: bool = False
                          ) -> tuple[int, ...]:
    """Element counts of the trainable tensors one adapter adds to a d_in -> d_out layer (`adapter_tensor_shapes`)."""
    return tuple(math.prod(shape) for shape in adapter_tensor_shapes(adapter_type, r, d_in, d_out, use_dora))


@dataclass(frozen=True)
class OptimizerStates:
    pooled: tuple[int, ...]  # bytes of each state tensor in PyTorch's pool
    paged: tuple[int, ...]  # bytes of each paged state tensor (unified memory, outside the pool)
    step_temporaries: tuple[int, ...]  # bytes of each tensor the step itself allocates and frees


def optimizer_state_tensors(optimizer: str, numels: list[int], param_bytes: int, fused: bool) -> OptimizerStates:
    """The optimizer's state tensors for trainable tensors of `numels` elements, as the optimizer allocates them
    (`fused`: torch's fused AdamW, ResolvedRun.fused_optimizer)."""
    if optimizer == "adamw":
        # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype. Fused: `step` is a float32
        # scalar on the parameter's device and the step allocates nothing; elsewhere `step` stays on the CPU and
        # the foreach step makes one temporary per parameter (the sqrt of exp_avg_sq)
        per_param = tuple(n * param_bytes for n in numels)
        if fused:
            return OptimizerStates(per_param * 2 + (4,) * len(numels), (), ())
        return OptimizerStates(per_param * 2, (), per_param)
    pooled, paged = [256 * 4, 256 * 4], []  # the signed and unsigned quantile maps, once per optimizer
    for n in numels:
        if n < OPTIM8_MIN_NUMEL:
            pooled += [n * 4, n * 4]
            continue
        pooled += [-(-n // OPTIM8_BLOCK) * 4] * 2  # fp32 absmax per block of each state
        states = paged if optimizer == "paged_adamw8bit" and n >= PAGED_MIN_NUMEL else pooled
        states += [n, n]  # two uint8 states
    return OptimizerStates(tuple(pooled), tuple(paged), ())


def checkpointed_layer_count(shape: ModelShape, run: ResolvedRun) -> int:
    """How many decoder layers (the first ones) recompute their activations in backward."""
    training = run.spec.training
    if not training.gradient_checkpointing:
        return 0
    if training.checkpointed_layers is None:
        return shape.num_layers
    return min(training.checkpointed_layers, shape.num_layers)


def offloaded_input_bytes(shape: ModelShape, run: ResolvedRun) -> int:
    """Pinned host bytes of one process's checkpointed layer inputs when training.offload_checkpoints moves them
    there (engine/checkpointing.py, GPUs only: each checkpointed layer's input, micro-batch x seq x hidden in the
    compute dtype)."""
    training = run.spec.training
    if not training.offload_checkpoints or run.device_type != "cuda":
        return 0
    tokens = training.micro_batch_size * training.max_seq_len
    return checkpointed_layer_count(shape, run) * tokens * shape.hidden_size * DTYPE_BYTES[run.compute_dtype]


def sdpa_gets_mask(shape: ModelShape, run: ResolvedRun, layer_index: int) -> bool:
    """Whether transformers hands SDPA an explicit mask for this layer rather than `is_causal`: with padding in
    the batch (micro-batch > 1), with packed rows (the block-diagonal mask that keeps their examples apart,
    engine/loss.py), or in a sliding-window layer once the sequence reaches the window
    (masking_utils._ignore_causal_mask_sdpa)."""
    spec = run.spec
    if run.attention != "sdpa":
        return False
    masked_rows = spec.training.micro_batch_size > 1 or spec.data.packing
    windowed = layer_index in shape.sliding_layers and spec.training.max_seq_len >= shape.sliding_window
    return masked_rows or windowed


def _attention_bytes_per_token(shape: ModelShape, attn_implementation: str, seq_len: int, compute: int,
                               masked: bool) -> int:
    """What autograd keeps of one attention block per token, beyond its norm and its linears' inputs."""
    q, kv, heads = shape.q_dim, shape.kv_dim, shape.num_heads
    if attn_implementation == "eager":
        # query and the repeated keys/values (repeat_kv), fp32 softmax output and bf16 probabilities
        return 3 * compute * q + heads * seq_len * (4 + compute)
    # SDPA / flash: query, keys, values, output, fp32 logsumexp per head. Given a mask, transformers repeats
    # the kv heads instead of using GQA, and SDPA turns the bool mask into an additive one in the compute dtype
    # (batch x 1 x seq x seq) that its memory-efficient kernel keeps for the backward, in every layer
    # (measured: Mistral-7B, whose 4096 window masks seq 4096, benchmarks/results/planner-accuracy-h100.md).
    if masked:
        return compute * (4 * q + seq_len) + 4 * heads
    if attn_implementation == PACKED_VARLEN:  # engine/packed_attention.py repeats grouped kv heads for the kernel
        return compute * 4 * q + 4 * heads
    return compute * (2 * q + 2 * kv) + 4 * heads


def _layer_parts(shape: ModelShape, run: ResolvedRun, layer_index: int, targets: list[LinearShape]
                 ) -> tuple[int, int, int, int]:
    """Per token: what decoder layer `layer_index` keeps for its backward in its norms, its attention block and its
    MLP; and its bytes that do not grow with the tokens."""
    spec = run.spec
    adapter_type, rank, attn = spec.adapter.type, spec.adapter.r, run.attention
    compute, adapter = DTYPE_BYTES[run.compute_dtype], DTYPE_BYTES[spec.adapter.dtype]
    hidden, inter = shape.hidden_size, shape.intermediate_size
    if run.compile_layers:
        # compiled, a norm keeps its fp32 rsqrt and recomputes the rest from its 16-bit input: the layer's own
        # input for the first (kept by the checkpoint anyway), the attention residual sum for the second
        norms = 2 * 4 + compute * hidden
    else:
        norms = 2 * (4 * hidden + 4)  # two RMSNorms: the fp32 copy of their input and the fp32 rsqrt
    attention = _attention_bytes_per_token(shape, attn, spec.training.max_seq_len, compute,
                                           sdpa_gets_mask(shape, run, layer_index))
    if attn != "eager" and shape.fused_qkv:
        # the values kept for the kernel's backward are a view of the fused projection's output, which stays
        # whole: its query and key parts too (measured: Phi-3-mini without checkpointing, planner-accuracy-h100.md)
        attention += compute * (shape.q_dim + shape.kv_dim)
    # act input [act output, up] for act(gate) * up; a compiled layer recomputes the elementwise act(gate) in
    # backward rather than keep it (AOTAutograd's min-cut partitioner keeps matmul outputs, redoes pointwise ops)
    gated_kept = 2 if run.compile_layers else 3
    mlp_per_token = (gated_kept if shape.gated_mlp else 1) * compute * inter
    constant = 0
    kept_inputs = {}  # (kind, reads_block_input) -> width of a linear input that is kept as is
    if spec.quantization.mode == "int8":  # MatMul8bitLt keeps its input for the backward (ctx.tensors = (CAt, subA, A))
        for linear in shape.linears:
            if linear.layer_index == layer_index and linear.kind:
                kept_inputs[(linear.kind, linear.reads_block_input)] = linear.d_in
    for target in targets:
        group = (target.kind, target.reads_block_input)
        own = 0
        if adapter_type == "lora":
            own += compute * rank  # A's output, kept by B
            if spec.adapter.lora_dropout > 0:
                own += (compute + 1) * target.d_in  # each adapter's own dropped-out input + its bool mask
            else:
                kept_inputs[group] = target.d_in  # A keeps the shared input itself
            if spec.adapter.use_dora:
                own += 2 * compute * target.d_out  # base and adapter outputs, kept by the magnitude scaling
            if adapter != compute:  # autocast's compute-dtype copies of A and B, kept for the backward
                constant += compute * sum(adapter_tensor_numels("lora", rank, target.d_in, target.d_out))
        else:  # LoHa / LoKr build the full delta weight and run F.linear with it
            constant += compute * target.d_in * target.d_out
            if adapter != compute:
                own += compute * target.d_in  # each adapter's own cast of its input
            else:
                kept_inputs[group] = target.d_in
        if target.kind == "mlp":
            mlp_per_token += own
        else:
            attention += own
    if attn != "eager":
        # SDPA / flash return their output in (batch, seq, heads, dim) memory: o_proj's input is that same tensor
        kept_inputs.pop(("attn", False), None)
    attention += compute * sum(width for (kind, _), width in kept_inputs.items() if kind != "mlp")
    mlp_per_token += compute * sum(width for (kind, _), width in kept_inputs.items() if kind == "mlp")
    return norms, attention, mlp_per_token, constant


def layer_activation_bytes(shape: ModelShape, run: ResolvedRun, layer_index: int, targets: list[LinearShape],
                           tokens: int) -> int:
    """Bytes autograd keeps for decoder layer `layer_index`'s backward (its recomputation, under checkpointing)."""
    norms, attention, mlp_per_token, constant = _layer_parts(shape, run, layer_index, targets)
    compute, training = DTYPE_BYTES[run.compute_dtype], run.spec.training
    if run.attention_chunked:  # engine/chunked_attention.py keeps the attention's input alone
        attention = compute * shape.hidden_size
    if not run.mlp_chunked:
        return tokens * (norms + attention + mlp_per_token) + constant
    # engine/token_chunks.py: the MLP keeps its input for the whole sequence, its own activations for one chunk
    chunk = training.micro_batch_size * training.mlp_chunk_tokens
    return tokens * (norms + attention + compute * shape.hidden_size) + chunk * mlp_per_token + constant


def chunked_attention_backward_bytes(shape: ModelShape, run: ResolvedRun, targets: list[LinearShape],
                                     tokens: int) -> int:
    """What engine/chunked_attention.py's backward adds while it runs: the keys and values recomputed whole, their
    fp32 gradients, the input's gradient, one chunk's attention recomputed with its activations, and the gradients
    of the keys and values that chunk saw (up to all of them, for the last chunk). For packed rows with grouped
    heads the chunk's keys and values are repeated to every query head first (as engine/packed_attention.py does
    for torch's variable-length kernel before torch 2.13), and so are their gradients. An estimate: not yet
    measured on a GPU."""
    compute, training = DTYPE_BYTES[run.compute_dtype], run.spec.training
    kv = 2 * shape.kv_dim
    # the gradients of the keys and values the chunk saw: as wide as the queries first (the flash kernel's backward
    # expands grouped heads, as estimate_memory's `widest` says), then summed; packed rows repeat the keys and values
    # themselves too
    seen = 2 * compute * 2 * shape.q_dim if run.attention == PACKED_VARLEN and shape.kv_dim != shape.q_dim else (
        compute * (2 * shape.q_dim + kv))
    chunk = min(tokens, training.micro_batch_size * training.attention_chunk_tokens)
    _, attention, _, _ = _layer_parts(shape, run, 0, [t for t in targets if t.layer_index == 0])
    return tokens * ((compute + 4) * kv + seen + compute * shape.hidden_size) + chunk * attention


def layer_backward_in_chunks_bytes(shape: ModelShape, run: ResolvedRun, layer_index: int,
                                   targets: list[LinearShape], tokens: int,
                                   calibration: Calibration = CALIBRATION) -> int:
    """What a checkpointed layer's backward holds when it goes a chunk of queries at a time (engine/
    chunked_attention.py, `run.layer_backward_chunked`): the keys and values recomputed whole (a block at a time
    where `run.keys_recomputed`), their fp32 gradients, the gradients of the keys and values a chunk sees (plain
    causal rows: one block of keys at a time, engine/key_blocks.py; rows with a mask or packed: all the last chunk
    sees at once, as wide as the queries first with grouped heads: the flash kernel's backward expands them; packed
    rows repeat the keys and values themselves before torch 2.13's grouped variable-length kernel), and one chunk's
    activations and gradients. Its input and its output's gradient (the input's gradient is written in its place)
    are the checkpoint's, counted by estimate_memory. Measured on an H100 under a 15 GiB cap (benchmarks/results/
    defaults-h100/): with key blocks, Llama-2-7B's predicted longest, 110,336 tokens, lay between lengths that
    trained and did not; with keys recomputed, a Llama-2-7B run at 116,736 tokens peaked 1.9 GiB under the
    prediction (13.20 GiB; 11.33 reserved) and a Llama-3-8B one at 131,072 0.9 GiB under it."""
    compute, training = DTYPE_BYTES[run.compute_dtype], run.spec.training
    chunk = min(tokens, training.micro_batch_size * training.attention_chunk_tokens)
    norms, attention, mlp, constant = _layer_parts(shape, run, layer_index, targets)
    if run.mlp_chunked:  # engine/token_chunks.py within the chunk: its input whole (the chunk), its own a piece
        mlp_tokens = min(chunk, training.micro_batch_size * training.mlp_chunk_tokens)
        activations = chunk * (norms + attention + compute * shape.hidden_size) + mlp_tokens * mlp
    else:
        mlp_tokens = chunk
        activations = chunk * (norms + attention + mlp)
    widest = max(max(3 * shape.q_dim, shape.hidden_size) * chunk, shape.mlp_width * mlp_tokens)
    gradients = int(calibration.backward_gradient_widths * compute * widest)
    kv = 2 * shape.kv_dim
    grouped = shape.kv_dim != shape.q_dim
    kept_keys = tokens * compute * kv  # the row's keys and values
    if run.key_blocks and run.attention == "sdpa" and not sdpa_gets_mask(shape, run, layer_index):
        # plain causal rows: a block of keys at a time (engine/key_blocks.py): the block's keys and values widened
        # to the query heads, their gradients and the narrowed ones, the queries' fp32 gradient
        seen_bytes = chunk * (compute * (4 * shape.q_dim + kv) + 4 * shape.q_dim)
        if run.keys_recomputed:  # the block's own keys and values and its normed input instead of the row's
            kept_keys, seen_bytes = 0, seen_bytes + chunk * compute * (kv + shape.hidden_size)
    elif run.attention == PACKED_VARLEN and grouped:
        seen_bytes = tokens * 2 * compute * 2 * shape.q_dim
    else:
        seen_bytes = tokens * compute * (kv + (2 * shape.q_dim if grouped else 0))
    return kept_keys + tokens * 4 * kv + seen_bytes + activations + constant + gradients


def estimate_memory(model_config_or_shape: Union[PretrainedConfig, ModelShape], run: ResolvedRun,
                    calibration: Calibration = CALIBRATION) -> MemoryEstimate:
    """Predicted peak of one training step of our trainer (with engine/loss.py's chunked loss) for `run`."""
    shape = (model_config_or_shape if isinstance(model_config_or_shape, ModelShape)
             else model_shape(model_config_or_shape))
    cal = calibration
    spec = run.spec
    adapter_cfg, training = spec.adapter, spec.training
    adapter_type, attn, seq_len = adapter_cfg.type, run.attention, training.max_seq_len
    compute, adapter_bytes = DTYPE_BYTES[run.compute_dtype], DTYPE_BYTES[adapter_cfg.dtype]
    hidden = shape.hidden_size
    tokens = training.micro_batch_size * seq_len

    # What is stored: the base, the adapter, its gradients (same dtype and size), the optimizer states.
    weights = sum(cuda_block_bytes(b) for b in base_weight_tensor_bytes(shape, run))
    targets = shape.targets(adapter_cfg.target_modules)
    numels = [n for t in targets
              for n in adapter_tensor_numels(adapter_type, adapter_cfg.r, t.d_in, t.d_out, adapter_cfg.use_dora)]
    trainable = sum(numels)
    adapter = sum(cuda_block_bytes(n * adapter_bytes) for n in numels)
    gradients = adapter  # kept from the first backward to the optimizer step, across accumulation
    states = optimizer_state_tensors(training.optimizer, numels, adapter_bytes, run.fused_optimizer)
    optimizer = sum(cuda_block_bytes(b) for b in states.pooled)
    step_temporaries = sum(cuda_block_bytes(b) for b in states.step_temporaries)
    static = weights + adapter + optimizer
    # Gradients appear layer by layer during backward (zero_grad sets them to None after each step); only with
    # gradient accumulation do they all exist from the second micro-batch on (measured: planner-accuracy-h100.md).
    accumulating = training.gradient_accumulation_steps > 1

    # Activations: per decoder layer, then the whole stack with or without checkpointing.
    by_layer: dict[int, list[LinearShape]] = {i: [] for i in range(shape.num_layers)}
    for target in targets:
        by_layer[target.layer_index].append(target)
    layer_bytes = [layer_activation_bytes(shape, run, index, layer_targets, tokens)
                   for index, layer_targets in by_layer.items()]
    # batch (input_ids, attention_mask, labels int64), rotary cos/sin, the gathered hidden states of the labelled
    # tokens and their two int64 indices (engine/loss.py), and the final norm's fp32 input and rsqrt (also where it
    # runs a chunk at a time and keeps its input in bf16, engine/token_chunks.py: the layer phase was calibrated so)
    around_head = tokens * (3 * 8 + 2 * compute * shape.head_dim + 2 * 8)
    head = around_head + tokens * (4 * hidden + 4 + compute * hidden)
    if any(sdpa_gets_mask(shape, run, index) for index in range(shape.num_layers)):
        head += tokens * seq_len  # the bool mask, batch x seq x seq
    elif attn == "eager":
        head += tokens * seq_len * compute  # the additive float mask
    # A checkpointed layer keeps only its input (in CPU memory when offloaded) and recomputes the rest during its
    # own backward; the others keep everything from the forward on.
    checkpointed = checkpointed_layer_count(shape, run)
    layer_input = tokens * hidden * compute
    pinned = offloaded_input_bytes(shape, run)
    offloaded = pinned > 0  # on a GPU, with some layer checkpointed
    # A compiled layer that keeps its activations keeps its own input too, for its first norm's backward (a
    # checkpointed one recomputes from the input the checkpoint keeps, counted once); counted tensor by tensor on
    # the CPU in tests/test_planner_memory.py
    own_input = layer_input if run.compile_layers else 0
    kept = [(0 if offloaded else layer_input) if index < checkpointed else full + own_input
            for index, full in enumerate(layer_bytes)]
    saved = sum(kept) + head
    # attention's gradients: queries, keys and values, the keys' and values' at the queries' width even with grouped
    # heads (the flash kernel's backward expands them to every query head before summing, as repeat_kv's and
    # engine/packed_attention.py's repeats do; measured: Llama-3-8B at 59,392 tokens under a 15 GiB cap ran out of
    # memory where query + 2 x key width predicted 8% less, benchmarks/results/defaults-h100/README.md). Chunked
    # attention's work on a chunk of tokens (its whole-sequence buffers are counted below).
    attention_tokens = (min(tokens, training.micro_batch_size * training.attention_chunk_tokens)
                        if run.attention_chunked else tokens)
    widest = max(3 * shape.q_dim * attention_tokens, hidden * tokens)
    mlp_tokens = training.micro_batch_size * training.mlp_chunk_tokens if run.mlp_chunked else tokens
    widest = max(widest, shape.mlp_width * mlp_tokens)
    backward = int(cal.backward_gradient_widths * compute * widest)
    if run.attention_chunked:
        backward += chunked_attention_backward_bytes(shape, run, targets, tokens)
    if attn == "eager":
        backward += tokens * shape.num_heads * seq_len * (4 + compute)  # gradient of the probabilities
    # one weight-sized buffer at a time: the dequantized base weight in each matmul, the LoHa/LoKr delta and its
    # gradient, the DoRA weight norm
    largest_weight = max(l.d_in * l.d_out for l in shape.linears)
    largest_target = max(t.d_in * t.d_out for t in targets)
    transient = compute * largest_weight if spec.quantization.mode != "none" else 0
    if adapter_type != "lora":
        # LoKr: the delta (kron of its factors) and its gradient; LoHa's delta is the elementwise product of two
        # low-rank products, so its backward holds both products, the delta's gradient and a product's gradient
        delta_buffers = 4 if adapter_type == "loha" else 2
        transient = max(transient, delta_buffers * adapter_bytes * largest_target)
    if adapter_cfg.use_dora:
        transient = max(transient, (4 + compute) * largest_target)
    # Backward of layer i (last to first): what layers 0..i keep is still alive, a checkpointed layer i holds its
    # recomputed activations as well, and the gradients of layers i..L-1 exist (all of them while accumulating).
    # In engine/checkpointing.py's reentrant checkpoint the gradient of a layer's output stays alive through the
    # inner backward beside the gradient of its input (measured: the offloaded Llama-2-7B rows of
    # planner-accuracy-h100.md, whose shortfall grew by 2 inputs' bytes/token); an offloaded layer also holds its
    # input copied back and, where they are prefetched, the input of the layer before it being copied back meanwhile
    # (engine/checkpointing.py).
    layers = shape.num_layers
    copied_back = (2 if run.prefetch_checkpoints else 1) if offloaded else 0
    layer_phase, layer_grads, kept_so_far = 0, 0, 0
    for index in range(layers):
        kept_so_far += kept[index]
        grads = gradients if accumulating else gradients * (layers - index) // layers
        if index < checkpointed and run.layer_backward_chunked:  # its backward a chunk at a time, its own buffers
            # the input's gradient takes the place of the output's (engine/chunked_attention.py)
            recomputed = (layer_backward_in_chunks_bytes(shape, run, index, by_layer[index], tokens, cal)
                          + (1 + copied_back) * layer_input)
            memory = head + kept_so_far + recomputed + grads + transient
        else:
            recomputed = layer_bytes[index] + (2 + copied_back) * layer_input if index < checkpointed else 0
            memory = head + kept_so_far + recomputed + grads + backward + transient
        if memory > layer_phase:
            layer_phase, layer_grads = memory, grads
    # the loss: one chunk of logits at a time (engine/loss.py), and the gradient of the gathered hidden states
    chunk_logits = (fused_loss_chunk_bytes(tokens, hidden, shape.vocab_size, compute) if run.fused_loss
                    else int(min(training.loss_chunk_tokens, tokens) * shape.vocab_size * cal.loss_bytes_per_logit))
    loss_phase = saved + chunk_logits + 2 * compute * hidden * tokens + (gradients if accumulating else 0)
    if checkpointed and adapter_type == "lora" and adapter_bytes != compute:
        # autocast caches its compute-dtype copy of every LoRA weight until the forward (loss included) ends;
        # without checkpointing the layers' saved tensors already hold them
        loss_phase += compute * trainable

    # the final norm's backward, before the layers': whole and eager, its fp32 tensors (FINAL_NORM_BACKWARD_BYTES
    # per element); a chunk at a time, its input, the gradients of its output and its input, the chunks' gradients
    # before they are joined, and one chunk's own
    if run.mlp_chunked:
        norm_tokens = min(tokens, training.micro_batch_size * training.mlp_chunk_tokens)
        norm_backward = hidden * (4 * compute * tokens + FINAL_NORM_BACKWARD_BYTES * norm_tokens)
    else:
        norm_backward = hidden * FINAL_NORM_BACKWARD_BYTES * tokens
    norm_phase = sum(kept) + around_head + norm_backward + (gradients if accumulating else 0)
    phases = {"layer backward": layer_phase, "loss": loss_phase, "final norm": norm_phase,
              "optimizer step": step_temporaries}
    phase = max(phases, key=phases.get)
    loss_grads = gradients if accumulating else 0
    grads_at_peak = {"layer backward": layer_grads, "loss": loss_grads, "final norm": loss_grads,
                     "optimizer step": gradients}[phase]
    if phase == "optimizer step":
        phases[phase] += gradients
    allocated = static + phases[phase]
    dequantized = compute * largest_weight if spec.quantization.mode != "none" else 0
    overhead = int(cal.allocator_step_factor * step_temporaries + cal.allocator_weight_buffers * dequantized
                   + cal.allocator_overhead_bytes)
    breakdown = {
        "weights": weights,
        "adapter": adapter,
        "gradients": grads_at_peak,
        "optimizer": optimizer + (step_temporaries if phase == "optimizer step" else 0),
        "activations": {"layer backward": layer_phase, "loss": loss_phase - chunk_logits,
                        "final norm": norm_phase}.get(phase, 0)
        - (grads_at_peak if phase != "optimizer step" else 0),
        "logits": chunk_logits if phase == "loss" else 0,
        "overhead": overhead,
    }
    return MemoryEstimate(
        breakdown=breakdown,
        predicted_peak_allocated_bytes=allocated,
        predicted_peak_bytes=allocated + overhead,
        cuda_context_bytes=CUDA_CONTEXT_BYTES,
        paged_optimizer_bytes=sum(states.paged),
        trainable_params=trainable,
        total_params=shape.total_params + trainable,
        target_layers=len(targets),
        phase=phase,
        pinned_host_bytes=pinned,
        phases={
            "layer backward": PhaseBytes(layer_phase - layer_grads, 0, layer_grads, 0),
            "loss": PhaseBytes(loss_phase - chunk_logits - loss_grads, chunk_logits, loss_grads, 0),
            "final norm": PhaseBytes(norm_phase - loss_grads, 0, loss_grads, 0),
            "optimizer step": PhaseBytes(0, 0, gradients, step_temporaries),
        },
    )
