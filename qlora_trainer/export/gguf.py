"""Export base + adapter as one GGUF file for llama.cpp and Ollama.

The merge is `merge`'s own (export/merge.py): the base is loaded as it was trained (NF4 by default), dequantized to
the compute dtype (the exact weights the adapter was trained against), and every adapted layer is merged in fp32 and
rounded once. Instead of safetensors in the transformers layout, the merged weights are then written through the
`gguf` package (llama.cpp's own Python library) in llama.cpp's layout:

- the architecture's hyperparameters under llama.cpp's keys (Llama and Mistral as `llama`, Qwen2 as `qwen2`);
- the tokenizer: every token with its score and type (padded with unused [PADn] tokens to the embedding's rows),
  the BPE merges, bos/eos/pad ids, whether bos/eos are added, and the chat template (through gguf.SpecialVocab);
- every tensor under llama.cpp's name (through gguf.TensorNameMap), with the `llama` arch's q/k rows permuted from
  transformers' rotate-half RoPE layout to llama.cpp's adjacent pairs, as llama.cpp's convert_hf_to_gguf.py does;
- `f16`: every 2D weight in float16, 1D tensors (norms, biases) in float32; `q8_0`: every 2D weight in llama.cpp's
  Q8_0 blocks (gguf.quants), 1D tensors in float32 (a weight whose rows are not a multiple of 32 stays float16, as
  in llama.cpp's converter).

Everything that can be refused (an architecture, RoPE scaling or tokenizer llama.cpp would read differently, an
--out that is taken) is refused in one line before the base loads. The file is written beside --out and renamed
into place only when complete, so --out is never left partial.
"""

import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from qlora_trainer.errors import UserError

try:
    import gguf
    from gguf import GGMLQuantizationType, LlamaFileType, MODEL_ARCH, MODEL_TENSOR
except ImportError:  # an optional extra: say how to get it in one line, not a traceback
    raise UserError("GGUF export needs the gguf package: pip install 'qlora-trainer[gguf]'") from None

from qlora_trainer.engine.base import load_model_config, load_tokenizer
from qlora_trainer.export.merge import check_adapter_dir, check_can_be_made, load_for_inference, merged_model
from qlora_trainer.spec import ModelConfig
from qlora_trainer.training.checkpoints import fsync_dir

# transformers model_type -> (family name, llama.cpp architecture); Mistral is llama.cpp's `llama` arch
FAMILIES: dict[str, tuple[str, MODEL_ARCH]] = {
    "llama": ("Llama", MODEL_ARCH.LLAMA),
    "mistral": ("Mistral", MODEL_ARCH.LLAMA),
    "qwen2": ("Qwen2", MODEL_ARCH.QWEN2),
}
OUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# byte-level BPE pre-tokenizers llama.cpp knows, by the regex that splits text before the byte-level mapping
# (tokenizer.ggml.pre names from llama.cpp's llama-vocab.cpp)
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEX_NAMES = {
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # Llama 3: digits in threes
    _WORDS + r"\p{N}" + _REST: "qwen2",  # Qwen2: digits one by one
}


