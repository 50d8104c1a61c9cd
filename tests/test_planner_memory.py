"""The memory model against the real pieces on the CPU: parameter counts, bitsandbytes storage, peft adapter
tensors, optimizer states and the activations autograd keeps for a decoder layer."""

import pytest
import torch
import bitsandbytes as bnb
from transformers import (AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, GemmaConfig, GPT2Config,
                          LlamaConfig, Phi3Config, Qwen2Config)

from qlora_trainer.engine import adapters
from qlora_trainer.engine.base import cpu_flash_attention_fails
from qlora_trainer.hardware import Hardware, budget_gpu, lookup_gpu
from qlora_trainer.planner.memory import (adapter_tensor_numels, base_weight_tensor_bytes, estimate_memory,
                                          layer_activation_bytes, optimizer_state_tensors)
from qlora_trainer.planner.shapes import load_model_config, model_shape, preset_names
from qlora_trainer.spec import AdapterConfig, ResolvedRun, RunSpec, resolve

PRESET_PARAMS = {  # the published parameter counts of these checkpoints
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-7b": 8_537_680_896,
    "phi-3-mini": 3_821_079_552,
    "tinyllama-1.1b": 1_100_048_384,
    "llama-2-70b": 68_976_648_192,
}
def run(values: dict = None) -> ResolvedRun:
    """RunSpec defaults with `values` ({"training.max_seq_len": 2048, ...}) and compiled layers, resolved for a bf16
    GPU: the path these expectations were derived for."""
    values = {"training.compile_layers": "on", **(values or {})}
    return resolve(RunSpec().with_values(values), Hardware.planned(budget_gpu(80)))


TINY = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
TINY_CONFIGS = {  # hidden 40 and intermediate 100: weights that end in a partial 64-value block
    "llama": LlamaConfig(hidden_size=40, intermediate_size=100, num_key_value_heads=2, **TINY),
    "qwen2": Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),  # q/k/v biases
    "gemma": GemmaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=1, head_dim=32, **TINY),  # tied
    "phi3": Phi3Config(hidden_size=64, intermediate_size=96, num_key_value_heads=4, pad_token_id=0, **TINY),
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0,
                       eos_token_id=0),  # Conv1D
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_builds_with_the_published_parameter_count(name):
    config = load_model_config(name)
    assert isinstance(config, type(AutoConfig.for_model(config.model_type)))
    assert model_shape(config).total_params == PRESET_PARAMS[name]


def test_every_shipped_preset_is_checked():
    assert set(preset_names()) == set(PRESET_PARAMS)


