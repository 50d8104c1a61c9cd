"""Merge a trained adapter into its dequantized base and save a 16-bit safetensors model."""

import json
import shutil
from pathlib import Path

from peft import PeftModel

from qlora_trainer.engine.base import DTYPES, LoadedBase, device_for, load_base
from qlora_trainer.errors import UserError
from qlora_trainer.hardware import detect_hardware
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.training.checkpoints import replace_folder_atomically


def check_adapter_dir(path: Path, flag: str = "--adapter") -> None:
    """An adapter folder must hold adapter_config.json and adapter_model.safetensors."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{flag}: {path} has no {name}; give an adapter folder written by train (output/adapter)")


def load_for_inference(model_path: str, quant_mode: str) -> LoadedBase:
    """The base as `train` loads it (same quantization and compute dtype rule, for this machine), in eval mode."""
    spec = RunSpec().with_values({"model.path": model_path, "quantization.mode": quant_mode})
    run = resolve(spec, detect_hardware())
    base = load_base(spec.model, spec.quantization, DTYPES[run.compute_dtype], device_for(run.device_type))
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
