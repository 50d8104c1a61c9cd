"""What may differ when a run is resumed: the one list of keys that cannot change what is trained, and the
comparison of a resumed run's specification with the one its checkpoints were trained under (run_config.json).

Every key not listed here changes which steps are taken (the model, quantization, adapter, data, learning rate,
schedule, seed, optimizer, ...), so a resume with it changed would continue one run's weights and optimizer as
another run: refused. The comparison is of the specification as it runs, after `training.plan: auto` filled in
its choices, because that is what trained and what would train; run_config.json holds the same.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_trainer.spec import RunSpec, spec_to_dict
from qlora_trainer.spec.load import RENAMED_KEYS

# Keys a resume may change: they decide where the run is, when it writes, logs or stops, or how the same step is
# computed in memory and time, never which examples it sees or what arithmetic updates the weights.
ALLOWED_ON_RESUME = {
    "output.dir": "where the run is",
    "output.overwrite": "how a run starts",
    "training.resume": "how a run starts",
    "training.logging_steps": "when metrics are written",
    "output.tensorboard": "where metrics are also shown",
    "output.base_model_name": "how the saved adapter names its base",
    "training.save_steps": "when checkpoints are written",
    "training.save_total_limit": "how many checkpoints are kept",
    "training.eval_steps": "when the eval loss is measured (no gradient, no dropout, no random draws)",
    "training.max_bad_steps": "when a failing run stops",
    "training.oom_retry": "what an out-of-memory step does (a run may halve its micro-batch at any step)",
    "training.memory_cap_gib": "the memory budget (what the planner chooses for it is compared key by key)",
    "training.plan": "whether the planner fills open keys (what it chooses is compared key by key)",
    # How one step is computed, for memory and speed: the same examples and the same arithmetic, the numbers
    # equal up to float rounding and dropout's masks (drawn per micro-batch). The out-of-memory advice asks for
    # these, and a resume on a smaller GPU needs them.
    "training.gradient_checkpointing": "memory: recomputed activations",
    "training.checkpointed_layers": "memory: recomputed activations",
    "training.offload_checkpoints": "memory: activations in host memory",
    "training.loss_chunk_tokens": "memory: the loss a chunk of tokens at a time",
    "training.loss_kernel": "memory: the same loss, fused or a chunk of tokens at a time",
    "training.mlp_chunk_tokens": "memory: MLPs a chunk of tokens at a time",
    "training.attention_chunk_tokens": "memory: attention a chunk of queries at a time",
    "training.recompute_keys": "memory: keys and values made a block at a time where used (the same bits)",
    "training.fused_lora": "speed: one kernel path for the same LoRA forward",
    "training.compile_layers": "speed: compiled decoder layers",
    "model.attn_implementation": "speed: the attention kernel",
    "training.distributed": "memory: how several processes hold the model (the same step; the world size is "
                            "checked apart, training/run_start.py)",
    "training.fsdp_cpu_offload": "memory: FSDP's parameters in host memory between uses",
    "training.micro_batch_size": "memory, while examples per step (x gradient_accumulation_steps) stay the same",
    "training.gradient_accumulation_steps": "memory, while examples per step (x micro_batch_size) stay the same",
    "training.max_steps": "upward, with lr_scheduler constant: the steps already taken stay those of the longer run",
}

_PATH_KEYS = ("model.path", "model.tokenizer_path", "data.path")


@dataclass(frozen=True)
class ResumeDifferences:
    allowed: list[str]  # "key old -> new" for each change in ALLOWED_ON_RESUME
    refused: list[str]  # "key old -> new (why)" for each change that would alter training


def _flat(raw: dict) -> dict[str, Any]:
    flat = {f"{section}.{key}": value for section, values in raw.items() if isinstance(values, dict)
            for key, value in values.items()}
    return {RENAMED_KEYS.get(key, key): value for key, value in flat.items()}


def _data_files(value: Any) -> list[tuple[str, float]]:
    """data.path as (file, weight) pairs, each file by its real path where it exists."""
    entries = value if isinstance(value, list) else [value]
    pairs = [(entry, 1.0) if isinstance(entry, str) else (entry["path"], entry["weight"]) for entry in entries]
    return [(os.path.realpath(path) if path and Path(path).exists() else path, weight) for path, weight in pairs]


def _same(key: str, saved: Any, new: Any) -> bool:
    if key == "data.path":  # one file or a weighted list; a file the same whether named relative or absolute
        return _data_files(saved) == _data_files(new)
    if key in _PATH_KEYS and saved and new and Path(saved).exists() and Path(new).exists():
        return os.path.realpath(saved) == os.path.realpath(new)  # one file, whether named relative or absolute
    return saved == new


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _why_refused(key: str, saved: dict, new: dict) -> str:
    """Why an allowed-with-conditions key is refused here, or "" when its condition holds."""
    if key in ("training.micro_batch_size", "training.gradient_accumulation_steps"):
        before = saved["training.micro_batch_size"] * saved["training.gradient_accumulation_steps"]
        after = new["training.micro_batch_size"] * new["training.gradient_accumulation_steps"]
        if before != after:
            return (f"examples per step {before} -> {after}; keep micro_batch_size x gradient_accumulation_steps "
                    f"at {before}")
    if key == "training.max_steps":
        if new[key] < saved[key]:
            return "fewer steps than the run was laid out for"
        if new["training.lr_scheduler"] != "constant":
            return (f"the {new['training.lr_scheduler']} schedule is laid over max_steps, so every later step's "
                    "learning rate would change")
    return ""


def compare_for_resume(saved_raw: dict, spec: RunSpec) -> ResumeDifferences:
    """Each key of `spec` (as it runs) that differs from the saved run_config.json, allowed or refused. A key the
    saved file lacks (written by an older version) is compared with its default."""
    saved = _flat(spec_to_dict(RunSpec())) | _flat(saved_raw)
    new = _flat(spec_to_dict(spec))
    allowed, refused = [], []
    for key, value in new.items():
        if _same(key, saved.get(key), value):
            continue
        change = f"{key} {_show(saved.get(key))} -> {_show(value)}"
        if key not in ALLOWED_ON_RESUME:
            planned = spec.training.plan == "auto" and key not in spec.explicit_keys
            refused.append(change + (" (the planner's choice for this GPU; set it to the run's value to resume here)"
                                     if planned else ""))
        elif why := _why_refused(key, saved, new):
            refused.append(f"{change} ({why})")
        else:
            allowed.append(change)
    return ResumeDifferences(allowed, refused)
