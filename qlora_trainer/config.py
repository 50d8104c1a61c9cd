"""Run configuration: one dataclass per YAML section, YAML loading, `--set KEY=VALUE` overrides and validation.

Everything a run needs is checked here, before any model is loaded, so that a typo costs a second, not a
model load. Errors are `ConfigError` with a one-line message naming the key.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from qlora_trainer.errors import ConfigError

QuantMode = Literal["nf4", "fp4", "int8", "none"]
DTypeName = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face model folder (config.json + safetensors + tokenizer), or a hub name
    tokenizer_path: Optional[str] = None  # tokenizer folder when it is not beside the model
    trust_remote_code: bool = False  # run model code shipped with the checkpoint; only when you trust it
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    upcast_non_quantized: bool = False  # keep embeddings, norms and lm_head in fp32 (costs ~0.5 GiB on 7B)


@dataclass
class QuantizationConfig:
    mode: QuantMode = "nf4"  # how the frozen base is stored: 4-bit NF4/FP4, 8-bit, or plain 16-bit
    double_quant: bool = True  # quantize the 4-bit absmax constants again (saves ~0.37 bit/param)
    compute_dtype: DTypeName = "auto"  # matmul dtype: auto = bf16 where supported, fp16 otherwise (T4)


@dataclass
class AdapterConfig:
    type: Literal["lora", "loha", "lokr"] = "lora"  # adapter method (all through peft)
    r: int = 16  # rank
    alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the adapter input (LoRA: lora_dropout, LoHa/LoKr: module_dropout)
    target_modules: Union[str, list[str]] = "all-linear"  # attn | mlp | all-linear | list of module names
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the trainable adapter weights
    use_rslora: bool = False  # LoRA only: rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # LoRA only: weight-decomposed LoRA (slower, more memory)


@dataclass
class DataConfig:
    path: str = ""  # JSONL / JSON / CSV / Parquet file, a save_to_disk folder, or a hub data set name
    format: Literal["alpaca", "chat", "text"] = "alpaca"  # row layout
    split: str = "train"  # split to read from a hub data set or a DatasetDict folder
    eval_fraction: float = 0.0  # share of rows held out for eval loss (0 = no eval)
    mask_prompt: bool = True  # train on the response only; prompt tokens get label -100
    packing: bool = False  # concatenate examples into full max_seq_len rows
    on_bad_row: Literal["skip", "error"] = "skip"  # what a malformed row does
    text_field: str = "text"  # column read by the text format


@dataclass
class TrainingConfig:
    max_steps: int = 100  # optimizer steps
    learning_rate: float = 2e-4  # peak learning rate
    micro_batch_size: int = 1  # sequences per forward/backward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 512  # tokens per sequence; longer examples are truncated
    save_steps: int = 50  # checkpoint every N optimizer steps (0 = only at the end)
    save_total_limit: int = 2  # keep the newest K checkpoints
    seed: int = 42  # seeds torch, python and data order
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"  # torch AdamW or bitsandbytes 8-bit
    weight_decay: float = 0.0  # decoupled weight decay
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"  # decay after warm-up
    warmup_steps: int = 0  # linear warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    gradient_checkpointing: bool = True  # recompute activations in backward (non-reentrant)
    checkpointed_layers: Optional[int] = None  # with checkpointing: only the first N decoder layers (None = all)
    offload_checkpoints: bool = False  # keep checkpointed layers' inputs in pinned CPU memory (less VRAM, host RAM)
    loss_chunk_tokens: int = 1024  # tokens per lm_head + cross-entropy chunk (bounds the logits' memory)
    fused_lora: bool = True  # LoRA over a 4-bit base in one autograd function per layer (fused_lora.py)
    compile_layers: Literal["auto", "on", "off"] = "auto"  # torch.compile each decoder layer; auto = on CUDA GPUs
    mlp_chunk_tokens: int = 0  # > 0: MLPs run this many tokens at a time, each chunk recomputed (long sequences)
    logging_steps: int = 1  # write metrics every N optimizer steps
    eval_steps: int = 0  # eval loss every N optimizer steps (0 = only at the end, when there is an eval split)
    resume: Literal["off", "auto"] = "off"  # auto = continue from the newest complete checkpoint
    max_bad_steps: int = 5  # stop after this many consecutive steps with a NaN/inf loss or gradient
    oom_retry: Literal["off", "halve-micro-batch"] = "off"  # on GPU out-of-memory: stop, or halve and go on
    plan: Literal["off", "auto"] = "off"  # auto = the planner picks what you left out to fit the GPU
    memory_cap_gib: float = 0.0  # use at most this much of the GPU (0 = all of it); also the planner's budget


@dataclass
class OutputConfig:
    dir: str = "outputs/run"  # where checkpoints, metrics.jsonl and the final adapter go
    overwrite: bool = False  # allow writing into a folder that already holds a run


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    explicit_keys: frozenset = frozenset()  # "section.key" names the user set (the planner fills the others)

    def validate(self) -> None:
        """Reject values no run can use. Checks that need the model's shapes live in `adapters.py`."""
        if not self.model.path:
            raise ConfigError("model.path: missing; set it to a local model folder")
        if not self.data.path:
            raise ConfigError("data.path: missing; set it to a JSONL/JSON/CSV/Parquet file or a dataset folder")
        positive = {
            "adapter.r": self.adapter.r,
            "adapter.alpha": self.adapter.alpha,
            "training.max_steps": self.training.max_steps,
            "training.learning_rate": self.training.learning_rate,
            "training.micro_batch_size": self.training.micro_batch_size,
            "training.gradient_accumulation_steps": self.training.gradient_accumulation_steps,
            "training.max_seq_len": self.training.max_seq_len,
            "training.logging_steps": self.training.logging_steps,
            "training.save_total_limit": self.training.save_total_limit,
            "training.loss_chunk_tokens": self.training.loss_chunk_tokens,
            "training.max_bad_steps": self.training.max_bad_steps,
        }
        for key, value in positive.items():
            if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{key}: {value} is not allowed; it must be a finite number > 0")
        non_negative = {
            "training.save_steps": self.training.save_steps,
            "training.warmup_steps": self.training.warmup_steps,
            "training.weight_decay": self.training.weight_decay,
            "training.max_grad_norm": self.training.max_grad_norm,
            "training.eval_steps": self.training.eval_steps,
            "training.memory_cap_gib": self.training.memory_cap_gib,
            "training.checkpointed_layers": self.training.checkpointed_layers or 0,
            "training.mlp_chunk_tokens": self.training.mlp_chunk_tokens,
        }
        for key, value in non_negative.items():
            if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{key}: {value} is not allowed; it must be a finite number >= 0")
        if not 0.0 <= self.adapter.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: {self.adapter.dropout} is not allowed; use 0 <= dropout < 1")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: {self.data.eval_fraction} is not allowed; use 0 <= x < 1")
        targets = self.adapter.target_modules
        if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
            raise ConfigError("adapter.target_modules: empty; use attn, mlp, all-linear or a list of module names")
        if isinstance(targets, str) and not targets.strip():
            raise ConfigError("adapter.target_modules: empty; use attn, mlp, all-linear or a list of module names")
        if self.adapter.type != "lora" and (self.adapter.use_dora or self.adapter.use_rslora):
            raise ConfigError(f"adapter.use_dora/use_rslora: only for adapter.type lora, not {self.adapter.type}")