@dataclass
class Vocabulary:
    """The tokenizer as llama.cpp reads it."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece-style, byte fallback)
    pre: str  # tokenizer.ggml.pre
    tokens: list[Union[str, bytes]]
    scores: list[float]
    types: list[int]
    special: gguf.SpecialVocab  # merges, special token ids, add_bos/add_eos, chat template


@dataclass
class PlannedTensor:
    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    source: Optional[str]  # the merged model's parameter; None for a tensor made here (rope_freqs)
    shape: tuple[int, ...]  # numpy (row-major) shape; GGUF lists it reversed
    qtype: GGMLQuantizationType
    rotary_heads: Optional[int] = None  # permute rows for llama.cpp's RoPE layout, with this many heads
    data: Optional[torch.Tensor] = field(default=None, repr=False)  # for a tensor made here


def export_gguf(model: str, adapter: Path, out: Path, out_type: str = "f16", quant: str = "nf4",
                overwrite: bool = False) -> Path:
    """Write base + adapter, merged as `merge` merges them, as one GGUF file of `out_type` (f16 or q8_0)."""
    if out_type not in OUT_TYPES:
        raise UserError(f"--type: {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    check_adapter_dir(adapter)
    target = check_out_file(out, model, adapter, overwrite)
    config = load_model_config(ModelConfig(path=model))
    arch = gguf_arch(config, model)
    rope = rope_parameters(config, arch, model)
    tokenizer = load_tokenizer(ModelConfig(path=model))
    with tempfile.TemporaryDirectory(prefix="qlora-trainer-gguf-") as scratch:
        vocab = read_vocabulary(tokenizer, config, model, Path(scratch))
        merged = merged_model(load_for_inference(model, quant), adapter, quant)
        plan = plan_tensors(merged, config, arch, rope, OUT_TYPES[out_type][0])
        write_atomically(target, out, overwrite, lambda path: write_gguf(
            path, merged, config, arch, rope, vocab, plan, OUT_TYPES[out_type][1], model))
    return out


def check_out_file(out: Path, model: str, adapter: Path, overwrite: bool) -> Path:
    """The file export may write, resolved: a new path, or with --overwrite an existing file. Never a folder, and
    never a path inside the adapter or the base model folder."""
    target = out.resolve()
    for what, path in (("adapter", adapter), ("base model", Path(model))):
        if path.exists() and path.resolve() in target.parents:
            raise UserError(f"--out: {out} is inside the {what} folder ({path}); write the GGUF file elsewhere")
    if target.is_dir():
        raise UserError(f"--out: {out} is a folder; give a file name such as {out / 'model.gguf'}")
    if target.exists() and not overwrite:
        raise UserError(f"--out: {out} exists; pass --overwrite to replace it")
    check_can_be_made(target, out, "give a path in a folder")
    return target


def gguf_arch(config: PretrainedConfig, model: str) -> MODEL_ARCH:
    """llama.cpp's architecture for the base, or a one-line refusal naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        families = ", ".join(dict.fromkeys(name for name, _ in FAMILIES.values()))
        raise UserError(f"--model: {model} is a {model_type or 'unknown'} model; GGUF export supports {families}")
    return FAMILIES[model_type][1]


def rope_parameters(config: PretrainedConfig, arch: MODEL_ARCH, model: str) -> dict:
    """The base's RoPE settings (rope_theta, rope_type, ...); a scaling llama.cpp's metadata cannot carry is refused."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    supported = ("default", "linear", "yarn") + (("llama3",) if arch == MODEL_ARCH.LLAMA else ())
    if params["rope_type"] not in supported:
        raise UserError(f"--model: {model} uses {params['rope_type']} RoPE scaling, which GGUF export does not "
                        f"write for this architecture (supported: {', '.join(supported)})")
    return params


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# --- tokenizer ---------------------------------------------------------------------------------------------------


def read_vocabulary(tokenizer, config: PretrainedConfig, model: str, scratch: Path) -> Vocabulary:
    """The tokenizer in llama.cpp's terms: byte-level BPE as "gpt2", sentencepiece-style BPE (byte fallback) or a
    sentencepiece model as "llama". The tokenizer is saved to `scratch` (with config.json, for special token ids it
    does not name), where gguf's own readers take it from. A tokenizer llama.cpp would split differently is refused."""
    n_vocab = config.vocab_size
    ids = tokenizer.get_vocab()
    if ids and max(ids.values()) >= n_vocab:
        raise UserError(f"--model: {model}'s tokenizer has ids up to {max(ids.values())}, beyond the model's "
                        f"vocab_size {n_vocab}")
    tokenizer.save_pretrained(scratch)
    config.to_json_file(scratch / "config.json")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    sentencepiece_file = Path(model) / "tokenizer.model"
    if bpe.get("type") == "BPE" and not bpe.get("byte_fallback") and decoder == "ByteLevel":
        pre = pre_tokenizer_name(spec.get("pre_tokenizer"), model)
        tokens, types = byte_level_tokens(tokenizer, n_vocab)
        vocab = Vocabulary("gpt2", pre, tokens, [0.0] * len(tokens), types,
                           gguf.SpecialVocab(scratch, load_merges=True, n_vocab=n_vocab))
    elif (sentencepiece_file.is_file() and find_spec("sentencepiece")) or (bpe.get("type") == "BPE"
                                                                          and bpe.get("byte_fallback")):
        tokens, scores, types = sentencepiece_tokens(sentencepiece_file, scratch, n_vocab, model)
        vocab = Vocabulary("llama", "default", tokens, scores, types,
                           gguf.SpecialVocab(scratch, load_merges=False, n_vocab=n_vocab))
    else:
        raise UserError(f"--model: {model}'s tokenizer ({bpe.get('type', 'no tokenizer.json')} model, "
                        f"{decoder or 'no'} decoder) is neither byte-level BPE nor sentencepiece-style; "
                        "GGUF export cannot describe it to llama.cpp")
    # what the tokenizer itself does, rather than a guess from its files
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab.special.add_special_token["bos"] = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    vocab.special.add_special_token["eos"] = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    if vocab.special.chat_template is None and getattr(tokenizer, "chat_template", None):
        vocab.special.chat_template = tokenizer.chat_template  # older gguf reads no chat_template.jinja
    return vocab