def test_preset_shapes_read_gqa_head_dim_and_fused_projections():
    llama3 = model_shape(load_model_config("llama-3-8b"))
    assert (llama3.num_kv_heads, llama3.kv_dim, llama3.intermediate_size, llama3.gated_mlp) == (8, 1024, 14336, True)
    gemma = model_shape(load_model_config("gemma-7b"))
    assert (gemma.q_dim, gemma.hidden_size) == (4096, 3072)
    phi3 = model_shape(load_model_config("phi-3-mini"))  # fused qkv_proj and gate_up_proj
    assert phi3.gated_mlp and phi3.intermediate_size == 8192 and len(phi3.linears) == 4 * 32


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_parameter_count_matches_the_real_model(arch):
    config = TINY_CONFIGS[arch]
    model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    real_linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    assert len(shape.linears) == len(real_linears) - 1  # all but lm_head


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage the loaded model keeps: parameters, quantization state, buffers."""
    storages = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for param in model.parameters():
        add(param)
        add(getattr(param, "SCB", None))
        state = getattr(param, "quant_state", None)
        if state is not None:
            add(state.absmax), add(state.code), add(state.offset)
            if state.nested:
                add(state.state2.absmax), add(state.state2.code)
    for buffer in model.buffers():
        add(buffer)
    return sum(storages.values())


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict:
    folders = {}
    for arch in ("llama", "qwen2", "gpt2"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]).to(torch.bfloat16).save_pretrained(folder)
        folders[arch] = folder
    return folders


def _bnb_config(quant: str, double_quant: bool):
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)


@pytest.mark.parametrize("arch, quant, double_quant", [
    ("llama", "nf4", True), ("llama", "nf4", False), ("llama", "fp4", True), ("llama", "int8", False),
    ("llama", "none", False), ("qwen2", "nf4", True), ("gpt2", "nf4", True),
])
def test_base_weight_bytes_equal_what_bitsandbytes_allocates(tiny_checkpoints, arch, quant, double_quant):
    folder = tiny_checkpoints[arch]
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=_bnb_config(quant, double_quant),
                                                 dtype=torch.bfloat16)
    if quant in ("nf4", "fp4"):  # the layout a GPU holds (no CPU-kernel repacking happened)
        states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert states and all(state.nested == double_quant for state in states)
    planned = run({"quantization.mode": quant, "quantization.double_quant": double_quant})
    assert planned.compute_dtype == "bfloat16"
    predicted = base_weight_tensor_bytes(model_shape(AutoConfig.from_pretrained(folder)), planned)
    assert sum(predicted) == _held_bytes(model)


@pytest.mark.parametrize("adapter_type, rank", [("lora", 4), ("loha", 4), ("lokr", 2), ("lokr", 6)])
def test_adapter_tensors_equal_what_peft_creates(adapter_type, rank):
    config = TINY_CONFIGS["qwen2"]
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(False)
    keys, layers = adapters.resolve_targets(model, "all-linear")
    peft_model, _ = adapters.attach_adapter(model, AdapterConfig(type=adapter_type, r=rank), keys, layers)
    created = sorted(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = model_shape(config)
    predicted = sorted(n for t in shape.targets("all-linear")
                       for n in adapter_tensor_numels(adapter_type, rank, t.d_in, t.d_out))
    assert predicted == created


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_optimizer_states_equal_what_the_optimizer_allocates(optimizer):
    from qlora_trainer.engine.build import build_optimizer

    numels = [1000, 5000, 300_000]  # fp32 states below 4096 elements, paged states from 100k (on a GPU)
    params = [torch.nn.Parameter(torch.randn(n)) for n in numels]
    opt = build_optimizer(optimizer, params, lr=1e-3, weight_decay=0.0)
    for param in params:
        param.grad = torch.randn_like(param)
    opt.step()
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                for state in opt.state.values() for key, v in state.items()
                if torch.is_tensor(v) and key != "step"}  # torch keeps `step` on the CPU unless capturable or fused
    states = optimizer_state_tensors(optimizer, numels, param_bytes=4, fused=False)
    assert sum(states.pooled) + sum(states.paged) == sum(storages.values())  # the CPU never pages
    assert states.paged == ((300_000, 300_000) if optimizer == "paged_adamw8bit" else ())


def test_fused_adamw_states_equal_what_it_allocates():
    """engine/build.py's AdamW on a GPU is torch's fused one: its `step` lives beside the parameter and the step
    allocates no temporaries (the CPU has the same fused kernel, so its states are counted here)."""
    from qlora_trainer.engine.build import build_optimizer

    numels = [1000, 5000, 300_000]
    params = [torch.nn.Parameter(torch.randn(n)) for n in numels]
    opt = build_optimizer("adamw", params, lr=1e-3, weight_decay=0.0, fused=True)
    for param in params:
        param.grad = torch.randn_like(param)
    opt.step()
    found = sorted(v.untyped_storage().nbytes() for state in opt.state.values() for v in state.values())
    states = optimizer_state_tensors("adamw", numels, param_bytes=4, fused=True)
    assert sorted(states.pooled) == found
    assert states.step_temporaries == ()


def _saved_storages(root) -> dict[int, tuple[int, str]]:
    """data_ptr -> (bytes, saving node) of every tensor autograd saved in the graph behind `root`."""
    found, seen, stack = {}, set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            chunked_attention = type(node).__name__ == "_ChunkedAttentionFunctionBackward" and attr == "saved_tensors"
            if not attr.startswith("_saved_") and not chunked_attention:
                continue  # autograd's own nodes name each saved tensor; engine/chunked_attention.py's holds a list
            value = getattr(node, attr)
            for tensor in value if isinstance(value, tuple) else (value,):
                if torch.is_tensor(tensor) and not (tensor.dtype == torch.float64 and tensor.dim() == 0):
                    storage = tensor.untyped_storage()
                    found.setdefault(storage.data_ptr(), (storage.nbytes(), f"{type(node).__name__}.{attr}"))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _kept_by_last_layer(peft_model, **inputs) -> dict[int, tuple[int, str]]:
    """What the last decoder layer saved for its backward when the decoder ran `inputs`: not earlier layers'
    tensors, the weights, nor the cos/sin and mask all layers share."""
    decoder = peft_model.get_base_model().model
    seen = {}
    last = decoder.layers[-1]
    hooks = [
        last.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(input=kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True),
        last.register_forward_hook(lambda m, args, output: seen.update(output=output)),
        decoder.rotary_emb.register_forward_hook(lambda m, args, output: seen.update(rotary=output)),
    ]
    decoder(**inputs)
    for hook in hooks:
        hook.remove()
    output = seen["output"][0] if isinstance(seen["output"], tuple) else seen["output"]
    shared = set(_saved_storages(seen["input"].grad_fn)) | {seen["input"].untyped_storage().data_ptr()}
    shared |= {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    shared |= {t.untyped_storage().data_ptr() for t in seen["rotary"]}
    return {ptr: found for ptr, found in _saved_storages(output.grad_fn).items()
            if ptr not in shared and not found[1].endswith("_saved_attn_mask")}


# these tests count what SDPA's flash kernel keeps; where it cannot run on this CPU the math kernel keeps other tensors
NO_CPU_FLASH = pytest.mark.skipif(cpu_flash_attention_fails(), reason="torch's CPU flash attention cannot run with "
                                  "ATen's kernels held below this CPU's AVX512-BF16 (ATEN_CPU_CAPABILITY)")


@pytest.mark.parametrize("adapter_type, attn, targets, batch, padded", [
    pytest.param("lora", "sdpa", "all-linear", 1, False, marks=NO_CPU_FLASH),  # GQA inside SDPA
    # a padding mask: keys and values repeated to every head
    pytest.param("lora", "sdpa", "all-linear", 2, True, marks=NO_CPU_FLASH),
    ("lora", "eager", "attn", 2, False),
    pytest.param("lora", "sdpa", "mlp", 1, False, marks=NO_CPU_FLASH),
    pytest.param("loha", "sdpa", "all-linear", 1, False, marks=NO_CPU_FLASH),  # the delta weight of every target
    pytest.param("lokr", "sdpa", "all-linear", 2, True, marks=NO_CPU_FLASH),
])
def test_layer_activations_equal_what_autograd_keeps(tiny_llama_dir, adapter_type, attn, targets, batch, padded):
    """NF4 base, adapters in the compute dtype, no dropout: what the last decoder layer keeps for its backward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_bnb_config("nf4", True),
                                                 dtype=torch.bfloat16, attn_implementation=attn)
    for param in model.parameters():
        param.requires_grad_(False)
    keys, layers = adapters.resolve_targets(model, targets)
    adapter = AdapterConfig(type=adapter_type, r=8, lora_dropout=0.0, target_modules=keys, dtype="bfloat16")
    peft_model, _ = adapters.attach_adapter(model, adapter, keys, layers)
    peft_model.train()
    seq_len = 40
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, :5] = 0 if padded else 1
    kept = _kept_by_last_layer(peft_model, input_ids=torch.randint(0, 384, (batch, seq_len)), attention_mask=mask)
    shape = model_shape(AutoConfig.from_pretrained(tiny_llama_dir))
    planned = run({"adapter.r": 8, "adapter.type": adapter_type, "adapter.target_modules": targets,
                   "training.micro_batch_size": batch, "training.max_seq_len": seq_len, "adapter.dtype": "bfloat16",
                   "adapter.lora_dropout": 0.0, "model.attn_implementation": attn,
                   "training.compile_layers": "off"})  # eager autograd, as this test runs it
    index = shape.num_layers - 1
    layer_targets = [t for t in shape.targets(targets) if t.layer_index == index]
    predicted = layer_activation_bytes(shape, planned, index, layer_targets, batch * seq_len)
    if padded and attn == "sdpa":
        # On a GPU the memory-efficient kernel keeps an additive bf16 copy of the mask in every layer (measured on
        # an H100); the CPU kernel keeps the shared bool mask itself.
        predicted -= 2 * batch * seq_len * seq_len
    assert predicted == sum(nbytes for nbytes, _ in kept.values())


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_attention_keeps_its_input_alone(tiny_llama_dir, packed):
    """engine/chunked_attention.py: the last decoder layer, LoRA on every linear layer, keeps its norms', its
    attention's input and its MLP's tensors, as the planner counts; nothing of q/k/v or the attention output."""
    from qlora_trainer.engine.chunked_attention import chunk_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_bnb_config("nf4", True),
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    for param in model.parameters():
        param.requires_grad_(False)
    keys, layers = adapters.resolve_targets(model, "all-linear")
    adapter = AdapterConfig(r=8, lora_dropout=0.0, target_modules=keys, dtype="bfloat16")
    peft_model, _ = adapters.attach_adapter(model, adapter, keys, layers)
    peft_model.train()
    chunk_attention(peft_model, chunk_tokens=16)
    seq_len = 40
    positions = torch.cat([torch.arange(25), torch.arange(15)])[None] if packed else None
    kept = _kept_by_last_layer(peft_model, input_ids=torch.randint(0, 384, (1, seq_len)), position_ids=positions,
                               use_cache=False)  # as training runs it
    assert any(name.endswith("saved_tensors") for _, name in kept.values())  # the chunked function's input
    shape = model_shape(AutoConfig.from_pretrained(tiny_llama_dir))
    planned = run({"adapter.r": 8, "adapter.target_modules": "all-linear", "training.max_seq_len": seq_len,
                   "adapter.dtype": "bfloat16", "adapter.lora_dropout": 0.0, "model.attn_implementation": "sdpa",
                   "training.compile_layers": "off", "training.attention_chunk_tokens": 16})
    index = shape.num_layers - 1
    layer_targets = [t for t in shape.targets("all-linear") if t.layer_index == index]
    assert layer_activation_bytes(shape, planned, index, layer_targets, seq_len) == sum(
        nbytes for nbytes, _ in kept.values())


