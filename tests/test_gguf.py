"""GGUF export: the file reads back through gguf's own reader with llama.cpp's names, shapes, types, metadata and
tokenizer, and its tensors are the merged model's (as `merge` writes it) within f16 / Q8_0 rounding."""

import json
import math
import re
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'qlora-trainer[gguf]')")
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig
from transformers import PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import qlora_trainer.export.gguf as gguf_export
from conftest import DEMO_MODEL_DIR, TINY_TEXT, save_tiny_tokenizer
from qlora_trainer.errors import UserError
from qlora_trainer.export.gguf import export_gguf
from qlora_trainer.export.merge import merge
from tiny_models import make_adapter, save_tiny_model

# f16 keeps 11 significant bits: rounding to nearest moves a normal value by at most 2^-11 of itself, and a subnormal
# one (below 2^-14) by at most half the subnormal spacing, 2^-25. The merged weights are bf16 (8 significant bits),
# so most convert exactly; the bound is what f16 rounding allows.
F16_RELATIVE = 2.0 ** -11
F16_ABSOLUTE = 2.0 ** -25
Q8_BLOCK = 32

LAYER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def llama_cpp_name(key: str) -> str:
    """llama.cpp's name for a transformers Llama / Mistral / Qwen2 tensor, written out here rather than looked up."""
    if key in TOP_LEVEL:
        return TOP_LEVEL[key]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    assert match, key
    return f"blk.{match[1]}.{LAYER_PARTS[match[2]]}.{match[3]}"


def undo_rope_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a llama-arch q/k tensor back in transformers' order: within each head of d rows, transformers' row
    o = half * d/2 + j was written at 2j + half."""
    d = weight.shape[0] // n_heads
    source = [head * d + 2 * (o % (d // 2)) + o // (d // 2) for head in range(n_heads) for o in range(d)]
    return weight[source]


def save_tiny_mistral(folder: Path) -> Path:
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, sliding_window=None,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def save_sentencepiece_style_llama(folder: Path) -> Path:
    """A tiny Llama whose tokenizer is built as transformers' Llama / Mistral ones are: BPE over "▁"-joined text with
    byte fallback (<0x00> .. <0xFF>), adding <s> in front."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens)
    tokenizer.train_from_iterator(TINY_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-bases")
    return {"llama": tiny_llama_dir, "qwen2": save_tiny_model(root / "qwen2", "qwen2"),
            "mistral": save_tiny_mistral(root / "mistral"), "demo": DEMO_MODEL_DIR,
            "gpt2": save_tiny_model(root / "gpt2", "gpt2"), "spm": save_sentencepiece_style_llama(root / "spm")}


def _made_once(make):
    """`make(*key)`, remembered: each key is made once per module."""
    made = {}

    def get(*key):
        if key not in made:
            made[key] = make(*key)
        return made[key]
    return get


@pytest.fixture(scope="module")
def adapter_for(bases, tmp_path_factory):
    """adapter_for(arch): an all-linear LoRA with random non-zero weights on that NF4 base, made once per module."""
    root = tmp_path_factory.mktemp("gguf-adapters")
    return _made_once(lambda arch: make_adapter(bases[arch], root / arch))


@pytest.fixture(scope="module")
def merged_dir(bases, adapter_for, tmp_path_factory):
    """merged_dir(arch): `merge`'s output for that base and adapter, the reference every GGUF is compared with."""
    root = tmp_path_factory.mktemp("gguf-merged")
    return _made_once(lambda arch: merge(str(bases[arch]), adapter_for(arch), root / arch))


@pytest.fixture(scope="module")
def exported(bases, adapter_for, tmp_path_factory):
    """exported(arch, type): the GGUF export of that base and adapter, made once per module."""
    root = tmp_path_factory.mktemp("gguf-out")

    def export(arch: str, out_type: str) -> Path:
        out = root / f"{arch}-{out_type}.gguf"
        assert export_gguf(str(bases[arch]), adapter_for(arch), out, out_type) == out
        return out
    return _made_once(export)


def merged_weights(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key).float().numpy() for key in f.keys()}


