"""Adapters through peft: target-module resolution, LoRA / LoHa / LoKr configs, adapter dtype, parameter counts,
and loading a saved adapter onto the base it was trained on."""

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.loha.layer import Linear as LoHaLinear
from peft.tuners.lokr.layer import Linear as LoKrLinear
from peft.tuners.lokr.layer import factorization
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qlora_trainer.spec import AdapterConfig
from qlora_trainer.errors import ConfigError, UserError

SHORTHANDS = ("attn", "mlp", "all-linear")
LYCORIS_NAMES = {"loha": "LoHa", "lokr": "LoKr"}  # peft's LyCORIS adapters, which wrap nn.Linear but not Conv1D
_ATTN_PARENTS = ("attn", "attention", "self_attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class TargetLayer:
    name: str  # full module path, e.g. model.layers.0.self_attn.q_proj
    d_in: int
    d_out: int
    kind: str  # "attn" or "mlp"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear (bitsandbytes layers included) or a GPT-2 style Conv1D."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape  # Conv1D stores the weight transposed
        return d_in, d_out
    return module.in_features, module.out_features


def _block_kind(name: str) -> Union[str, None]:
    """attn / mlp from the names of a module's parents; None for layers outside the decoder blocks."""
    parents = [part.lower() for part in name.split(".")[:-1]]
    for part in reversed(parents):
        if any(part.endswith(p) or part.startswith(p) for p in _ATTN_PARENTS):
            return "attn"
        if any(part.endswith(p) or part.startswith(p) for p in _MLP_PARENTS):
            return "mlp"
    return None


def find_linear_layers(model: nn.Module) -> list[TargetLayer]:
    """Every linear layer inside an attention or MLP block (lm_head and embeddings are never targets)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is output:
            continue
        kind = _block_kind(name)
        if kind is None:
            continue
        d_in, d_out = linear_shape(module)
        layers.append(TargetLayer(name=name, d_in=d_in, d_out=d_out, kind=kind))
    return layers


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _parent_and_leaf(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def resolve_targets(model: nn.Module, requested: Union[str, list[str]]) -> tuple[list[str], list[TargetLayer]]:
    """Turn `attn` / `mlp` / `all-linear` / a list of names into peft target keys and the layers they hit.

    Keys are leaf names (q_proj) where a leaf name is unambiguous, else parent.leaf (attn.c_proj in GPT-2,
    where mlp.c_proj shares the leaf name).
    """
    layers = find_linear_layers(model)
    if not layers:
        raise ConfigError("adapter.target_modules: found no linear layers inside attention/MLP blocks of this model")
    if isinstance(requested, str) and requested in SHORTHANDS:
        chosen = [layer for layer in layers if requested == "all-linear" or layer.kind == requested]
        kinds_by_leaf: dict[str, set[str]] = {}
        for layer in layers:
            kinds_by_leaf.setdefault(_suffix(layer.name), set()).add(layer.kind)
        keys = sorted(
            {_suffix(l.name) if len(kinds_by_leaf[_suffix(l.name)]) == 1 or requested == "all-linear"
             else _parent_and_leaf(l.name) for l in chosen}
        )
        return keys, chosen
    names = [requested] if isinstance(requested, str) else list(requested)
    names = [n.strip() for item in names for n in item.split(",") if n.strip()]
    chosen = []
    for key in names:
        hits = [layer for layer in layers if layer.name == key or layer.name.endswith("." + key)]
        if not hits:
            available = sorted({_suffix(layer.name) for layer in layers})
            raise ConfigError(
                f"adapter.target_modules: {key!r} matches no linear layer; use attn, mlp, all-linear "
                f"or names from {', '.join(available)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(set(names)), chosen


def meta_model(model_config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with no weights allocated, to read shapes before loading anything.

    torch's meta device rather than accelerate's init_empty_weights, which loses weight tying in transformers 5.
    """
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def check_rank(adapter: AdapterConfig, layers: list[TargetLayer]) -> None:
    """A LoRA rank above a target's smaller dimension cannot add capacity; reject it before loading."""
    if adapter.type != "lora":
        return
    smallest = min(layers, key=lambda l: min(l.d_in, l.d_out))
    limit = min(smallest.d_in, smallest.d_out)
    if adapter.r > limit:
        raise ConfigError(
            f"adapter.r: {adapter.r} exceeds the smaller dimension ({limit}) of target layer {smallest.name}; "
            f"use 1 <= r <= {limit}"
        )


def adapter_param_count(adapter_type: str, r: int, d_in: int, d_out: int, use_dora: bool = False) -> int:
    """Trainable parameters one adapter adds to a d_in -> d_out linear layer, by formula.

    LoRA: A (r x d_in) + B (d_out x r) [+ DoRA magnitude d_out] (Hu et al. 2021; Liu et al. 2024).
    LoHa: two Hadamard-multiplied low-rank pairs, 2 r (d_in + d_out) (Hyeon-Woo et al. 2022).
    LoKr: Kronecker product w1 (out_l x in_m) (x) w2, w2 low-rank when r < max(out_k, in_n) / 2
    (peft's factorization near the square root, decompose_both off).
    """
    if adapter_type == "lora":
        return r * (d_in + d_out) + (d_out if use_dora else 0)
    if adapter_type == "loha":
        return 2 * r * (d_in + d_out)
    if adapter_type == "lokr":
        in_m, in_n = factorization(d_in, -1)
        out_l, out_k = factorization(d_out, -1)
        w1 = out_l * in_m
        w2 = r * (out_k + in_n) if r < max(out_k, in_n) / 2 else out_k * in_n
        return w1 + w2
    raise ValueError(adapter_type)


def peft_config(adapter: AdapterConfig, target_keys: list[str]) -> PeftConfig:
    """The peft config of the chosen adapter type; B (LoRA) / the second factor starts at zero."""
    common = dict(r=adapter.r, target_modules=target_keys, task_type="CAUSAL_LM")
    if adapter.type == "lora":
        return LoraConfig(
            lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.lora_dropout,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
            bias="none",
            init_lora_weights=True,  # A Kaiming-uniform, B zero: the adapted model starts equal to the base
            **common,
        )
    if adapter.type == "loha":
        return LoHaConfig(alpha=adapter.lora_alpha, module_dropout=adapter.lora_dropout, **common)
    return LoKrConfig(alpha=adapter.lora_alpha, module_dropout=adapter.lora_dropout, **common)


def conv1d_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    """The GPT-2 style Conv1D layers an adapter config targets in `model`; peft's LoHa / LoKr cannot wrap them."""
    return [name for name, module in model.named_modules()
            if isinstance(module, Conv1D) and check_target_module_exists(config, name)]


def _no_lycoris_on_conv1d(adapter_type: str, layer_name: str) -> ConfigError:
    return ConfigError(f"adapter.type: peft's {LYCORIS_NAMES[adapter_type]} cannot wrap Conv1D layers ({layer_name}) "
                       "on a 16-bit base; use adapter.type lora, or quantization.mode nf4, fp4 or int8")


def usability_note(adapter_type: str, quant_mode: str, model_config: PretrainedConfig,
                   trust_remote_code: bool = False, meta: Optional[nn.Module] = None) -> Optional[str]:
    """Whether an adapter of this type, trained on this base, will be usable; call it before loading anything.

    Raises ConfigError where peft cannot build the adapter at all: LoHa / LoKr on a 16-bit base with GPT-2 style
    Conv1D layers (peft's LyCORIS layers wrap nn.Linear; a quantized base has bitsandbytes linears there instead).
    Returns one line where the adapter will work only through this trainer: plain peft sizes LoHa / LoKr over a
    4-bit layer from its packed storage, and has no LoHa / LoKr for the Conv1D layers of the 16-bit base.
    None where plain peft loads the adapter onto the base it was trained on. `meta`: the architecture on the meta
    device, when the caller has built it already.
    """
    if adapter_type not in LYCORIS_NAMES:
        return None
    name = LYCORIS_NAMES[adapter_type]
    meta = meta if meta is not None else meta_model(model_config, trust_remote_code)
    conv1d = [l.name for l in find_linear_layers(meta) if isinstance(meta.get_submodule(l.name), Conv1D)]
    if quant_mode == "none":
        if conv1d:
            raise _no_lycoris_on_conv1d(adapter_type, conv1d[0])
        return None
    unusable = ["the 4-bit base (it sizes them from the packed weights)"] if quant_mode in ("nf4", "fp4") else []
    if conv1d:
        unusable.append(f"the 16-bit base (it has no {name} for Conv1D layers)")
    if not unusable:
        return None
    return (f"adapter.type: plain peft cannot load this {name} adapter onto {' nor '.join(unusable)}; "
            "qlora-trainer generate and merge can, and the merged model loads anywhere")


def _is_4bit(module: nn.Module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state") and hasattr(module, "in_features")


@contextmanager
def logical_weight_shapes(model: nn.Module):
    """Let 4-bit layers show their logical (out, in) weight shape for the duration.

    peft's LoHa and LoKr size their factors from `base_layer.weight.shape` and reshape their delta to it; for a
    bitsandbytes 4-bit layer that is the packed (n/2, 1) storage shape, so they would build wrong-sized adapters.
    The stand-in is an expanded scalar: the right shape, device and dtype, and no memory.
    """
    swapped = []
    for module in model.modules():
        if _is_4bit(module) and not hasattr(module, "base_layer"):
            packed = module.weight
            stand_in = torch.empty((), device=packed.device, dtype=torch.float32)
            module.weight = nn.Parameter(stand_in.expand(module.out_features, module.in_features), requires_grad=False)
            swapped.append((module, packed))
    try:
        yield
    finally:
        for module, packed in swapped:
            module.weight = packed


class _LoHaOn4bit(LoHaLinear):
    def get_delta_weight(self, adapter_name: str, **kwargs) -> torch.Tensor:
        with logical_weight_shapes(self.get_base_layer()):
            return super().get_delta_weight(adapter_name, **kwargs)


class _LoKrOn4bit(LoKrLinear):
    def get_delta_weight(self, adapter_name: str, **kwargs) -> torch.Tensor:
        with logical_weight_shapes(self.get_base_layer()):
            return super().get_delta_weight(adapter_name, **kwargs)


def fit_lycoris_to_4bit(model: nn.Module) -> None:
    """Give LoHa/LoKr layers over a 4-bit base the delta reshape they need (see logical_weight_shapes)."""
    for module in model.modules():
        if type(module) in (LoHaLinear, LoKrLinear) and _is_4bit(module.get_base_layer()):
            module.__class__ = _LoHaOn4bit if type(module) is LoHaLinear else _LoKrOn4bit


@dataclass(frozen=True)
class AdapterSummary:
    target_keys: list[str]
    target_layers: int
    trainable_params: int
    formula_params: int
    total_params: int

    def line(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%) "
            f"in {self.target_layers} layers [{', '.join(self.target_keys)}]"
        )


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting a packed 4-bit weight as its logical element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            n = math.prod(quant_state.shape)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def attach_adapter(model: nn.Module, adapter: AdapterConfig, target_keys: list[str],
                   layers: list[TargetLayer]) -> tuple[nn.Module, AdapterSummary]:
    """Wrap the base with a fresh adapter in adapter.dtype and check peft's count against the formula."""
    config = peft_config(adapter, target_keys)
    if adapter.type == "lora":  # peft's LoRA has its own bitsandbytes layers
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    else:
        conv1d = conv1d_targets(model, config)
        if conv1d:
            raise _no_lycoris_on_conv1d(adapter.type, conv1d[0])
        with logical_weight_shapes(model):
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
        fit_lycoris_to_4bit(peft_model)
    dtype = torch.float32 if adapter.dtype == "float32" else torch.bfloat16
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    trainable, total = count_params(peft_model)
    formula = sum(adapter_param_count(adapter.type, adapter.r, l.d_in, l.d_out, adapter.use_dora) for l in layers)
    summary = AdapterSummary(target_keys, len(layers), trainable, formula, total)
    if trainable != formula:
        raise RuntimeError(f"peft made {trainable} trainable params, the formula says {formula}")
    return peft_model, summary


def load_adapter(model: nn.Module, adapter_dir: Path, adapter_name: str = "default") -> PeftModel:
    """A saved adapter on the base it was trained on (loaded as `load_base` loads it), for inference.

    Built as attach_adapter builds a fresh one: LoHa / LoKr over 4-bit layers are sized from the logical weight
    shapes, where plain peft sizes them from the packed storage. An adapter that does not fit the base (trained
    on another model, or on layers peft cannot wrap here) is a UserError naming the adapter folder.
    """
    config = PeftConfig.from_pretrained(str(adapter_dir))
    adapter_type = str(config.peft_type.value).lower()
    conv1d = conv1d_targets(model, config) if adapter_type in LYCORIS_NAMES else []
    if conv1d:
        raise UserError(f"adapter {adapter_dir}: peft's {LYCORIS_NAMES[adapter_type]} cannot wrap Conv1D layers "
                        f"({conv1d[0]}) on a 16-bit base; use the quantized base it was trained on "
                        "(--quant nf4, fp4 or int8)")
    misfit = f"adapter {adapter_dir} does not fit this base model"
    try:
        with logical_weight_shapes(model) if adapter_type in LYCORIS_NAMES else nullcontext():
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
    except RuntimeError as err:  # load_state_dict's report: one "size mismatch for KEY: ..." line per tensor
        mismatch = [line.strip() for line in str(err).splitlines() if line.strip().startswith("size mismatch")]
        if not mismatch:
            raise
        raise UserError(f"{misfit} ({mismatch[0].rstrip('.')}); use the base it was trained on") from None
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        raise UserError(f"{misfit}: it targets {sorted(config.target_modules)}, which this base does not have; "
                        "use the base it was trained on") from None
    # peft loads non-strictly: a layer the base has and the file lacks keeps its fresh weights, and a tensor for a
    # layer the base lacks is dropped; either means another model's adapter
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as saved:
        saved_keys = set(saved.keys())
    expected_keys = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    if saved_keys != expected_keys:
        missing, extra = sorted(expected_keys - saved_keys), sorted(saved_keys - expected_keys)
        detail = f"it has no {missing[0]}" if missing else f"the base has no layer for {extra[0]}"
        raise UserError(f"{misfit}: {detail}; use the base it was trained on")
    fit_lycoris_to_4bit(peft_model)
    peft_model.eval()
    return peft_model
