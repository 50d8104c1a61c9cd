"""The memory planner: predict a run's peak GPU memory from shapes alone and choose a plan that fits.

This module maps between the outside world and the planner: model configs (a folder or a preset) and the
run config (RunConfig <-> TrainingPlan / FixedChoices).
"""

import dataclasses
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from qlora_trainer.config import RunConfig
from qlora_trainer.errors import UserError
from qlora_trainer.planner.memory import TrainingPlan
from qlora_trainer.planner.search import FixedChoices, PlanResult

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_model_config(model: str) -> PretrainedConfig:
    """The transformers config of a model folder (config.json is enough), a config.json file, or a preset name
    from configs/models/. Never runs code shipped with a model."""
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


def plan_from_run_config(config: RunConfig, compute_dtype: str) -> TrainingPlan:
    """The plan a run config describes. `compute_dtype` is the resolved one (bfloat16 or float16)."""
    targets = config.adapter.target_modules
    return TrainingPlan(
        rank=config.adapter.r,
        lora_alpha=config.adapter.alpha,
        adapter_type=config.adapter.type,
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        gradient_checkpointing=config.training.gradient_checkpointing,
        checkpointed_layers=config.training.checkpointed_layers,
        offload_checkpoints=config.training.offload_checkpoints,
        micro_batch_size=config.training.micro_batch_size,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        seq_len=config.training.max_seq_len,
        optimizer=config.training.optimizer,
        quant=config.quantization.mode,
        compute_dtype=compute_dtype,
        adapter_dtype=config.adapter.dtype,
        lora_dropout=config.adapter.dropout,
        loss_chunk_tokens=config.training.loss_chunk_tokens,
        mlp_chunk_tokens=config.training.mlp_chunk_tokens,
        compiled_layers=config.training.compile_layers != "off",  # "auto" compiles on GPUs, which plans are for
        attn_implementation=config.model.attn_implementation,
        double_quant=config.quantization.double_quant,
        upcast_non_quantized=config.model.upcast_non_quantized,
        use_dora=config.adapter.use_dora,
        packed=config.data.packing,
    )


def fixed_choices(config: RunConfig) -> FixedChoices:
    """The choices the user wrote in the config (or with --set); the planner may change only the others."""
    def given(key: str, value):
        return value if key in config.explicit_keys else None

    targets = config.adapter.target_modules
    return FixedChoices(
        rank=given("adapter.r", config.adapter.r),
        lora_alpha=given("adapter.alpha", config.adapter.alpha),
        target_modules=given("adapter.target_modules", targets if isinstance(targets, str) else tuple(targets)),
        gradient_checkpointing=given("training.gradient_checkpointing", config.training.gradient_checkpointing),
        micro_batch_size=given("training.micro_batch_size", config.training.micro_batch_size),
        optimizer=given("training.optimizer", config.training.optimizer),
        checkpointed_layers=given("training.checkpointed_layers", config.training.checkpointed_layers),
        offload_checkpoints=given("training.offload_checkpoints", config.training.offload_checkpoints),
        mlp_chunk_tokens=given("training.mlp_chunk_tokens", config.training.mlp_chunk_tokens),
    )


def apply_planned_choices(config: RunConfig, result: PlanResult) -> RunConfig:
    """A copy of `config` with the planner's choices (the fixed ones come back unchanged)."""
    plan = result.plan
    targets = plan.target_modules if isinstance(plan.target_modules, str) else list(plan.target_modules)
    adapter = dataclasses.replace(config.adapter, r=plan.rank, alpha=plan.lora_alpha, target_modules=targets)
    training = dataclasses.replace(
        config.training, gradient_checkpointing=plan.gradient_checkpointing,
        checkpointed_layers=plan.checkpointed_layers, offload_checkpoints=plan.offload_checkpoints,
        mlp_chunk_tokens=plan.mlp_chunk_tokens,
        micro_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps, optimizer=plan.optimizer,
    )
    return dataclasses.replace(config, adapter=adapter, training=training)
