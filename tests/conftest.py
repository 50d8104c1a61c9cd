"""Shared fixtures: tiny models built from a config and saved once per test session."""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (Liger-Kernel's fused loss, tests/test_fused_loss.py) run in Triton's interpreter; it
# must be chosen before anything imports triton. Nothing else here runs Triton kernels on the CPU (inductor emits C++
# there). With a GPU the kernels are compiled: the interpreter would run the GPU-only tests' kernels with its own
# rounding (and for minutes).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qlora_trainer.data.prepare import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from qlora_trainer.engine.base import DTYPES, LoadedBase, load_base
from qlora_trainer.engine.checkpointing import enable_activation_checkpointing
from qlora_trainer.spec import ModelConfig, QuantizationConfig

REPO = Path(__file__).resolve().parents[1]

TINY_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to count one two three four five",
    "hello world, this is a small text for a small tokenizer",
] * 20 + [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 20


def save_tiny_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained on a few lines, saved as a transformers fast tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TINY_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer GQA Llama (hidden 64) in bf16 safetensors with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


DEMO_MODEL_DIR = REPO / "demo" / "tiny-llama"
DEMO_DATA_DIR = REPO / "demo" / "data"


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The bundled demo's tokenizer (byte-level BPE with a chat template); tests that change it use a copy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def tiny_base(model_dir: Path, checkpointing: bool = False, quantization: QuantizationConfig = QuantizationConfig(),
              compute_dtype: str = "bfloat16", checkpointed_layers=None, offload: bool = False,
              **model_kwargs) -> LoadedBase:
    """A base loaded on the CPU as the engine loads it (NF4 by default), with our layer checkpointing if asked."""
    base = load_base(ModelConfig(path=str(model_dir), **model_kwargs), quantization, DTYPES[compute_dtype],
                     torch.device("cpu"))
    if checkpointing:
        enable_activation_checkpointing(base.model, checkpointed_layers, offload)
    return base
