"""Load the frozen base model: NF4 / FP4 / 8-bit / 16-bit, compute dtype, tokenizer, gradient checkpointing."""

from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_trainer.config import ModelConfig, QuantizationConfig
from qlora_trainer.errors import ConfigError, UserError
from qlora_trainer.offload import layer_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedBase:
    model: nn.Module
    tokenizer: object
    compute_dtype: torch.dtype
    device: torch.device


def pick_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the device supports it, fp16 on GPUs without it (T4, compute capability < 8.0)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"quantization.compute_dtype: bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                "use float16 or auto"
            )
        return dtype
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def check_model_folder(path: str) -> None:
    """A local model folder must hold config.json and safetensors weights; hub names are passed through."""
    folder = Path(path)
    if not folder.exists():
        if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
            return  # looks like a hub name (org/model); from_pretrained reports whether it is reachable
        raise UserError(f"model.path: {path} does not exist; give a local model folder with config.json")
    if not folder.is_dir():
        raise UserError(f"model.path: {path} is a file; give the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise UserError(f"model.path: {path} has no config.json; give a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"model.path: {path} has no *.safetensors weights (only safetensors are loaded)")


def load_model_config(model: ModelConfig) -> PretrainedConfig:
    """The transformers config of the base, read without loading weights."""
    check_model_folder(model.path)
    try:
        return AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.path: cannot read the config of {model.path}: {str(err).splitlines()[0]}") from None


def quantization_config(quant: QuantizationConfig, compute_dtype: torch.dtype) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes settings for the base, or None for a plain 16-bit base."""
    if quant.mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.mode,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(model: ModelConfig):
    """The tokenizer beside the model (or at model.tokenizer_path), with a pad token."""
    path = model.tokenizer_path or model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        key = "model.tokenizer_path" if model.tokenizer_path else "model.path"
        raise UserError(f"{key}: no usable tokenizer in {path} ({str(err).splitlines()[0][:120]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def upcast_non_quantized(model: nn.Module) -> None:
    """Cast every floating parameter that is not a quantized weight (embeddings, norms, lm_head) to fp32."""
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16) and not hasattr(param, "quant_state"):
            param.data = param.data.float()


class _CheckpointedLayer:
    """Mixed into a decoder layer's class: its call runs under offload.py's checkpoint.

    The checkpoint wraps the module call from outside, so a compiled layer (compiled_layers.py) compiles the
    layer alone, whichever way the installed transformers hooks its own checkpointing in.
    """

    offload_checkpoint: bool

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return nn.Module.__call__(self, hidden_states, *args, **kwargs)
        run = partial(_call_module, self, args=args, kwargs=kwargs)
        return layer_checkpoint(run, hidden_states, offload=self.offload_checkpoint)


def _call_module(module: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    return nn.Module.__call__(module, hidden_states, *args, **kwargs)


@cache
def mixed_class(mixin: type, base: type) -> type:
    """`base` with `mixin`'s methods in front, one class per pair: a compiled graph is shared by modules of a class."""
    return type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {})


def enable_activation_checkpointing(model: nn.Module, checkpointed_layers: Optional[int] = None,
                                    offload: bool = False) -> None:
    """Checkpointing of the first `checkpointed_layers` decoder layers (None = all of them) with offload.py's
    reentrant checkpoint, their inputs kept in pinned CPU memory when `offload`.

    The last layers are the ones left out: backward reaches them first, so their kept activations are freed
    before any checkpointed layer recomputes its own. transformers' own checkpointing stays off.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = False
        if checkpointed_layers is None or index < checkpointed_layers:
            layer.__class__ = mixed_class(_CheckpointedLayer, type(layer))
            layer.offload_checkpoint = offload
    model.enable_input_require_grads()  # a reentrant checkpoint runs its backward only when its input requires grad


def load_base(model_cfg: ModelConfig, quant: QuantizationConfig, gradient_checkpointing: bool,
              device: Optional[torch.device] = None, checkpointed_layers: Optional[int] = None,
              offload_checkpoints: bool = False) -> LoadedBase:
    """Load the frozen base as configured, ready for adapters.

    Unlike peft's prepare_model_for_kbit_training, embeddings, norms and lm_head stay in the 16-bit compute
    dtype unless model.upcast_non_quantized is set: upcasting them costs ~0.5 GiB on a 7B model for no gain
    with fp32 adapters.
    """
    device = device or pick_device()
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    load_model_config(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    kwargs = dict(
        dtype=compute_dtype,
        quantization_config=quantization_config(quant, compute_dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
        use_safetensors=True,
    )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"model.path: cannot load {model_cfg.path}: {str(err).splitlines()[0][:200]}") from None
    if device.type != "cuda" and quant.mode == "none":
        model.to(device)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    if model_cfg.upcast_non_quantized:
        upcast_non_quantized(model)
    if gradient_checkpointing:
        enable_activation_checkpointing(model, checkpointed_layers, offload_checkpoints)
    return LoadedBase(model=model, tokenizer=tokenizer, compute_dtype=compute_dtype, device=device)