@pytest.fixture(scope="module")
def llama2():
    return model_shape(load_model_config("llama-2-7b"))


@pytest.mark.parametrize("rank, trainable", [(16, 39_976_960), (64, 159_907_840)])
def test_trainable_params_of_all_linear_lora_on_llama2(llama2, rank, trainable):
    assert estimate_memory(llama2, run({"adapter.r": rank})).trainable_params == trainable


def test_breakdown_sums_to_the_reserved_peak(llama2):
    estimate = estimate_memory(llama2, run({"training.max_seq_len": 2048, "training.micro_batch_size": 2}))
    assert sum(estimate.breakdown.values()) == estimate.predicted_peak_bytes
    assert estimate.predicted_peak_bytes - estimate.predicted_peak_allocated_bytes == estimate.breakdown["overhead"]
    assert estimate.predicted_device_bytes == estimate.predicted_peak_bytes + estimate.cuda_context_bytes


def test_nf4_base_is_a_quarter_of_the_16_bit_one(llama2):
    nf4 = estimate_memory(llama2, run({"quantization.mode": "nf4"})).breakdown["weights"]
    half = estimate_memory(llama2, run({"quantization.mode": "none"})).breakdown["weights"]
    linear_weights = sum(l.d_in * l.d_out for l in llama2.linears)
    others = half - 2 * linear_weights  # embeddings and lm_head stay 16-bit in both
    # 4 bits per weight + 8-bit absmax per 64 + fp32 absmax-of-absmax per 256 x 64: 4.127 bits per weight
    assert (nf4 - others) / linear_weights * 8 == pytest.approx(4.127, abs=0.002)


