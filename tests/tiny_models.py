"""Tiny Qwen2 and GPT-2 bases (as conftest's tiny Llama) and adapters with random non-zero weights, for export tests."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PretrainedConfig, Qwen2Config

from conftest import save_tiny_tokenizer, tiny_base
from qlora_trainer.engine import adapters
from qlora_trainer.spec import AdapterConfig, QuantizationConfig

# Qwen2: q/k/v biases and a hidden size unlike the tiny Llama's, so a Llama adapter does not fit it.
# GPT-2: Conv1D layers, a square attn.c_proj, tied embeddings.
CONFIGS: dict[str, PretrainedConfig] = {
    "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3),
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=384, n_positions=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3),
}

# scale of the random adapter weights: each type's update then moves the logits well past bf16 rounding
ADAPTER_WEIGHT_STD = {"lora": 0.05, "loha": 0.2, "lokr": 0.1}


def save_tiny_model(folder: Path, arch: str) -> Path:
    """A 2-layer model of `arch` in bf16 safetensors with its tokenizer."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch]).to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def make_adapter(model_dir: Path, out_dir: Path, adapter_type: str = "lora", seed: int = 1,
                 quant_mode: str = "nf4") -> Path:
    """An all-linear adapter with random non-zero weights, as training on that base would leave it."""
    base = tiny_base(model_dir, quantization=QuantizationConfig(mode=quant_mode)).model
    keys, layers = adapters.resolve_targets(base, "all-linear")
    peft_model, _ = adapters.attach_adapter(base, AdapterConfig(type=adapter_type, r=4, lora_alpha=8), keys, layers)
    generator = torch.Generator().manual_seed(seed)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * ADAPTER_WEIGHT_STD[adapter_type]
    peft_model.save_pretrained(out_dir)
    return out_dir
