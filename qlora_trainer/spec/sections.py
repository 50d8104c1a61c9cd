"""The run specification: one dataclass per YAML section, documented field by field, and its one `validate()`.

A `RunSpec` is the only description of a run: `train`, `plan-memory`, `bench` and the peer comparison all build
one, and the planner returns a changed copy (`with_values`). Names follow peft where peft has them
(`lora_alpha`, `lora_dropout`). Checks that need the model's shapes live in `engine/adapters.py`.
"""

import copy
import math
import string
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from qlora_trainer.errors import ConfigError

QuantMode = Literal["nf4", "fp4", "int8", "none"]
DTypeName = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face model folder (config.json + safetensors + tokenizer), or a hub name
    tokenizer_path: Optional[str] = None  # tokenizer folder when it is not beside the model
    trust_remote_code: bool = False  # run model code shipped with the checkpoint; only when you trust it
    # attention kernel; auto = SDPA, run as torch's variable-length flash kernel on packed rows where the GPU has
    # it (spec/resolve.py); sdpa = SDPA as transformers runs it (packed rows: a block-diagonal mask)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
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
    lora_alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    lora_dropout: float = 0.05  # dropout on the adapter input (peft's lora_dropout; LoHa/LoKr: module_dropout)
    target_modules: Union[str, list[str]] = "all-linear"  # attn | mlp | all-linear | list of module names
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the trainable adapter weights
    use_rslora: bool = False  # LoRA only: rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # LoRA only: weight-decomposed LoRA (slower, more memory)


# Each data.format's fields: the names data.columns maps onto a file's columns.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",),
                 "sharegpt": ("conversations",), "text": ("text",)}
PROMPT_PLACEHOLDERS = ("instruction", "input")  # what data.prompt_template may fill in


@dataclass(frozen=True)
class DataSource:
    """One file of a data.path list. File i makes up weight_i / (sum of the weights) of the train examples, which
    number as many as the files' usable examples together: its examples repeat whole as often as its share allows
    and the rest is a seeded sample of them (data/sampling.py `mix`). Eval examples are held out of each file first,
    unweighted."""

    path: str = ""  # a file, save_to_disk folder or hub data set name, as data.path takes it
    weight: float = 1.0  # relative share of the train examples (a plain path in the list weighs 1)


DataPath = Union[str, list[Union[str, DataSource]]]


@dataclass
class DataConfig:
    path: DataPath = ""  # JSONL/JSON/CSV/Parquet file, save_to_disk folder or hub data set; a list: mixed (DataSource)
    format: Literal["alpaca", "chat", "sharegpt", "text"] = "alpaca"  # row layout (sharegpt: chat as from/value)
    columns: dict[str, str] = field(default_factory=dict)  # format field -> file column, e.g. {output: answer}
    # alpaca: "alpaca" (Taori et al.; without its Input section where a row has no input), or your text for every row
    # with {instruction} and optionally {input}, which is "" where a row has no input
    prompt_template: str = "alpaca"
    split: str = "train"  # split to read from a hub data set or a DatasetDict folder
    eval_fraction: float = 0.0  # share of rows held out for eval loss (0 = no eval)
    mask_prompt: bool = True  # train on the response only; prompt tokens get label -100
    packing: bool = False  # several whole examples per max_seq_len row; none attends to another or loses a token
    on_bad_row: Literal["skip", "error"] = "skip"  # what a malformed row does
    truncation: Literal["drop", "keep"] = "keep"  # a row longer than max_seq_len: skipped or cut, counted either way
    text_field: str = "text"  # column read by the text format (the older spelling of columns: {text: ...})

    def sources(self) -> list[DataSource]:
        """data.path as files with weights: a single path is one file of weight 1."""
        entries = [self.path] if isinstance(self.path, str) else self.path
        return [DataSource(entry) if isinstance(entry, str) else entry for entry in entries]

    def column(self, name: str) -> str:
        """The file's column holding the format's field `name`."""
        return self.columns.get(name, self.text_field if name == "text" else name)

    def prompt_fields(self) -> set[str]:
        """The placeholders prompt_template fills in; ConfigError where it is not a valid template."""
        if self.prompt_template == "alpaca":
            return set(PROMPT_PLACEHOLDERS)
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
        except ValueError as err:
            raise ConfigError(f"data.prompt_template: not a valid template ({err}); write a literal brace as "
                              "{{ or }}") from None
        unknown = sorted(names - set(PROMPT_PLACEHOLDERS))
        if unknown:
            raise ConfigError(f"data.prompt_template: unknown placeholder {{{unknown[0]}}}; use {{instruction}} and "
                              "optionally {input} (write a literal brace as {{ or }})")
        return names