def field(reader: GGUFReader, key: str):
    """A metadata value as Python: a str, a number or a list of them."""
    found = reader.fields[key]
    types = list(found.types)
    if hasattr(found, "contents"):
        return found.contents()
    values = [found.parts[i] for i in found.data]  # gguf < 0.11: decode the raw parts
    if types[-1] == GGUFValueType.STRING:
        values = [bytes(v).decode() for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if types[0] == GGUFValueType.ARRAY else values[0]


def gguf_values(tensor) -> np.ndarray:
    """A GGUF tensor's values as float32 in numpy (row-major) order, whatever its type."""
    if tensor.tensor_type == GGMLQuantizationType.Q8_0:
        return dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(tensor.data).astype(np.float32)


def q8_0_bound(weight: np.ndarray) -> np.ndarray:
    """Per value, the most Q8_0 may move it. Each block of 32 along a row stores d = max|w| / 127 as f16 and
    q = round(w / d) in [-127, 127]: |q d - w| <= d / 2, and the f16 rounding of d (relative 2^-11, or 2^-25 below
    f16's normal range) adds at most 127 |d16 - d|. float32 arithmetic (w * (1/d)) adds a few ulps of max|w|."""
    blocks = np.abs(weight.reshape(-1, Q8_BLOCK))
    amax = blocks.max(axis=1, keepdims=True)
    d = amax / 127
    bound = d / 2 + 127 * (F16_RELATIVE * d + F16_ABSOLUTE) + amax * 2.0 ** -20
    return np.broadcast_to(bound, blocks.shape).reshape(weight.shape)


CASES = [("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"), ("mistral", "f16"),
         ("demo", "f16"), ("demo", "q8_0")]


@pytest.mark.parametrize("arch, out_type", CASES, ids=["-".join(case) for case in CASES])
def test_gguf_holds_the_merged_model_in_llama_cpp_layout(bases, exported, merged_dir, arch, out_type):
    path = exported(arch, out_type)
    reader = GGUFReader(path)
    config = AutoConfig.from_pretrained(bases[arch])
    gguf_arch = {"qwen2": "qwen2"}.get(config.model_type, "llama")  # Mistral is llama.cpp's llama arch

    # metadata: the config's hyperparameters under llama.cpp's keys
    assert field(reader, "general.architecture") == gguf_arch
    assert field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[out_type]  # llama.cpp's MOSTLY_F16 / _Q8_0
    assert field(reader, f"{gguf_arch}.block_count") == config.num_hidden_layers
    assert field(reader, f"{gguf_arch}.embedding_length") == config.hidden_size
    assert field(reader, f"{gguf_arch}.feed_forward_length") == config.intermediate_size
    assert field(reader, f"{gguf_arch}.attention.head_count") == config.num_attention_heads
    assert field(reader, f"{gguf_arch}.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, f"{gguf_arch}.context_length") == config.max_position_embeddings
    assert field(reader, f"{gguf_arch}.vocab_size") == config.vocab_size
    assert math.isclose(field(reader, f"{gguf_arch}.rope.freq_base"), config.rope_parameters["rope_theta"])
    assert math.isclose(field(reader, f"{gguf_arch}.attention.layer_norm_rms_epsilon"), config.rms_norm_eps,
                        rel_tol=1e-6)  # stored as float32

    # tensors: exactly the merged model's, under llama.cpp's names, shapes reversed as GGUF lists them
    want = merged_weights(merged_dir(arch))
    tensors = {t.name: t for t in reader.tensors}
    assert len(reader.tensors) == len(want)
    assert sorted(tensors) == sorted(llama_cpp_name(key) for key in want)
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    for key, weight in want.items():
        tensor = tensors[llama_cpp_name(key)]
        assert list(reversed(tensor.shape.tolist())) == list(weight.shape), key
        if weight.ndim == 1:
            assert tensor.tensor_type == GGMLQuantizationType.F32, key
        else:
            assert tensor.tensor_type == {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}[
                out_type], key
        got = gguf_values(tensor).reshape(weight.shape)
        if gguf_arch == "llama" and ".self_attn.q_proj." in key:
            got = undo_rope_permutation(got, n_heads)
        if gguf_arch == "llama" and ".self_attn.k_proj." in key:
            got = undo_rope_permutation(got, n_kv_heads)
        error = np.abs(got - weight)
        if weight.ndim == 1:
            assert (got == weight).all(), key  # bf16 -> f32 is exact
        elif out_type == "f16":
            assert (error <= F16_RELATIVE * np.abs(weight) + F16_ABSOLUTE).all(), (key, error.max())
        else:
            assert (error <= q8_0_bound(weight)).all(), (key, error.max())
            assert error.max() > 0  # it is quantized, not a copy

    # tokenizer: byte-level BPE as llama.cpp's gpt2 model, padded with unused tokens to the embedding's rows. The
    # pre-tokenizer is the one transformers splits with: ByteLevel's own (GPT-2's) regex, except that transformers
    # loads a Qwen2 model's tokenizer as Qwen2Tokenizer, which splits with Qwen2's regex
    tokenizer = AutoTokenizer.from_pretrained(bases[arch])
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == {"qwen2": "qwen2"}.get(arch, "gpt-2")
    assert len(tokens) == len(types) == len(field(reader, "tokenizer.ggml.scores")) == config.vocab_size
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == token for token, i in vocab.items())
    assert all(tokens[i] == f"[PAD{i}]" and types[i] == TokenType.UNUSED
               for i in range(len(vocab), config.vocab_size))
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id,
                "unknown": tokenizer.unk_token_id}
    for kind, token_id in specials.items():
        assert field(reader, f"tokenizer.ggml.{kind}_token_id") == token_id
        assert types[token_id] == TokenType.CONTROL
    assert sum(t == TokenType.NORMAL for t in types) == len(vocab) - 4
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # these tokenizers add no <s>
    if arch == "demo":
        assert field(reader, "tokenizer.chat_template") == (DEMO_MODEL_DIR / "chat_template.jinja").read_text()


