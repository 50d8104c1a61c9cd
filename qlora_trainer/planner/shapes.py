"""Model shapes for the planner: the exact parameter layout of an architecture, from its config alone.

`load_model_config` reads a model's transformers config (a folder, a config.json, or a preset shipped in
qlora_trainer/presets/); `model_shape` builds the model on the meta device and records every linear layer's
shape, the other parameters, the buffers and the attention layout. No weights are read and no model code runs.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qlora_trainer.engine.adapters import find_linear_layers, linear_shape, meta_model, resolve_targets
from qlora_trainer.errors import UserError
from qlora_trainer.presets import PRESETS, preset_names  # noqa: F401  (preset_names: re-exported)

# Output projections read their block's own intermediate; every other linear of a block reads the block's
# normalised input (q/k/v, gate/up): one tensor that several adapters may keep.
OUTPUT_PROJECTIONS = frozenset({"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "w2", "wo",
                                "dense_4h_to_h"})


def load_model_config(model: str) -> PretrainedConfig:
    """The transformers config of a model folder (config.json is enough), a config.json file, or a preset name
    (see `preset_names`). Never runs code shipped with a model."""
    path = Path(model)
    if path.is_dir():
        source = path / "config.json"
        if not source.is_file():
            raise UserError(f"--model {model}: the folder has no config.json")
    elif path.is_file():
        source = path
    elif (PRESETS / f"{model}.json").is_file():
        source = PRESETS / f"{model}.json"
    else:
        raise UserError(f"--model {model}: not a model folder nor a preset; presets: {', '.join(preset_names())}")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"--model {model}: cannot read {source}: {str(err).splitlines()[0][:200]}") from None


@dataclass(frozen=True)
class LinearShape:
    name: str  # full module path, e.g. model.layers.0.self_attn.q_proj
    d_in: int
    d_out: int
    kind: Optional[str]  # "attn" / "mlp" inside decoder blocks, None elsewhere
    layer_index: Optional[int]  # decoder layer number, None outside the layer stack
    reads_block_input: bool  # True for q/k/v, gate/up; False for the block's output projection


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU / GeGLU: act(gate) * up
    fused_qkv: bool  # one linear makes the queries, keys and values (Phi-3's qkv_proj)
    mlp_width: int  # the MLP's widest output: intermediate_size, twice that from a fused gate_up_proj (Phi-3)
    linears: tuple[LinearShape, ...]  # every nn.Linear / Conv1D but the output embedding: what bitsandbytes quantizes
    other_param_numels: tuple[int, ...]  # every other parameter (embeddings, norms, lm_head when untied, biases)
    buffer_bytes: tuple[int, ...]  # buffers as the model holds them (rotary inv_freq, fp32)
    total_params: int
    sliding_window: Optional[int]  # attention window of the sliding-window layers (Mistral, Phi-3), or None
    sliding_layers: frozenset[int]  # indices of the decoder layers that use it
    meta_model: nn.Module = field(compare=False, repr=False)  # to resolve target names as the trainer does
    _targets: dict = field(default_factory=dict, compare=False, repr=False)  # cache: targets -> linears

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def targets(self, spec: Union[str, list[str], tuple[str, ...]]) -> tuple[LinearShape, ...]:
        """The linear layers an adapter on `spec` (adapter.target_modules: attn / mlp / all-linear / module names)
        wraps, as the trainer resolves them (adapters.resolve_targets); a ConfigError names a module that matches
        nothing."""
        key = spec if isinstance(spec, str) else tuple(spec)
        if key not in self._targets:
            _, hits = resolve_targets(self.meta_model, key if isinstance(key, str) else list(key))
            by_name = {linear.name: linear for linear in self.linears}
            self._targets[key] = tuple(by_name[hit.name] for hit in hits)
        return self._targets[key]


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def model_shape(model_config: PretrainedConfig) -> ModelShape:
    """Exact parameter layout of the architecture, from its config alone (built on the meta device)."""
    model = meta_model(model_config)
    config = model.config
    output = model.get_output_embeddings()
    block_kinds = {layer.name: layer.kind for layer in find_linear_layers(model)}
    linears, quantized = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is output:
            continue
        d_in, d_out = linear_shape(module)
        index = _LAYER_INDEX.search(name)
        linears.append(LinearShape(
            name=name, d_in=d_in, d_out=d_out, kind=block_kinds.get(name),
            layer_index=int(index.group(1)) if index else None,
            reads_block_input=name.rsplit(".", 1)[-1] not in OUTPUT_PROJECTIONS,
        ))
        quantized.add(id(module.weight))
    params = {id(p): p for p in model.parameters()}  # tied weights once
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    first_mlp = [l for l in linears if l.layer_index == 0 and l.kind == "mlp"]
    mlp_out = [l for l in first_mlp if not l.reads_block_input]
    intermediate = mlp_out[0].d_in if mlp_out else getattr(config, "intermediate_size", 4 * config.hidden_size)
    # transformers gives every layer a sliding window when the config has one, unless layer_types says which
    sliding_window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    sliding_layers = frozenset(index for index, kind in enumerate(layer_types)
                               if kind == "sliding_attention" and sliding_window)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    kv_dim = num_kv_heads * head_dim
    return ModelShape(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=intermediate,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        gated_mlp=sum(l.d_out for l in first_mlp if l.reads_block_input) == 2 * intermediate,
        fused_qkv=any(l.layer_index == 0 and l.kind == "attn" and l.reads_block_input
                      and l.d_out == num_heads * head_dim + 2 * kv_dim for l in linears),
        mlp_width=max([l.d_out for l in first_mlp] + [intermediate]),
        linears=tuple(linears),
        other_param_numels=tuple(p.numel() for key, p in params.items() if key not in quantized),
        buffer_bytes=tuple(b.numel() * b.element_size() for b in model.buffers()),
        total_params=sum(p.numel() for p in params.values()),
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        meta_model=model,
    )
