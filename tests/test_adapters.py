"""Target-module resolution across architectures, adapter parameter counts, dtypes and the NF4 base."""

import re

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config)
from transformers.pytorch_utils import Conv1D

from qlora_trainer.engine import adapters
from qlora_trainer.spec import AdapterConfig, ModelConfig, QuantizationConfig
from qlora_trainer.errors import ConfigError, UserError
from qlora_trainer.engine.base import load_model_config
from conftest import save_tiny_tokenizer, tiny_base
from tiny_models import ADAPTER_WEIGHT_STD, make_adapter, save_tiny_model

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
ARCHITECTURES = {
    "llama": (LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **SMALL),
              ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "mistral": (MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **SMALL),
                ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "qwen2": (Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **SMALL),
              ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "gemma": (GemmaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=1, head_dim=16, **SMALL),
              ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "phi3": (Phi3Config(hidden_size=64, intermediate_size=128, pad_token_id=0, **SMALL),
             ["o_proj", "qkv_proj"], ["down_proj", "gate_up_proj"]),
    "gpt2": (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
             ["attn.c_proj", "c_attn"], ["c_fc", "mlp.c_proj"]),
    "gpt_neox": (GPTNeoXConfig(hidden_size=64, intermediate_size=128, **SMALL),
                 ["dense", "query_key_value"], ["dense_4h_to_h", "dense_h_to_4h"]),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shorthands_resolve_by_inspection_and_peft_wraps_exactly_those_layers(arch):
    config, attn_keys, mlp_keys = ARCHITECTURES[arch]
    meta = adapters.meta_model(config)
    attn = adapters.resolve_targets(meta, "attn")
    mlp = adapters.resolve_targets(meta, "mlp")
    every = adapters.resolve_targets(meta, "all-linear")
    assert attn[0] == attn_keys and mlp[0] == mlp_keys
    assert len(every[1]) == len(attn[1]) + len(mlp[1])
    assert all(layer.kind == "attn" for layer in attn[1]) and all(layer.kind == "mlp" for layer in mlp[1])

    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(real, adapters.peft_config(AdapterConfig(r=4), attn[0]))
    wrapped = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A") and not isinstance(module, torch.nn.ModuleDict)}
    assert wrapped == {layer.name for layer in attn[1]}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(adapters.adapter_param_count("lora", 4, l.d_in, l.d_out) for l in attn[1])


def test_gpt2_conv1d_shapes_are_read_transposed():
    meta = adapters.meta_model(ARCHITECTURES["gpt2"][0])
    _, layers = adapters.resolve_targets(meta, ["c_attn"])
    assert {(l.d_in, l.d_out) for l in layers} == {(64, 192)}
    assert all(isinstance(meta.get_submodule(l.name), Conv1D) for l in layers)


def test_unknown_target_and_oversized_rank_are_config_errors():
    meta = adapters.meta_model(ARCHITECTURES["llama"][0])
    with pytest.raises(ConfigError, match="adapter.target_modules: 'qkv' matches no linear layer"):
        adapters.resolve_targets(meta, ["qkv"])
    _, layers = adapters.resolve_targets(meta, "attn")
    with pytest.raises(ConfigError, match=r"adapter.r: 64 exceeds the smaller dimension \(32\)"):
        adapters.check_rank(AdapterConfig(r=64), layers)  # k_proj is 64 -> 32 (2 KV heads of 16)
    adapters.check_rank(AdapterConfig(r=32), layers)


@pytest.fixture(scope="module")
def nf4_base(tiny_llama_dir):
    def load(**model_kwargs):
        return tiny_base(tiny_llama_dir, checkpointing=True, **model_kwargs).model
    return load


@pytest.mark.parametrize(
    "adapter",
    # dropout 0: LoHa/LoKr's module dropout skips a whole adapter at random, which would leave it without a gradient
    [AdapterConfig(type="lora", r=8, lora_dropout=0.0), AdapterConfig(type="lora", r=4, use_dora=True, lora_dropout=0.0),
     AdapterConfig(type="loha", r=4, lora_dropout=0.0), AdapterConfig(type="lokr", r=4, lora_dropout=0.0),
     AdapterConfig(type="lokr", r=2, lora_dropout=0.0)],
    ids=["lora", "dora", "loha", "lokr-r4", "lokr-r2"],
)
def test_peft_count_matches_formula_on_nf4_base(nf4_base, tiny_llama_dir, adapter):
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "all-linear")
    peft_model, summary = adapters.attach_adapter(nf4_base(), adapter, keys, layers)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert summary.trainable_params == peft_trainable == summary.formula_params > 0
    # the adapted model starts equal to the base (B / the second factor is zero) and runs forward and backward
    x = torch.randint(0, 300, (1, 16))
    with peft_model.disable_adapter():
        base_logits = peft_model(input_ids=x).logits
    logits = peft_model(input_ids=x).logits
    torch.testing.assert_close(logits.float(), base_logits.float(), rtol=0, atol=2e-2)
    logits.float().sum().backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_nf4_layers_and_adapter_dtype(nf4_base, tiny_llama_dir, dtype, torch_dtype):
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "all-linear")
    peft_model, _ = adapters.attach_adapter(nf4_base(), AdapterConfig(r=8, dtype=dtype), keys, layers)
    for layer in layers:
        base_layer = peft_model.get_base_model().get_submodule(layer.name).get_base_layer()
        assert isinstance(base_layer, bnb.nn.Linear4bit)
        assert base_layer.weight.quant_type == "nf4" and base_layer.weight.dtype == torch.uint8
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch_dtype for p in trainable)
    causal_lm = peft_model.get_base_model()
    assert causal_lm.model.embed_tokens.weight.dtype == torch.bfloat16  # not upcast to fp32
    assert causal_lm.lm_head.weight.dtype == torch.bfloat16
    assert causal_lm.model.norm.weight.dtype == torch.bfloat16