def test_llama_arch_q_and_k_give_llama_cpp_the_same_attention_scores(bases, exported, merged_dir):
    """llama.cpp's llama arch rotates adjacent pairs (2i, 2i+1) by pos * theta_i; transformers rotates i with
    i + d/2. With the GGUF's permuted q/k weights, llama.cpp's RoPE gives the scores transformers' gives."""
    config = AutoConfig.from_pretrained(bases["llama"])
    reader = GGUFReader(exported("llama", "f16"))
    tensors = {t.name: t for t in reader.tensors}
    want = merged_weights(merged_dir("llama"))
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // n_heads
    theta = config.rope_parameters["rope_theta"] ** (-np.arange(0, d, 2) / d)  # (d/2,)

    def rope_transformers(x, pos):  # x: (heads, d)
        angle = np.concatenate([pos * theta, pos * theta])
        rotated = np.concatenate([-x[:, d // 2:], x[:, :d // 2]], axis=1)
        return x * np.cos(angle) + rotated * np.sin(angle)

    def rope_llama_cpp(x, pos):
        even, odd = x[:, 0::2], x[:, 1::2]
        cos, sin = np.cos(pos * theta), np.sin(pos * theta)
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    rng = np.random.default_rng(0)
    x_q, x_k = rng.standard_normal(config.hidden_size), rng.standard_normal(config.hidden_size)
    for layer in range(config.num_hidden_layers):
        wq, wk = (want[f"model.layers.{layer}.self_attn.{p}_proj.weight"].astype(np.float64) for p in "qk")
        gq, gk = (gguf_values(tensors[f"blk.{layer}.attn_{p}.weight"]).astype(np.float64) for p in "qk")
        for pos_q, pos_k in ((5, 2), (17, 17), (40, 3)):
            hf = (rope_transformers((wq @ x_q).reshape(n_heads, d), pos_q),
                  rope_transformers((wk @ x_k).reshape(n_kv, d), pos_k))
            cpp = (rope_llama_cpp((gq @ x_q).reshape(n_heads, d), pos_q),
                   rope_llama_cpp((gk @ x_k).reshape(n_kv, d), pos_k))
            group = n_heads // n_kv
            scores_hf = np.array([hf[0][h] @ hf[1][h // group] for h in range(n_heads)])
            scores_cpp = np.array([cpp[0][h] @ cpp[1][h // group] for h in range(n_heads)])
            # the GGUF's weights are the merged bf16 ones exactly, except those below f16's normal range (2^-14),
            # which f16 rounding moves by at most 2^-25: that moves a score by far less than 1e-6 of the largest
            assert np.allclose(scores_cpp, scores_hf, rtol=0, atol=1e-6 * np.abs(scores_hf).max())


def test_sentencepiece_style_tokenizer_is_written_as_llama_cpp_llama_model(bases, exported):
    reader = GGUFReader(exported("spm", "f16"))
    tokenizer = AutoTokenizer.from_pretrained(bases["spm"])
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == 384
    assert tokens[0x41 + 3] == "<0x41>" and types[0x41 + 3] == TokenType.BYTE
    assert types[tokenizer.bos_token_id] == TokenType.CONTROL and tokens[tokenizer.bos_token_id] == "<s>"
    assert all(types[i] == TokenType.UNUSED for i in range(len(tokenizer.get_vocab()), 384))
    assert field(reader, "tokenizer.ggml.add_bos_token") is True  # this tokenizer adds <s>, as Llama 2's does
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "tokenizer.ggml.merges" not in reader.fields


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def test_rope_scaling_is_written_as_llama_cpp_reads_it_and_one_it_cannot_carry_is_refused(adapter_for, tmp_path):
    """Llama 3.1-style RoPE as llama.cpp's rope_freqs tensor (llama.cpp divides each frequency by its factor, so
    plain / factor must be transformers' scaled frequency), linear scaling as metadata, dynamic NTK refused."""
    found = {}
    for rope_type, rope in ROPE_SCALINGS.items():
        folder = tmp_path / rope_type
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, rope_parameters=rope)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
        save_tiny_tokenizer(folder)
        out = export_gguf(str(folder), make_adapter(folder, tmp_path / f"{rope_type}-adapter"), tmp_path / "x.gguf",
                          overwrite=True)
        reader = GGUFReader(out)
        found[rope_type] = ({t.name: np.array(t.data) for t in reader.tensors},
                            {key: field(reader, key) for key in reader.fields if ".rope." in key})

    # transformers' scaled frequencies, in float32 as it computes them
    scaled = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path / "llama3")).inv_freq.numpy()

    tensors, metadata = found["llama3"]
    assert len(tensors) == 21 + 1 and tensors["rope_freqs.weight"].dtype == np.float32
    d = 64 // 4
    plain = 1.0 / (500000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    np.testing.assert_allclose(plain / tensors["rope_freqs.weight"], scaled, rtol=1e-6)
    assert metadata["llama.rope.freq_base"] == 500000.0 and "llama.rope.scaling.type" not in metadata
    tensors, metadata = found["linear"]
    assert len(tensors) == 21 and metadata["llama.rope.scaling.type"] == "linear"
    assert metadata["llama.rope.scaling.factor"] == 2.0

    folder = tmp_path / "dynamic"
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=384, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    with pytest.raises(UserError, match=r"^--model: .* uses dynamic RoPE scaling, .*\(supported: default, linear, "):
        export_gguf(str(folder), adapter_for("llama"), tmp_path / "dynamic.gguf")
    assert not (tmp_path / "dynamic.gguf").exists()


def test_an_unsupported_architecture_is_refused_in_one_line_before_the_base_loads(bases, adapter_for, tmp_path,
                                                                                 monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the architecture was checked")

    monkeypatch.setattr(gguf_export, "load_for_inference", must_not_load)
    with pytest.raises(UserError) as refused:
        export_gguf(str(bases["gpt2"]), adapter_for("llama"), tmp_path / "model.gguf")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--model: {bases['gpt2']} is a gpt2 model")
    assert all(family in message for family in ("Llama", "Mistral", "Qwen2"))
    assert refused.value.exit_code == 2
    assert not any(tmp_path.iterdir())


def test_an_existing_out_is_refused_without_overwrite_and_a_failed_export_leaves_it_as_it_was(bases, adapter_for,
                                                                                             tmp_path, monkeypatch):
    model, adapter = str(bases["llama"]), adapter_for("llama")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an earlier file")
    with pytest.raises(UserError, match=r"^--out: .*model.gguf exists; pass --overwrite to replace it$"):
        export_gguf(model, adapter, out)
    with pytest.raises(UserError, match=r"^--out: .* is a folder"):
        export_gguf(model, adapter, tmp_path, overwrite=True)
    with pytest.raises(UserError, match=r"^--out: .* is inside the adapter folder"):
        export_gguf(model, adapter, adapter / "model.gguf")
    with pytest.raises(UserError, match=r"^--type: 'q4_0' is not one of f16, q8_0$"):
        export_gguf(model, adapter, out, "q4_0", overwrite=True)
    assert out.read_bytes() == b"an earlier file" and sorted(tmp_path.iterdir()) == [out]

    # a failure halfway through the tensors (or Ctrl-C) leaves no partial file and the earlier one as it was
    written = []
    original = GGUFWriter.write_tensor_data

    def fail_on_the_third(self, tensor, *args, **kwargs):
        written.append(tensor.nbytes)
        if len(written) == 3:
            raise KeyboardInterrupt
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", fail_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, adapter, out, overwrite=True)
    assert len(written) == 3
    assert out.read_bytes() == b"an earlier file" and sorted(tmp_path.iterdir()) == [out]

    monkeypatch.undo()
    export_gguf(model, adapter, out, overwrite=True)
    assert len(GGUFReader(out).tensors) == len(AutoModelForCausalLM.from_pretrained(model).state_dict())
    assert sorted(tmp_path.iterdir()) == [out]


@pytest.mark.skipif(find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed: logits are compared with llama.cpp only where it is")
def test_llama_cpp_gives_the_merged_models_logits(exported, merged_dir):
    import llama_cpp

    tokens = list(range(4, 36))
    llm = llama_cpp.Llama(model_path=str(exported("llama", "f16")), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(input_ids=torch.tensor([tokens])).logits[0].numpy()
    # llama.cpp on the CPU multiplies f16 weights with activations rounded to f16 (2^-11 relative) and sums in
    # another order; over 2 layers that stays well inside 2% of the largest logit
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.02 * scale, (np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