@dataclass
class TrainingConfig:
    max_steps: int = 100  # optimizer steps
    num_epochs: float = 0.0  # > 0: instead of max_steps (set one), passes over the train examples (data/sampling.py)
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
    gradient_checkpointing: bool = True  # recompute each decoder layer's activations in backward
    checkpointed_layers: Optional[int] = None  # with checkpointing: only the first N decoder layers (None = all)
    # keep checkpointed layers' inputs in pinned host memory, copied while the layers compute (GPUs only): less VRAM
    # at no measured speed cost, layers x tokens x hidden x 2 bytes of host RAM (training/gate.py checks it)
    offload_checkpoints: bool = True
    loss_chunk_tokens: int = 1024  # chunked loss: tokens per lm_head + cross-entropy chunk (bounds the logits)
    # fused: Liger-Kernel's fused lm_head + cross-entropy (CUDA), whose logits never outgrow ~tokens x hidden;
    # chunked: lm_head + cross-entropy loss_chunk_tokens at a time; auto: fused where it runs, else chunked
    loss_kernel: Literal["auto", "fused", "chunked"] = "auto"
    fused_lora: bool = True  # LoRA over a 4-bit base in one autograd function per layer (engine/fused_lora.py)
    compile_layers: Literal["auto", "on", "off"] = "auto"  # torch.compile each decoder layer; auto: CUDA GPUs, Triton
    mlp_chunk_tokens: int = 0  # > 0: MLPs and the final norm run this many tokens at a time, each chunk recomputed
    # > 0: attention runs this many queries at a time against whole keys and values, each chunk recomputed in
    # backward (very long sequences; Llama, Mistral and Qwen2 attention without a sliding window)
    attention_chunk_tokens: int = 0
    # with a layer backward in chunks over plain rows: each block of keys and values made from the layer's input
    # where it is used, not the row's kept (2 x tokens x key width bytes less; the key projections run about
    # chunks/2 times more, twice)
    recompute_keys: bool = False
    logging_steps: int = 1  # write metrics every N optimizer steps
    eval_steps: int = 0  # eval loss every N optimizer steps (0 = only at the end, when there is an eval split)
    resume: Literal["off", "auto"] = "off"  # auto = continue from the newest complete checkpoint
    max_bad_steps: int = 5  # stop after this many consecutive steps with a NaN/inf loss or gradient
    oom_retry: Literal["off", "halve-micro-batch"] = "off"  # on GPU out-of-memory: stop, or halve and go on
    plan: Literal["off", "auto"] = "off"  # auto = the planner picks what you left out to fit the GPU
    memory_cap_gib: float = 0.0  # use at most this much of the GPU, CUDA context included (0 = all of it); also the planner's budget
    # several processes (torchrun / accelerate launch): ddp = each GPU holds the whole 4-bit model, fsdp = the base
    # is sharded across GPUs, auto = ddp when the run fits one GPU, fsdp otherwise; one process ignores it unless
    # it is fsdp (a process group of one, for fsdp_cpu_offload on a single GPU)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_cpu_offload: bool = False  # fsdp: keep the sharded parameters in CPU memory between uses (host RAM)