def test_upcast_non_quantized_on_request(nf4_base):
    model = nf4_base(upcast_non_quantized=True)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # quantized weights untouched


def test_partial_checkpointing_recomputes_only_the_first_layers_with_the_same_gradients(tiny_llama_dir):
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "attn")
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    gradients = {}
    for checkpointed in (None, 1, 0):
        base = tiny_base(tiny_llama_dir, checkpointing=True, checkpointed_layers=checkpointed).model
        torch.manual_seed(0)
        peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, lora_dropout=0.0), keys, layers)
        peft_model.train()
        runs = [0, 0]
        for index, layer in enumerate(base.model.layers):
            layer.self_attn.register_forward_hook(lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
        peft_model(input_ids=x).logits.float().square().mean().backward()
        expected = {None: [2, 2], 1: [2, 1], 0: [1, 1]}[checkpointed]  # a checkpointed layer runs again in backward
        assert runs == expected
        gradients[checkpointed] = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
    for checkpointed in (1, 0):
        for got, want in zip(gradients[checkpointed], gradients[None]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_layers_give_the_gradients_of_no_checkpointing(tiny_llama_dir, dropout):
    """Our reentrant checkpoint (engine/checkpointing.py), inputs on the GPU or offloaded, against no checkpointing at all, dropout
    included (the forward's RNG state is replayed in the recomputation)."""
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "all-linear")
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    gradients = {}
    for mode in ("none", "kept", "offloaded"):
        base = tiny_base(tiny_llama_dir, checkpointing=mode != "none", offload=mode == "offloaded").model
        torch.manual_seed(0)
        peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, lora_dropout=dropout), keys, layers)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # a non-zero B, so that A gets a gradient too
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
        peft_model.train()
        runs = [0, 0]
        for index, layer in enumerate(base.model.layers):
            layer.self_attn.register_forward_hook(lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
        torch.manual_seed(2)
        peft_model(input_ids=x).logits.float().square().mean().backward()
        assert runs == ([1, 1] if mode == "none" else [2, 2])  # forward, then the recomputation in backward
        gradients[mode] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(gradients["none"][n].abs().sum() > 0 for n in gradients["none"])
    for mode in ("kept", "offloaded"):
        assert gradients[mode].keys() == gradients["none"].keys()
        for name, got in gradients[mode].items():
            torch.testing.assert_close(got, gradients["none"][name])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.mark.parametrize("adapter_type", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_saved_adapter_loads_onto_the_4bit_base_with_the_logits_it_was_saved_with(tiny_llama_dir, gpt2_dir,
                                                                                   tmp_path, arch, adapter_type):
    model_dir = {"llama": tiny_llama_dir, "gpt2": gpt2_dir}[arch]
    base = tiny_base(model_dir).model
    keys, layers = adapters.resolve_targets(base, "all-linear")
    trained, _ = adapters.attach_adapter(base, AdapterConfig(type=adapter_type, r=4, lora_dropout=0.0), keys, layers)
    generator = torch.Generator().manual_seed(0)
    for param in trained.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * ADAPTER_WEIGHT_STD[adapter_type]
    trained.eval()
    x = torch.randint(0, 300, (1, 16), generator=generator)
    with torch.no_grad():
        saved_logits = trained(input_ids=x).logits
        with trained.disable_adapter():
            base_logits = trained(input_ids=x).logits
    trained.save_pretrained(tmp_path)

    loaded = adapters.load_adapter(tiny_base(model_dir).model, tmp_path)
    with torch.no_grad():
        loaded_logits = loaded(input_ids=x).logits
    assert torch.equal(loaded_logits, saved_logits)  # the same layers, weights and 4-bit treatment as in training
    assert not torch.equal(loaded_logits, base_logits)
    assert torch.equal(loaded.unload()(input_ids=x).logits, base_logits)  # unload gives back the base as it was


def test_an_adapter_of_another_model_is_a_one_line_user_error(tiny_llama_dir, tmp_path):
    # same layer shapes, one decoder layer more: peft alone would load it and leave layer 2 without trained weights
    deeper = LlamaConfig.from_pretrained(tiny_llama_dir)
    deeper.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(deeper).to(torch.bfloat16).save_pretrained(tmp_path / "deeper")
    save_tiny_tokenizer(tmp_path / "deeper")
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match=r"does not fit this base model: it has no .*layers\.2\..*; use the base"):
        adapters.load_adapter(tiny_base(tmp_path / "deeper").model, adapter_dir)


def test_usability_note_says_before_training_where_an_adapter_will_not_load():
    llama, gpt2 = ARCHITECTURES["llama"][0], ARCHITECTURES["gpt2"][0]
    for adapter_type, quant_mode, config in [("lora", "nf4", gpt2), ("lora", "none", gpt2), ("loha", "none", llama),
                                             ("lokr", "int8", llama)]:
        assert adapters.usability_note(adapter_type, quant_mode, config) is None
    assert adapters.usability_note("loha", "nf4", llama) == (
        "adapter.type: plain peft cannot load this LoHa adapter onto the 4-bit base (it sizes them from the packed "
        "weights); qlora-trainer generate and merge can, and the merged model loads anywhere")
    assert "onto the 16-bit base (it has no LoKr for Conv1D layers);" in adapters.usability_note("lokr", "int8", gpt2)
    assert "onto the 4-bit base (it sizes them from the packed weights) nor the 16-bit base" in \
        adapters.usability_note("lokr", "fp4", gpt2)
    message = ("adapter.type: peft's LoKr cannot wrap Conv1D layers (transformer.h.0.attn.c_attn) on a 16-bit base; "
               "use adapter.type lora, or quantization.mode nf4, fp4 or int8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        adapters.usability_note("lokr", "none", gpt2)
    # training such a combination stops with a ConfigError too, not peft's TypeError
    real = AutoModelForCausalLM.from_config(gpt2)
    keys, layers = adapters.resolve_targets(real, "all-linear")
    with pytest.raises(ConfigError, match=r"^adapter.type: peft's LoHa cannot wrap Conv1D layers \(transformer"):
        adapters.attach_adapter(real, AdapterConfig(type="loha", r=4), keys, layers)


def test_plain_peft_fails_where_usability_note_says_so(tiny_llama_dir, gpt2_dir, tmp_path):
    """Pins peft's own limits behind the notes above: when peft lifts one, this fails and the note should change."""
    x = torch.randint(0, 300, (1, 8))
    llama_loha = make_adapter(tiny_llama_dir, tmp_path / "llama-loha", "loha")
    with pytest.raises(RuntimeError, match="size mismatch"):  # sized from the packed 4-bit storage
        PeftModel.from_pretrained(tiny_base(tiny_llama_dir).model, str(llama_loha))
    sixteen_bit = tiny_base(tiny_llama_dir, quantization=QuantizationConfig(mode="none")).model
    PeftModel.from_pretrained(sixteen_bit, str(llama_loha))(input_ids=x)  # fine on the 16-bit Llama
    gpt2_lokr = make_adapter(gpt2_dir, tmp_path / "gpt2-lokr", "lokr")
    with pytest.raises(RuntimeError, match="is invalid for input of size"):  # loads, then cannot reshape its delta
        PeftModel.from_pretrained(tiny_base(gpt2_dir).model, str(gpt2_lokr))(input_ids=x)
    with pytest.raises(TypeError, match="Conv1D'> not supported"):
        PeftModel.from_pretrained(tiny_base(gpt2_dir, quantization=QuantizationConfig(mode="none")).model,
                                  str(gpt2_lokr))


def test_the_first_checkpointed_layer_trains_without_a_gradient_for_the_frozen_embeddings(tiny_llama_dir):
    """The checkpoint's output requires grad through its own anchor, not through the embeddings' output: that output
    is not kept for backward and gets no gradient, and the first layer's adapter still gets its gradients (equal to
    those of no checkpointing: test_checkpointed_layers_give_the_gradients_of_no_checkpointing)."""
    meta = adapters.meta_model(load_model_config(ModelConfig(path=str(tiny_llama_dir))))
    keys, layers = adapters.resolve_targets(meta, "attn")
    base = tiny_base(tiny_llama_dir, checkpointing=True).model
    peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, lora_dropout=0.0), keys, layers)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    peft_model.train()
    embedded = []
    base.get_input_embeddings().register_forward_hook(lambda _m, _i, out: embedded.append(out))
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=x).logits.float().square().mean().backward()
    assert not embedded[0].requires_grad and embedded[0].grad is None
    first = base.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.grad.abs().sum() > 0 and first.lora_B["default"].weight.grad.abs().sum() > 0