def test_checkpointing_keeps_layer_inputs_instead_of_layer_activations(llama2):
    planned = run({"training.max_seq_len": 2048, "training.micro_batch_size": 1})
    on = estimate_memory(llama2, planned).breakdown["activations"]
    off = estimate_memory(llama2, planned.with_values({"training.gradient_checkpointing": False}))
    assert off.breakdown["activations"] > 5 * on


def test_partial_checkpointing_lies_between_none_and_all(llama2):
    def peak(changes: dict = None) -> int:
        values = {"training.max_seq_len": 2048, "training.micro_batch_size": 4, **(changes or {})}
        return estimate_memory(llama2, run(values)).predicted_peak_bytes

    everything, nothing = peak(), peak({"training.gradient_checkpointing": False})
    assert peak({"training.checkpointed_layers": 32}) == everything
    assert peak({"training.checkpointed_layers": 0}) == nothing
    partial = [peak({"training.checkpointed_layers": count}) for count in range(1, 33)]
    assert all(a >= b for a, b in zip(partial[:-1], partial[1:-1]))  # more checkpointed layers, less memory
    assert nothing > partial[0] and partial[-1] == everything
    # except the last one: its backward needs its activations at once, so recomputing them saves nothing, and the
    # reentrant checkpoint holds the gradient of its input as well, at most one layer input more (once the fused
    # loss no longer peaks above the layers' backward)
    assert 0 <= partial[-1] - partial[-2] <= 2048 * 4 * 4096 * 2