@dataclass
class OutputConfig:
    dir: str = "outputs/run"  # where checkpoints, metrics.jsonl and the final adapter go
    overwrite: bool = False  # allow writing into a folder that already holds a run
    base_model_name: str = ""  # adapter_config.json's base_model_name_or_path; default: the base's absolute path
    tensorboard: bool = False  # also log loss, eval loss, lr, grad norm, tokens/s, VRAM to dir/tensorboard


@dataclass
class RunSpec:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    explicit_keys: frozenset = frozenset()  # "section.key" names the user set (the planner fills the others)

    def value(self, key: str) -> Any:
        """The value of `section.key`."""
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def with_values(self, values: dict[str, Any]) -> "RunSpec":
        """A copy with each `section.key` set to its value; `explicit_keys` unchanged (choices made for the user
        stay the planner's to revisit)."""
        changed = copy.deepcopy(self)
        for key, value in values.items():
            section, name = key.split(".")
            if not hasattr(getattr(changed, section), name):
                raise KeyError(key)
            setattr(getattr(changed, section), name, value)
        return changed

    def validate(self) -> None:
        """Reject values no run can use. Checks that need the model's shapes live in `adapters.py`."""
        if not self.model.path:
            raise ConfigError("model.path: missing; set it to a local model folder")
        if not self.data.path:
            raise ConfigError("data.path: missing; set it to a JSONL/JSON/CSV/Parquet file or a dataset folder")
        positive = {
            "adapter.r": self.adapter.r,
            "adapter.lora_alpha": self.adapter.lora_alpha,
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
            "training.attention_chunk_tokens": self.training.attention_chunk_tokens,
            "training.num_epochs": self.training.num_epochs,
        }
        for key, value in non_negative.items():
            if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{key}: {value} is not allowed; it must be a finite number >= 0")
        if not 0.0 <= self.adapter.lora_dropout < 1.0:
            raise ConfigError(f"adapter.lora_dropout: {self.adapter.lora_dropout} is not allowed; use 0 <= dropout < 1")
        if self.training.num_epochs and "training.max_steps" in self.explicit_keys:
            raise ConfigError("training.num_epochs: set together with training.max_steps; keep one (num_epochs "
                              "counts passes over the train examples, max_steps optimizer steps)")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: {self.data.eval_fraction} is not allowed; use 0 <= x < 1")
        _check_data(self.data)
        targets = self.adapter.target_modules
        if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
            raise ConfigError("adapter.target_modules: empty; use attn, mlp, all-linear or a list of module names")
        if isinstance(targets, str) and not targets.strip():
            raise ConfigError("adapter.target_modules: empty; use attn, mlp, all-linear or a list of module names")
        if self.adapter.type != "lora" and (self.adapter.use_dora or self.adapter.use_rslora):
            raise ConfigError(f"adapter.use_dora/use_rslora: only for adapter.type lora, not {self.adapter.type}")


def _check_data(data: DataConfig) -> None:
    """data.path's files and weights, data.columns against the format's fields, data.prompt_template."""
    if not isinstance(data.path, str):
        for index, source in enumerate(data.sources()):
            if not source.path.strip():
                raise ConfigError(f"data.path[{index}]: no path; give each entry a path or {{path: ..., weight: ...}}")
            if not source.weight > 0 or not math.isfinite(source.weight):
                raise ConfigError(f"data.path[{index}].weight: {source.weight} is not allowed; it must be a finite "
                                  "number > 0")
    fields = FORMAT_FIELDS[data.format]
    for name in data.columns:
        if name not in fields:
            raise ConfigError(f"data.columns.{name}: not a field of data.format {data.format}; its fields are "
                              f"{', '.join(fields)}")
    if "text" in data.columns and data.text_field != "text":
        raise ConfigError("data.text_field: set twice, also as data.columns.text; keep only data.columns.text")
    if "instruction" not in data.prompt_fields():
        raise ConfigError("data.prompt_template: has no {instruction}; the template must place the row's "
                          "instruction (and may place {input})")
