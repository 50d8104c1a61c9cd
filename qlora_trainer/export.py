"""Use a trained adapter: merge it into a dequantized 16-bit base, generate, switch adapters on one base."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel

from qlora_trainer import model as model_loading
from qlora_trainer.checkpoint import replace_folder_atomically
from qlora_trainer.config import ModelConfig, QuantizationConfig
from qlora_trainer.errors import UserError


def check_adapter_dir(path: Path, flag: str = "--adapter") -> None:
    """An adapter folder must hold adapter_config.json and adapter_model.safetensors."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{flag}: {path} has no {name}; give an adapter folder written by train (output/adapter)")


def load_for_inference(model_path: str, quant_mode: str) -> model_loading.LoadedBase:
    base = model_loading.load_base(ModelConfig(path=model_path), QuantizationConfig(mode=quant_mode),
                                   gradient_checkpointing=False)
    base.model.eval()
    return base


def merge(model_path: str, adapter_dir: Path, out_dir: Path, quant_mode: str = "nf4", overwrite: bool = False) -> Path:
    """Write base + adapter as one 16-bit safetensors model.

    The base is loaded as it was trained (NF4 by default) and dequantized before merging, so the merged
    weights equal what the adapter was trained against, not the original full-precision weights.
    """
    check_adapter_dir(adapter_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out: {out_dir} is not empty; choose another folder or pass --overwrite")
    base = load_for_inference(model_path, quant_mode)
    model = base.model
    if quant_mode != "none":
        model = model.dequantize(dtype=base.compute_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.use_cache = True
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_folder_atomically(tmp, out_dir)
    return out_dir


@dataclass(frozen=True)
class Generation:
    adapter: str  # adapter name, or "base" for the model without adapters
    text: str  # the generated continuation only


def generate(model_path: str, adapters: list[tuple[str, Path]], prompts: list[str], max_new_tokens: int,
             quant_mode: str = "nf4", include_base: bool = False) -> Iterator[Generation]:
    """Greedy continuations of each prompt under each adapter; adapters are switched on one loaded base."""
    for _, path in adapters:
        check_adapter_dir(path)
    base = load_for_inference(model_path, quant_mode)
    tokenizer = base.tokenizer
    model = base.model
    if adapters:
        first_name, first_path = adapters[0]
        model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
        for name, path in adapters[1:]:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()

    def run(name: str) -> Iterator[Generation]:
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(base.device)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            continuation = output[0, encoded["input_ids"].shape[1]:]
            yield Generation(name, tokenizer.decode(continuation, skip_special_tokens=True))

    if include_base or not adapters:
        if adapters:
            with model.disable_adapter():
                yield from run("base")
        else:
            yield from run("base")
    for name, _ in adapters:
        model.set_adapter(name)
        yield from run(name)