def test_offloaded_checkpoints_leave_two_layer_inputs_on_the_gpu(llama2):
    # with accumulation every layer's gradient exists throughout, so both peak at the last layer's backward
    planned = run({"training.max_seq_len": 16384, "training.micro_batch_size": 1, "training.offload_checkpoints": False,
                   "training.gradient_accumulation_steps": 2, "data.packing": True, "adapter.lora_dropout": 0.0})
    kept = estimate_memory(llama2, planned)
    offloaded_run = planned.with_values({"training.offload_checkpoints": True})
    offloaded = estimate_memory(llama2, offloaded_run)
    layer_input = 16384 * 4096 * 2
    assert kept.phase == offloaded.phase == "layer backward"
    # 32 inputs kept on the GPU, against the one copied back for the layer in backward and the one of the layer
    # before it, copied back meanwhile (the two gradients that the reentrant backward holds at once are in both)
    assert kept.predicted_peak_allocated_bytes - offloaded.predicted_peak_allocated_bytes == 30 * layer_input
    # with chunked MLPs (a run at the edge of its memory) the input before is copied back only when needed
    chunked = {"training.mlp_chunk_tokens": 4096}
    kept, offloaded = (estimate_memory(llama2, run_.with_values(chunked)) for run_ in (planned, offloaded_run))
    assert kept.predicted_peak_allocated_bytes - offloaded.predicted_peak_allocated_bytes == 31 * layer_input


def test_a_sliding_window_reached_by_the_sequence_masks_every_layer():
    mistral = model_shape(load_model_config("mistral-7b"))  # window 4096, GQA with 8 kv heads
    assert mistral.sliding_window == 4096 and mistral.sliding_layers == frozenset(range(32))
    two_below, below, at = (
        estimate_memory(mistral, run({"training.max_seq_len": seq, "training.gradient_checkpointing": False}))
        .phases["layer backward"].activations for seq in (4094, 4095, 4096))  # below 4,096 the final norm's peaks
    per_layer = 2 * (2 * (4096 - 1024) + 4096) * 4096  # repeated keys/values and the additive mask, per token
    mask = 4096 * 4096  # the bool mask, once
    # the last token adds what any token adds, plus the masks' cost for the whole sequence
    assert (at - below) - (below - two_below) == pytest.approx(32 * per_layer + mask, abs=2**20)
    assert model_shape(load_model_config("llama-2-7b")).sliding_layers == frozenset()
    assert model_shape(load_model_config("qwen2.5-7b")).sliding_layers == frozenset()  # use_sliding_window false