def _type_name(tp: Any) -> str:
    if get_origin_safe(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def get_origin_safe(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    return Union if origin is types.UnionType else origin


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and return it in that type, or raise ConfigError."""
    origin = get_origin_safe(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if value is False and "off" in choices:  # YAML reads a bare `off` as False
            return "off"
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected a list")
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a string")
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _build_section(section_cls: type, section_name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section_name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{section_name}.{key}: unknown key; valid keys of {section_name} are {', '.join(sorted(known))}"
            )
        values[key] = _coerce(f"{section_name}.{key}", value, hints[key])
    return section_cls(**values)


def config_from_dict(raw: Any) -> RunConfig:
    """Build a validated RunConfig from a plain mapping (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name != "explicit_keys"}
    hints = typing.get_type_hints(RunConfig)
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{name}: unknown section; valid sections are {', '.join(sections)}")
        built[name] = _build_section(hints[name], name, value)
    explicit = frozenset(f"{name}.{key}" for name, value in raw.items() if isinstance(value, dict) for key in value)
    config = RunConfig(**built, explicit_keys=explicit)
    config.validate()
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. training.learning_rate=2e-4")
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text}: KEY must be section.key, e.g. training.learning_rate")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `section.key=value` override applied."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        target = merged.setdefault(section, {})
        if target is None:
            target = merged[section] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {target!r}")
        target[key] = value
    return merged


def read_yaml(path: Path) -> dict:
    """Read a YAML config file into a mapping, with one-line errors for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"--config {path}: malformed YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    return raw


def resolve_relative_paths(config: RunConfig, base_dir: Path) -> None:
    """Make model/data paths that name existing files relative to the config file usable from any cwd."""
    for section, key in (("model", "path"), ("model", "tokenizer_path"), ("data", "path")):
        obj = getattr(config, section)
        value = getattr(obj, key)
        if not value or Path(value).is_absolute() or Path(value).exists():
            continue
        candidate = base_dir / value
        if candidate.exists():
            setattr(obj, key, str(candidate))


def load_config(path: Path, overrides: list[str] = (), output_dir: Optional[str] = None) -> RunConfig:
    """Read YAML, apply `--set` overrides and `--output-dir`, build and validate the RunConfig."""
    raw = apply_overrides(read_yaml(Path(path)), list(overrides))
    if output_dir is not None:
        raw.setdefault("output", {})
        raw["output"] = dict(raw["output"] or {}, dir=output_dir)
    config = config_from_dict(raw)
    resolve_relative_paths(config, Path(path).resolve().parent)
    return config


def config_to_dict(config: RunConfig) -> dict:
    """Plain mapping of the config sections, for saving beside a run."""
    raw = dataclasses.asdict(config)
    raw.pop("explicit_keys")
    return raw
