"""Build a training session from a resolved run: one ordered pipeline, from the quantized base to the optimizer.

    1. the frozen base, quantized as specified, in the resolved compute dtype, with the resolved attention (base.py;
       packed rows on a recent GPU: packed_attention.py)
    2. the adapter, through peft, in adapter.dtype (adapters.py)
    3. checkpointing of the decoder layers, their inputs offloaded to CPU memory if asked (checkpointing.py)
    4. the fused LoRA-on-4-bit forward, where it applies (fused_lora.py)
    5. MLPs and the final norm a chunk of tokens at a time, and attention (or each checkpointed layer's whole
       backward) a chunk of queries at a time, if asked (token_chunks.py, chunked_attention.py)
    6. compiled decoder layers, where they apply (compiled_layers.py); so the graphs trace steps 3-5's forwards,
       with the 4-bit weights dequantized by the graphs' own kernels (nf4_in_graph.py)
    7. with several processes, the step's forward wrapped for DDP or sharded with FSDP2 (distributed.py)
    8. the optimizer (over the wrapped parameters), the learning-rate schedule and, for fp16, the gradient scaler

`train`, `bench` and the peer comparison build through here; `step.py` takes the session's steps.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig, get_scheduler

from qlora_trainer.engine import adapters, packed_attention
from qlora_trainer.engine.base import DTYPES, check_weights_match, device_for, load_base
from qlora_trainer.engine.checkpointing import enable_activation_checkpointing
from qlora_trainer.engine.chunked_attention import check_attention_chunking, chunk_attention
from qlora_trainer.engine.token_chunks import chunk_mlps
from qlora_trainer.engine.compiled_layers import compile_decoder_layers
from qlora_trainer.engine.distributed import SINGLE, Processes, wrap
from qlora_trainer.engine.loss import LossModule
from qlora_trainer.engine.fused_lora import use_fused_lora
from qlora_trainer.engine.nf4_in_graph import use_in_graph_dequantization
from qlora_trainer.errors import ConfigError
from qlora_trainer.spec import ResolvedRun


@dataclass
class Session:
    """What the training steps work with, once everything is built."""

    run: ResolvedRun
    model: nn.Module  # the peft model
    causal_lm: nn.Module  # the transformers model inside it
    tokenizer: object
    device: torch.device
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]  # fp16 only: loss scaling
    summary: adapters.AdapterSummary
    loss_sum: nn.Module  # batch -> summed token loss: the forward whose gradients train (DDP/FSDP-wrapped with several)
    processes: Processes = SINGLE  # this process among the run's (one by default)


def check_before_loading(run: ResolvedRun, model_config: PretrainedConfig) -> Optional[str]:
    """What can be checked against the model's shapes without its weights: the weight files against config.json,
    targets, rank, checkpointed layers, whether the adapter will be usable. Returns a one-line note where the trained
    adapter will load only through this trainer (adapters.usability_note)."""
    spec = run.spec
    meta = adapters.meta_model(model_config, spec.model.trust_remote_code)
    check_weights_match(spec.model.path, {name: tuple(t.shape) for name, t in meta.state_dict().items()})
    _, layers = adapters.resolve_targets(meta, spec.adapter.target_modules)
    adapters.check_rank(spec.adapter, layers)
    if spec.training.attention_chunk_tokens:
        check_attention_chunking(meta, run.attention)
    count, limit = spec.training.checkpointed_layers or 0, model_config.num_hidden_layers
    if count > limit:
        raise ConfigError(f"training.checkpointed_layers: {count} is more than the model's {limit} decoder "
                          f"layers; use 0 to {limit}")
    return adapters.usability_note(spec.adapter.type, spec.quantization.mode, model_config,
                                   spec.model.trust_remote_code, meta=meta)


def build_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """torch AdamW (`fused`: its fused kernel, for parameters on a GPU; else torch's default), or bitsandbytes 8-bit
    AdamW (optionally in paged unified memory)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def build(run: ResolvedRun, processes: Processes = SINGLE) -> Session:
    """Load and prepare everything `run` trains with, in the order of the module docstring, as this one of
    `processes` (engine/distributed.py)."""
    spec, training = run.spec, run.spec.training
    device = device_for(run.device_type, processes.local_rank)
    if run.attention == packed_attention.ATTENTION_NAME:
        packed_attention.register()
    base = load_base(spec.model, spec.quantization, DTYPES[run.compute_dtype], device, run.attention,
                     shardable=processes.strategy == "fsdp")  # 1
    keys, layers = adapters.resolve_targets(base.model, spec.adapter.target_modules)
    model, summary = adapters.attach_adapter(base.model, spec.adapter, keys, layers)  # 2
    # adapter_config.json names the base by its absolute path, so the adapter loads from any folder (or as the user
    # names it for sharing, output.base_model_name)
    model.peft_config["default"].base_model_name_or_path = (spec.output.base_model_name
                                                            or os.path.abspath(spec.model.path))
    if training.gradient_checkpointing:  # 3
        enable_activation_checkpointing(model.get_base_model(), training.checkpointed_layers,
                                        training.offload_checkpoints, run.prefetch_checkpoints)
    if run.fused_lora:  # 4
        use_fused_lora(model)
    if training.mlp_chunk_tokens:  # 5
        chunk_mlps(model, training.mlp_chunk_tokens)
    if training.attention_chunk_tokens:
        chunk_attention(model, training.attention_chunk_tokens, run.layer_backward_chunked, run.key_blocks,
                        run.keys_recomputed)
    if run.compile_layers:  # 6
        use_in_graph_dequantization(model)
        compile_decoder_layers(model)
    loss_sum = wrap(LossModule(model.get_base_model(), training.loss_chunk_tokens, run.fused_loss), processes,
                    training.fsdp_cpu_offload)  # 7
    trainable = [p for p in model.parameters() if p.requires_grad]  # 8
    optimizer = build_optimizer(training.optimizer, trainable, training.learning_rate, training.weight_decay,
                                run.fused_optimizer)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.warmup_steps,
                              num_training_steps=training.max_steps)
    scaler = torch.amp.GradScaler(device.type) if run.loss_scaling else None
    model.train()
    return Session(run, model, model.get_base_model(), base.tokenizer, device, trainable, optimizer, scheduler,
                   scaler, summary, loss_sum, processes)