def test_large_vocabulary_peaks_at_the_loss_chunk():
    gemma = model_shape(load_model_config("gemma-7b"))  # 256k vocabulary
    chunked = {"training.max_seq_len": 512, "training.loss_kernel": "chunked"}
    estimate = estimate_memory(gemma, run({**chunked, "training.loss_chunk_tokens": 1024}))
    assert estimate.phase == "loss"
    assert estimate.breakdown["logits"] == 512 * 256_000 * 12  # one 512-token chunk: all the labelled tokens
    smaller = estimate_memory(gemma, run({**chunked, "training.loss_chunk_tokens": 256}))
    assert smaller.breakdown["logits"] == estimate.breakdown["logits"] // 2


def test_paged_optimizer_moves_the_8bit_states_out_of_the_pool(llama2):
    eight_bit = estimate_memory(llama2, run({"adapter.r": 64, "training.optimizer": "adamw8bit"}))
    paged = estimate_memory(llama2, run({"adapter.r": 64, "training.optimizer": "paged_adamw8bit"}))
    # at rank 64 every LoRA tensor has >= 100k elements, so both uint8 states of each are paged
    assert paged.paged_optimizer_bytes == 2 * eight_bit.trainable_params
    assert eight_bit.breakdown["optimizer"] - paged.breakdown["optimizer"] == paged.paged_optimizer_bytes


def test_mlp_chunks_bound_the_mlp_activations_of_long_sequences_only(llama2):
    planned = run({"training.max_seq_len": 32768, "adapter.lora_dropout": 0.0, "adapter.target_modules": "attn",
                   "training.offload_checkpoints": True, "training.loss_chunk_tokens": 512})
    whole = estimate_memory(llama2, planned)
    chunked = estimate_memory(llama2, planned.with_values({"training.mlp_chunk_tokens": 4096}))
    assert whole.phase == chunked.phase == "layer backward"
    # one layer's gate/up outputs (compiled: act(gate) is recomputed) for 28k fewer tokens, less the MLP input the
    # chunks keep for the whole sequence; the backward buffers follow q/k/v, wider than Llama-2's MLP chunk; and the
    # input of the layer before, which offloaded runs without chunked MLPs copy back ahead (spec/resolve.py)
    inter, hidden = 11008, 4096
    saved = (32768 - 4096) * 2 * 2 * inter - 32768 * 2 * hidden + 32768 * 2 * hidden
    assert whole.predicted_peak_allocated_bytes - chunked.predicted_peak_allocated_bytes == saved
    short = planned.with_values({"training.max_seq_len": 4096})
    assert estimate_memory(llama2, short) == estimate_memory(llama2,
                                                             short.with_values({"training.mlp_chunk_tokens": 4096}))


def test_compiled_layers_keep_neither_act_gate_nor_the_norms_fp32_copies(llama2):
    planned = run({"training.max_seq_len": 8192, "adapter.lora_dropout": 0.0, "adapter.target_modules": "attn",
                   "training.loss_chunk_tokens": 256})
    assert planned.compile_layers
    eager = estimate_memory(llama2, planned.with_values({"training.compile_layers": "off"}))
    compiled = estimate_memory(llama2, planned)
    assert eager.phase == compiled.phase == "layer backward"
    # act(gate) (bf16, intermediate wide); each norm's fp32 input copy, against the second norm's bf16 input
    norms = 2 * (4 * 4096 + 4) - (2 * 4 + 2 * 4096)
    assert eager.predicted_peak_allocated_bytes - compiled.predicted_peak_allocated_bytes == 8192 * (2 * 11008 + norms)