def pre_tokenizer_name(pre: Optional[dict], model: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer; refused where llama.cpp has none, since
    it would then split text otherwise than the model was trained on."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space") and pattern in SPLIT_REGEX_NAMES):
            return SPLIT_REGEX_NAMES[pattern]
    described = pre.get("type") if pre else "none"
    raise UserError(f"--model: {model}'s tokenizer splits text with a pre-tokenizer ({described}) that llama.cpp does "
                    "not know here (known: GPT-2 byte-level, Llama 3, Qwen2); the GGUF would tokenize differently")


def byte_level_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size: the token's byte-level text and type; ids the tokenizer lacks are unused [PADn]."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def sentencepiece_tokens(sentencepiece_file: Path, scratch: Path, n_vocab: int,
                         model: str) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of a sentencepiece-style tokenizer through gguf's readers: the sentencepiece model
    (true scores) where it and the sentencepiece package are there, else tokenizer.json (gguf.LlamaHfVocab, as
    llama.cpp's converter falls back to); padded with unused [PADn] tokens to vocab_size."""
    try:
        if sentencepiece_file.is_file() and find_spec("sentencepiece"):
            reader = gguf.SentencePieceVocab(sentencepiece_file.parent)
        else:
            reader = gguf.LlamaHfVocab(scratch)
        tokens, scores, types = (list(column) for column in zip(*reader.all_tokens()))
    except (FileNotFoundError, TypeError, ValueError) as err:
        raise UserError(f"--model: {model}'s sentencepiece-style tokenizer cannot be read for GGUF ({err})") from None
    if len(tokens) > n_vocab:
        raise UserError(f"--model: {model}'s tokenizer has {len(tokens)} tokens, more than vocab_size {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, [int(t) for t in types]


# --- tensors -----------------------------------------------------------------------------------------------------


def rotary_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows (or biases) from transformers' RoPE layout to llama.cpp's `llama` arch layout.

    transformers rotates dimension i of each head with dimension i + head_dim/2 (rotate-half); llama.cpp rotates
    adjacent pairs (2i, 2i+1). Within each head, row i of the first half moves to 2i and row i of the second half
    to 2i + 1, so that llama.cpp rotates the same pairs by the same angles."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3.1-style RoPE: per frequency, how much slower it turns than plain RoPE
    (llama.cpp divides each frequency by its factor), from transformers' own llama3 frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    theta = config.rope_parameters["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (plain / scaled.float()).float()


def plan_tensors(merged: nn.Module, config: PretrainedConfig, arch: MODEL_ARCH, rope: dict,
                 weight_type: GGMLQuantizationType) -> list[PlannedTensor]:
    """Every tensor of the GGUF in order: name, shape, type and whether its rows are permuted."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    plan = []
    if rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(config)
        plan.append(PlannedTensor(gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", None,
                                  tuple(factors.shape), GGMLQuantizationType.F32, data=factors))
    for source, param in merged.named_parameters():  # tied weights once, as transformers saves them
        found = names.get_type_and_name(source, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"--model: the merged model's {source} has no llama.cpp name; GGUF export cannot write it")
        kind, name = found
        shape = tuple(param.shape)
        if len(shape) < 2:
            qtype = GGMLQuantizationType.F32
        elif weight_type == GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0]:
            qtype = GGMLQuantizationType.F16  # rows Q8_0 cannot block; llama.cpp's converter does the same
        else:
            qtype = weight_type
        heads = None
        if arch == MODEL_ARCH.LLAMA and kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K):
            heads = n_heads if kind == MODEL_TENSOR.ATTN_Q else n_kv_heads
        plan.append(PlannedTensor(name, source, shape, qtype, heads))
    return plan


def tensor_layout(tensor: PlannedTensor) -> tuple[tuple[int, ...], np.dtype, int]:
    """(numpy shape, numpy dtype, bytes) of a planned tensor's data as written."""
    if tensor.qtype == GGMLQuantizationType.F32:
        return tensor.shape, np.dtype(np.float32), 4 * int(np.prod(tensor.shape))
    if tensor.qtype == GGMLQuantizationType.F16:
        return tensor.shape, np.dtype(np.float16), 2 * int(np.prod(tensor.shape))
    byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def tensor_data(tensor: PlannedTensor, merged_params: dict[str, nn.Parameter]) -> np.ndarray:
    """A planned tensor's data as written: permuted where planned, then converted (one rounding to f16, or Q8_0
    blocks from the float32 value). The merged parameter's memory is given back once read."""
    if tensor.source is None:
        data = tensor.data
    else:
        param = merged_params[tensor.source]
        data = param.detach().float().cpu()
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)  # this copy is ours: free it
    if tensor.rotary_heads is not None:
        data = rotary_permute(data, tensor.rotary_heads)
    array = data.contiguous().numpy()
    if tensor.qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32, copy=False)
    if tensor.qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, tensor.qtype)


