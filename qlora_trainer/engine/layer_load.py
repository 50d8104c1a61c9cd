"""Load a 4-bit base for FSDP without ever holding it whole on a GPU: the architecture is built with no weights,
then each tensor is read from the safetensors files onto the process's GPU, quantized there (the packed codes in
the compute dtype, `bnb_4bit_quant_storage`, so FSDP can shard them), and parked in host memory. FSDP2's
`fully_shard` later brings one decoder layer at a time back to the GPU to cut it into shards (engine/distributed.py
`wrap`), so a GPU holds at most one layer whole while loading, beside the quantization states, which FSDP does not
shard and which stay on the GPU. Every process reads the files itself (nothing is broadcast); each parks the whole
4-bit model in its host memory until the shards are cut (planner/distributed.py counts it).

The weights, their quantization and the modules are those `AutoModelForCausalLM.from_pretrained` gives (tested
tensor by tensor): the skeleton is transformers' own, its linears replaced by transformers' bitsandbytes quantizer,
each weight quantized by bitsandbytes' `Params4bit` as transformers does it. Where the files name tensors the model
does not have under those names (checkpoints transformers renames while loading), `layer_by_layer_names` says so
and the caller loads the usual way.
"""

import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor name in the folder's safetensors files -> the file that holds it."""
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            index.update({key: path for key in weights.keys()})
    return index


def skeleton(model_config: PretrainedConfig, bnb_config: BitsAndBytesConfig, compute_dtype: torch.dtype,
             attention: str, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The architecture with its parameters on the meta device, its buffers computed on the CPU, and its linears
    replaced by bitsandbytes' 4-bit ones as from_pretrained replaces them; and the transformers quantizer that did
    it (for the attributes it sets once the weights are in)."""
    from accelerate import init_empty_weights
    from transformers.quantizers import AutoHfQuantizer

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=compute_dtype, attn_implementation=attention,
                                                 trust_remote_code=trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, dtype=compute_dtype, device_map=None)
    return model, quantizer


def _tensor_names(model: nn.Module) -> list[str]:
    """The names of what the files must hold: parameters (one name each where tied, `tie_weights` makes the rest)
    and persistent buffers."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # tied name -> the name it copies
    names = [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in tied]
    return names + [name for name, _ in model.named_buffers() if not _is_non_persistent(model, name)]


def layer_by_layer_names(model: nn.Module, files: dict[str, Path]) -> Optional[str]:
    """None where every parameter and persistent buffer of `model` is in the files (`tensor_files`) under its own
    name; else the first name missing, which only transformers' renaming while loading would find."""
    return next((name for name in _tensor_names(model) if name not in files), None)


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(owner)._non_persistent_buffers_set


def load_layer_by_layer(model: nn.Module, quantizer, files: dict[str, Path], compute_dtype: torch.dtype,
                        device: torch.device, park: torch.device) -> None:
    """Every tensor of `model` (a `skeleton`) read from its file (`tensor_files`) onto `device`, the 4-bit linears'
    weights quantized there, and all parameters then moved to `park` (their quantization states stay on `device`);
    ties restored and the quantizer's finishing touches applied, as from_pretrained leaves the model."""
    import bitsandbytes as bnb

    kept = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    keep_fp32 = re.compile(rf"((^|\.)({'|'.join(map(re.escape, kept))})($|\.))") if kept else None
    by_file: dict[Path, list[str]] = {}
    for name in _tensor_names(model):
        by_file.setdefault(files[name], []).append(name)
    for path, keys in by_file.items():
        with safe_open(str(path), "pt", device=str(device)) as weights:
            for name in keys:
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                value = weights.get_tensor(name)
                old = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers[leaf]
                if isinstance(old, bnb.nn.Params4bit):
                    if issubclass(getattr(owner, "source_cls", nn.Linear), Conv1D):
                        value = value.T  # GPT-2 style Conv1D keeps its weight transposed
                    settings = {k: v for k, v in old.__dict__.items() if k != "module"}
                    packed = bnb.nn.Params4bit(value.to(compute_dtype), requires_grad=False, module=owner,
                                               **settings).to(device)
                    packed.data = packed.data.to(park)  # the quantization state stays on `device`
                    owner._parameters[leaf] = packed
                    del value
                    continue
                if value.is_floating_point():  # as from_pretrained casts: to the model's dtype, some kept in fp32
                    value = value.to(torch.float32 if keep_fp32 and keep_fp32.search(name) else compute_dtype)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(value.to(park), requires_grad=False)
                else:
                    owner._buffers[leaf] = value
    for module in model.modules():  # the buffers the constructor computed (rotary frequencies): on the GPU
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[leaf] = buffer.to(device)
    model.tie_weights()
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.eval()  # as from_pretrained returns it


def load_for_sharding(model_config: PretrainedConfig, folder: Path, bnb_config: BitsAndBytesConfig,
                      compute_dtype: torch.dtype, device: torch.device, attention: str,
                      trust_remote_code: bool) -> tuple[Optional[nn.Module], Optional[str]]:
    """The 4-bit base loaded tensor by tensor, parked in host memory for `fully_shard` (the module docstring); or
    (None, the name the files lack) where transformers would have to rename the files' tensors."""
    model, quantizer = skeleton(model_config, bnb_config, compute_dtype, attention, trust_remote_code)
    files = tensor_files(folder)
    missing = layer_by_layer_names(model, files)
    if missing:
        return None, missing
    load_layer_by_layer(model, quantizer, files, compute_dtype, device, park=torch.device("cpu"))
    return model, None