def _compiled_layer_kept_bytes(folder, targets: str, tokens: int, dropout: float) -> int:
    """Bytes one forward of the model at `folder` keeps for backward (parameters and quantization state aside), its
    decoder layers compiled as training compiles them (fused LoRA over NF4, no checkpointing), partitioned by
    inductor's min-cut rematerialization (`aot_eager_decomp_partition`, no kernels generated)."""
    import dataclasses

    import torch._dynamo

    from qlora_trainer.engine.build import build
    from qlora_trainer.engine.compiled_layers import compile_decoder_layers
    from qlora_trainer.hardware import CPU
    from qlora_trainer.spec import spec_from_dict

    spec = spec_from_dict({"model": {"path": str(folder)}, "data": {"path": str(folder / "unused.jsonl")},
                           "adapter": {"r": 8, "target_modules": targets, "lora_dropout": dropout},
                           "training": {"gradient_checkpointing": False, "compile_layers": "off",
                                        "max_seq_len": tokens}})
    session = build(dataclasses.replace(resolve(spec, CPU), fused_lora=True))
    torch._dynamo.reset()
    compile_decoder_layers(session.model, backend="aot_eager_decomp_partition")
    fixed = {t.untyped_storage().data_ptr() for t in [*session.model.parameters(), *session.model.buffers()]}
    for module in session.model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code] if state.state2 is not None else []
            fixed |= {t.untyped_storage().data_ptr() for t in [state.absmax, state.code, *nested, state.offset]
                      if torch.is_tensor(t)}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in fixed:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        session.model(input_ids=torch.randint(4, 300, (1, tokens), generator=torch.Generator().manual_seed(0)))
    return sum(kept.values())


@NO_CPU_FLASH
@pytest.mark.parametrize("arch, targets, dropout", [
    ("llama", "q_proj,k_proj,v_proj,o_proj", 0.0),
    ("llama", "all-linear", 0.1),  # each adapter's own dropped-out input
    ("phi3", "all-linear", 0.0),  # the fused qkv_proj output stays whole behind the values' view
    ("gemma", "all-linear", 0.0),  # GeGLU, head_dim 256 apart from the hidden size
])
def test_a_compiled_layer_without_checkpointing_keeps_what_the_planner_counts(tmp_path, arch, targets, dropout):
    """What a compiled decoder layer keeps when it is not checkpointed, counted per layer (the difference between a
    4-layer and a 2-layer model): the layer's activations as layer_activation_bytes counts them, and its own input."""
    from conftest import save_tiny_tokenizer

    cls = {"llama": LlamaConfig, "phi3": Phi3Config, "gemma": GemmaConfig}[arch]
    kept, tokens = {}, 128
    for layers in (2, 4):
        folder = tmp_path / f"{arch}-{layers}"
        torch.manual_seed(0)
        config = cls(hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2 if arch == "llama" else 4, vocab_size=300, pad_token_id=0,
                     max_position_embeddings=512)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
        save_tiny_tokenizer(folder)
        kept[layers] = _compiled_layer_kept_bytes(folder, targets, tokens, dropout)
    shape = model_shape(AutoConfig.from_pretrained(folder))
    planned = resolve(RunSpec().with_values({"adapter.r": 8, "adapter.target_modules": targets,
                                             "adapter.lora_dropout": dropout, "training.max_seq_len": tokens,
                                             "training.compile_layers": "on"}), Hardware(None, "cpu"))
    layer = [t for t in shape.targets(targets) if t.layer_index == 0]
    per_layer = layer_activation_bytes(shape, planned, 0, layer, tokens) + 2 * shape.hidden_size * tokens
    assert (kept[4] - kept[2]) / 2 == per_layer


def test_a_layer_backward_in_chunks_is_counted_where_the_run_takes_it(llama2):
    """Chunked attention on Llama-2-7B at 65,536 tokens, offloaded checkpoints: without adapter dropout the layers'
    backward goes in chunks (ResolvedRun.layer_backward_chunked) and the planner counts its whole-sequence buffers
    instead of the layer's recomputation; with dropout the layer recomputes whole, which holds more."""
    common = {"training.max_seq_len": 65536, "training.attention_chunk_tokens": 4096,
              "training.mlp_chunk_tokens": 4096, "training.offload_checkpoints": True}
    chunked, whole = run({**common, "adapter.lora_dropout": 0.0}), run({**common, "adapter.lora_dropout": 0.05})
    assert chunked.layer_backward_chunked and not whole.layer_backward_chunked
    chunked_peak = estimate_memory(llama2, chunked).phases["layer backward"]
    whole_peak = estimate_memory(llama2, whole).phases["layer backward"]
    assert chunked_peak.activations < whole_peak.activations
    # per token above the checkpoint's own buffers: keys and values (bf16) with their fp32 gradients, and the
    # gradients of the keys and values the last chunk saw (no grouped heads here: as they are)
    kv = 2 * 4096
    assert chunked_peak.activations > 65536 * ((2 + 4) * kv + 2 * kv)