# --- writing -----------------------------------------------------------------------------------------------------


def add_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, arch: MODEL_ARCH, rope: dict, vocab: Vocabulary,
                 file_type: LlamaFileType, model: str) -> None:
    """The hyperparameters under llama.cpp's keys, then the tokenizer."""
    writer.add_type("model")
    writer.add_name(Path(model).name or model)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types([int(t) for t in vocab.types])
    vocab.special.add_to_gguf(writer, quiet=True)


def write_gguf(path: Path, merged: nn.Module, config: PretrainedConfig, arch: MODEL_ARCH, rope: dict,
               vocab: Vocabulary, plan: list[PlannedTensor], file_type: LlamaFileType, model: str) -> None:
    """Write the GGUF to `path`, one tensor at a time (the header and tensor index first, from the plan), so that
    at most one converted tensor is held beside the merged model."""
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    add_metadata(writer, config, arch, rope, vocab, file_type, model)
    for tensor in plan:
        shape, dtype, nbytes = tensor_layout(tensor)
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=tensor.qtype)
    params = dict(merged.named_parameters())
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan:
            writer.write_tensor_data(tensor_data(tensor, params))
        writer.flush()
        for handle in writer.fout or []:
            os.fsync(handle.fileno())
    finally:
        writer.close()


def write_atomically(target: Path, out: Path, overwrite: bool, write) -> None:
    """Call write(temporary path beside `target`), then rename the complete file onto `target`; on any failure
    (or Ctrl-C) the temporary file is removed and `target` is as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "xb"):
            pass  # claims the name; the file gets the usual permissions (umask), not mkstemp's 0600
        write(tmp)
        if target.is_dir():
            raise UserError(f"--out: {out} became a folder while the GGUF was written; nothing was replaced")
        if target.exists() and not overwrite:
            raise UserError(f"--out: {out} appeared while the GGUF was written; pass --overwrite to replace it")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
