"""Load the frozen base model (NF4 / FP4 / 8-bit / 16-bit) in the resolved compute dtype, and its tokenizer."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PretrainedConfig

from qlora_trainer.engine.layer_load import load_for_sharding
from qlora_trainer.spec import ModelConfig, QuantizationConfig, RunSpec
from qlora_trainer.errors import UserError
from qlora_trainer.hub import require_hub

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedBase:
    model: nn.Module
    tokenizer: object
    compute_dtype: torch.dtype
    device: torch.device


def device_for(device_type: str, gpu_index: int = 0) -> torch.device:
    """The torch device of a resolved run: CUDA GPU `gpu_index` (the process's LOCAL_RANK), or the CPU."""
    return torch.device("cuda", gpu_index) if device_type == "cuda" else torch.device("cpu")


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
    weight_shapes(folder)  # every file's header is read now, so a broken file is named before anything loads


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the folder's safetensors files, read from their headers (no weights loaded); a
    file that is empty, truncated or not safetensors is a UserError naming it."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as weights:
                shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
        except (SafetensorError, OSError) as err:
            reason = (str(err).strip().splitlines() or ["unreadable"])[0]
            raise UserError(f"model.path: {path} is not a complete safetensors file ({reason}); copy or save the "
                            "model again") from None
    return shapes


def check_weights_match(model_path: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the architecture built from config.json shares with the weight files has the shape config.json
    gives it; otherwise transformers would re-initialise it at random and train on silently."""
    folder = Path(model_path)
    if not folder.is_dir():
        return
    for key, shape in weight_shapes(folder).items():
        if key in expected and expected[key] != shape:
            raise UserError(f"model.path: {model_path} holds {key} of shape {list(shape)} where its config.json "
                            f"gives {list(expected[key])}; config.json does not describe these weights")


def load_model_config(model: ModelConfig) -> PretrainedConfig:
    """The transformers config of the base, read without loading weights."""
    check_model_folder(model.path)
    if not Path(model.path).exists():
        require_hub("model.path", model.path)
    try:
        return AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.path: cannot read the config of {model.path}: {str(err).splitlines()[0]}") from None


def quantization_config(quant: QuantizationConfig, compute_dtype: torch.dtype,
                        shardable: bool = False) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes settings for the base, or None for a plain 16-bit base. `shardable` packs 4-bit weights in
    the compute dtype instead of bytes, so FSDP can shard them beside the float parameters (engine/distributed.py)."""
    if quant.mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.mode,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if shardable else torch.uint8,
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


def settle_auto_attention(spec: RunSpec, model_config: PretrainedConfig) -> RunSpec:
    """`model.attn_implementation: auto` settled for what this model's attention needs, before anything is resolved:
    eager where transformers gives the model no SDPA or it caps its attention logits (Gemma-2: neither SDPA nor the
    varlen kernel computes that), SDPA where it drops attention weights out (the varlen kernel has no dropout).
    Otherwise it stays `auto` (spec/resolve.py: SDPA, varlen on packed rows where the GPU runs it). Written into the
    spec, so every later resolve (the planner's candidates too) and run_config.json say what runs."""
    if spec.model.attn_implementation != "auto":
        return spec
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    if getattr(model_config, "attn_logit_softcapping", None) or not getattr(model_class, "_supports_sdpa", True):
        return spec.with_values({"model.attn_implementation": "eager"})
    if (getattr(model_config, "attention_dropout", 0.0) or 0.0) > 0:
        return spec.with_values({"model.attn_implementation": "sdpa"})
    return spec


def upcast_non_quantized(model: nn.Module) -> None:
    """Cast every floating parameter that is not a quantized weight (embeddings, norms, lm_head) to fp32."""
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16) and not hasattr(param, "quant_state"):
            param.data = param.data.float()


def cpu_flash_attention_fails() -> bool:
    """torch's CPU flash attention packs bf16 inputs for AVX512-BF16 whenever the CPU has it, even where ATen's
    kernels are held below AVX512 (ATEN_CPU_CAPABILITY=avx2), and then stops with "pack_vnni2 is only supported when
    avx512 is supported" (torch 2.13)."""
    has_avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return has_avx512_bf16 and torch.backends.cpu.get_cpu_capability() != "AVX512"


def keep_cpu_attention_within_its_kernels() -> None:
    """Where the CPU's flash attention would fail (above), the math kernel computes the same attention; elsewhere
    nothing changes."""
    if cpu_flash_attention_fails():
        torch.backends.cuda.enable_flash_sdp(False)  # the flag CPU and CUDA share; only reached on the CPU


def keep_4bit_weights_as_packed(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking: on a CPU with AVX512-BF16, a 4-bit linear's forward in eval mode on an
    input that needs no gradient rewrites its weight in place into another layout for its own kernel (bitsandbytes
    0.50, Linear4bit.forward), and everything else that reads the weight as NF4 codes (the fused LoRA path, DoRA's
    weight norm, merging) then reads garbage: `generate --with-base` printed wrong adapter outputs after the base's.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base(model_cfg: ModelConfig, quant: QuantizationConfig, compute_dtype: torch.dtype,
              device: torch.device, attention: Optional[str] = None, shardable: bool = False) -> LoadedBase:
    """Load the frozen base as configured, ready for adapters, its matmuls in `compute_dtype` (as resolved).

    `attention` is the attention implementation as resolved (default: model.attn_implementation, SDPA for auto:
    what runs unpacked rows, as inference does). `shardable`: 4-bit weights packed for FSDP (quantization_config),
    loaded a tensor at a time and left in host memory for FSDP to shard a layer at a time (layer_load.py).
    Unlike peft's prepare_model_for_kbit_training, embeddings, norms and lm_head stay in the 16-bit compute
    dtype unless model.upcast_non_quantized is set: upcasting them costs ~0.5 GiB on a 7B model for no gain
    with fp32 adapters.
    """
    model_config = load_model_config(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    attention = attention or model_cfg.attn_implementation.replace("auto", "sdpa")
    bnb_config = quantization_config(quant, compute_dtype, shardable)
    if device.type != "cuda":
        keep_cpu_attention_within_its_kernels()
    model = None
    if shardable and quant.mode in ("nf4", "fp4") and Path(model_cfg.path).is_dir():
        model, missing = load_for_sharding(model_config, Path(model_cfg.path), bnb_config, compute_dtype, device,
                                           attention, model_cfg.trust_remote_code)
        if missing:
            print(f"note: every GPU loads the whole 4-bit model before FSDP shards it: {model_cfg.path} names "
                  f"its tensors otherwise than the model does (no {missing})", file=sys.stderr)
    if model is None:
        model = _from_pretrained(model_cfg, bnb_config, compute_dtype, device, attention)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    keep_4bit_weights_as_packed(model)
    if model_cfg.upcast_non_quantized:
        upcast_non_quantized(model)
    return LoadedBase(model=model, tokenizer=tokenizer, compute_dtype=compute_dtype, device=device)


def _from_pretrained(model_cfg: ModelConfig, bnb_config: Optional[BitsAndBytesConfig], compute_dtype: torch.dtype,
                     device: torch.device, attention: str) -> nn.Module:
    """The whole base through transformers' from_pretrained, on `device`."""
    kwargs = dict(
        dtype=compute_dtype,
        quantization_config=bnb_config,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=attention,
        use_safetensors=True,
    )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # this process's GPU (cuda:LOCAL_RANK with several)
    try:
        model, report = AutoModelForCausalLM.from_pretrained(model_cfg.path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"model.path: cannot load {model_cfg.path}: {str(err).splitlines()[0][:200]}") from None
    missing = sorted(report.get("missing_keys") or [])
    if missing:  # transformers would go on with these weights drawn at random
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"model.path: {model_cfg.path} holds no weights for {missing[0]}{more} (transformers would "
                        "start them at random); give the model's complete safetensors files")
    if device.type != "cuda" and bnb_config is None:
        model.to(device)
    return model