def test_plain_rows_count_one_block_of_key_gradients_packed_rows_all_the_last_chunk_sees(llama2):
    """engine/key_blocks.py: on plain causal rows the layer backward in chunks makes the keys' and values' gradients
    one block at a time, on packed rows (the variable-length kernel) all the last chunk sees at once (the whole
    sequence, here as wide as the keys: Llama-2-7B has no grouped heads). The layer phase of the packed run holds
    that, less one block's work, more."""
    common = {"training.max_seq_len": 65536, "training.attention_chunk_tokens": 4096, "adapter.lora_dropout": 0.0,
              "training.mlp_chunk_tokens": 4096, "training.offload_checkpoints": True}
    plain, packed = run({**common, "data.packing": False}), run({**common, "data.packing": True})
    assert plain.attention == "sdpa" and packed.attention != "sdpa"
    assert plain.layer_backward_chunked and packed.layer_backward_chunked
    plain_peak = estimate_memory(llama2, plain).phases["layer backward"].activations
    packed_peak = estimate_memory(llama2, packed).phases["layer backward"].activations
    whole_width = 65536 * 2 * (2 * 4096)  # bf16 gradients of the keys and values the last chunk sees
    # one block's work instead: its keys and values widened to the query heads, their gradients and the narrowed
    # ones (bf16), the queries' fp32 gradient
    block = 4096 * (2 * (4 * 4096 + 2 * 4096) + 4 * 4096)
    assert packed_peak - plain_peak >= whole_width - block


def test_key_blocks_are_planned_where_the_flash_kernel_runs(llama2):
    """On a T4 (compute capability 7.5) torch has no flash kernel, so a plain row's keys go at once there and the
    planner counts their whole-width gradients; on an A100 a block at a time."""
    values = {"training.max_seq_len": 65536, "training.attention_chunk_tokens": 4096, "adapter.lora_dropout": 0.0,
              "training.mlp_chunk_tokens": 4096, "training.offload_checkpoints": True, "data.packing": False,
              "training.compile_layers": "on"}
    spec = RunSpec().with_values(values)
    t4, a100 = (resolve(spec, Hardware.planned(lookup_gpu(name))) for name in ("T4", "A100-80GB"))
    assert not t4.key_blocks and a100.key_blocks
    t4_peak = estimate_memory(llama2, t4).phases["layer backward"].activations
    a100_peak = estimate_memory(llama2, a100).phases["layer backward"].activations
    assert t4_peak > a100_peak


def test_the_final_norm_backward_is_counted_whole_or_a_chunk_at_a_time():
    """Llama-3-8B, r=32 on every linear layer, 91,136 tokens, layers' backward a chunk at a time (the plan
    vs_reference's longest search ran on an H100): run whole, the final norm's backward (fp32, about 24 bytes per
    element at its peak) holds more than any layer's, and is the step's peak; a chunk at a time with the MLPs
    (engine/token_chunks.py) it holds its input and three gradients in bf16, and one chunk's own."""
    llama3 = model_shape(load_model_config("llama-3-8b"))
    common = {"training.max_seq_len": 91136, "training.attention_chunk_tokens": 4096, "adapter.lora_dropout": 0.0,
              "adapter.r": 32, "adapter.target_modules": "all-linear", "training.offload_checkpoints": True,
              "data.packing": False}
    whole, chunked = (estimate_memory(llama3, run({**common, "training.mlp_chunk_tokens": chunk}))
                      for chunk in (0, 4096))
    assert whole.phase == "final norm" and chunked.phase != "final norm"
    norm_whole, norm_chunked = (e.phases["final norm"].activations for e in (whole, chunked))
    assert norm_whole - norm_chunked == 4096 * (24 * 91136 - (4 * 2 * 91136 + 24 * 4096))
