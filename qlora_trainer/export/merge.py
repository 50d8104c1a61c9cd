"""Merge a trained adapter into its dequantized base and save a 16-bit safetensors model."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_trainer.engine.adapters import load_adapter, meta_model
from qlora_trainer.engine.base import DTYPES, LoadedBase, device_for, load_base
from qlora_trainer.errors import UserError
from qlora_trainer.hardware import detect_hardware
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.training.checkpoints import replace_folder_atomically

MARKER = "qlora_trainer_merge.json"  # written last into every merge output: its provenance and the files it wrote


def check_adapter_dir(path: Path, flag: str = "--adapter") -> None:
    """An adapter folder must hold a peft adapter_config.json and a complete adapter_model.safetensors; checked
    before the base loads, so a broken adapter is named in one line rather than a traceback after the load."""
    hint = "give an adapter folder written by train (output/adapter)"
    if not path.is_dir():
        raise UserError(f"{flag}: {path} {'is a file' if path.exists() else 'does not exist'}; {hint}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{flag}: {path} has no {name}; {hint}")
    try:
        peft_type = PeftConfig.from_pretrained(str(path)).peft_type
    except (ValueError, TypeError, KeyError):  # not JSON, not a JSON object, or a peft_type peft does not know
        peft_type = None
    if peft_type is None:
        raise UserError(f"{flag}: {path / 'adapter_config.json'} is not a peft adapter config; {hint}")
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt"):
            pass  # opening reads the header and checks it against the file's length
    except (SafetensorError, OSError) as err:
        reason = (str(err).strip().splitlines() or ["unreadable"])[0]
        raise UserError(f"{flag}: {path / 'adapter_model.safetensors'} is not a complete safetensors file "
                        f"({reason}); {hint}") from None


def load_for_inference(model_path: str, quant_mode: str) -> LoadedBase:
    """The base as `train` loads it (same quantization and compute dtype rule, for this machine), in eval mode."""
    spec = RunSpec().with_values({"model.path": model_path, "quantization.mode": quant_mode})
    run = resolve(spec, detect_hardware())
    base = load_base(spec.model, spec.quantization, DTYPES[run.compute_dtype], device_for(run.device_type))
    base.model.eval()
    return base


def _files_of_earlier_merge(folder: Path) -> Optional[list[str]]:
    """The files an earlier merge wrote into `folder`, from its marker; None where no merge wrote it."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, list) else None


def check_can_be_made(target: Path, given: Path, hint: str) -> None:
    """Refuse `--out` (`given`, resolved `target`) when a file stands where its folder should be, or its nearest
    existing folder is not writable: the output and its temporary copy are made there."""
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"--out: {parent} is a file, so {given} cannot be made; {hint}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out: cannot write in {parent}; give a folder you may write in")


def check_out_dir(out_dir: Path, model_path: str, adapter_dir: Path, overwrite: bool) -> Path:
    """The folder merge may write, resolved: a new or empty one, or (with overwrite) an earlier merge's output that
    holds only what that merge wrote. Never one that holds the adapter or the base or lies inside either, and never
    one that cannot be made: all of this is refused before the base loads."""
    out = out_dir.resolve()
    for what, path in (("adapter", adapter_dir), ("base model", Path(model_path))):
        if not path.exists():
            continue
        folder = path.resolve()
        if folder == out or out in folder.parents:
            raise UserError(f"--out: {out_dir} holds the {what} ({path}); choose a folder of its own")
        if folder in out.parents:
            raise UserError(f"--out: {out_dir} is inside the {what} folder ({path}); choose a folder of its own")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out_dir} is a file; give a folder for the merged model")
    check_can_be_made(out, out_dir, "give a folder for the merged model")
    if not out.exists() or not any(out.iterdir()):
        return out
    written = _files_of_earlier_merge(out)
    if written is None:
        raise UserError(f"--out: {out_dir} is not empty and holds no earlier merge; choose a new or empty folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in written)
    if others:
        raise UserError(f"--out: {out_dir} holds files merge did not write ({', '.join(others)}); "
                        "choose a new or empty folder")
    if not overwrite:
        raise UserError(f"--out: {out_dir} holds an earlier merge; pass --overwrite to replace it")
    return out


def merge_in_float32(model: PeftModel) -> nn.Module:
    """Fold the adapter into each layer it wraps, in float32, and round each merged weight once to the layer's dtype.

    One layer at a time, so the float32 copy costs one layer's memory, and every adapter type (and peft variant,
    such as DoRA) merges through peft's own rule.
    """
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            layer = module.get_base_layer()
            dtype = layer.weight.dtype
            layer.weight.data = layer.weight.data.float()
            module.merge()
            layer.weight.data = layer.weight.data.to(dtype)
    return model.unload()


def restore_module_layouts(model: nn.Module) -> None:
    """Give GPT-2 style Conv1D layers back their class and (in, out) weight layout.

    bitsandbytes loads a Conv1D as a Linear4bit / Linear8bitLt holding the weight transposed to (out, in), and
    dequantizing gives an nn.Linear; saved under Conv1D's keys, those weights would not load (or, square, load
    transposed without a word).
    """
    architecture = meta_model(model.config)
    for name, module in architecture.named_modules():
        current = model.get_submodule(name)
        if isinstance(module, Conv1D) and not isinstance(current, Conv1D):
            with torch.device("meta"):
                conv = Conv1D(current.out_features, current.in_features)
            conv.weight = nn.Parameter(current.weight.detach().T.contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(current.bias.detach(), requires_grad=False)
            model.set_submodule(name, conv)


def merged_model(base: LoadedBase, adapter_dir: Path, quant_mode: str) -> nn.Module:
    """Base (`load_for_inference`) + adapter merged in memory: the base dequantized to the compute dtype, the adapter
    merged in float32, each merged weight in the compute dtype (what `merge` writes and the GGUF export converts)."""
    model = base.model
    if quant_mode != "none":
        model = model.dequantize(dtype=base.compute_dtype)
    merged = merge_in_float32(load_adapter(model, adapter_dir))
    restore_module_layouts(merged)
    return merged


def merge(model_path: str, adapter_dir: Path, out_dir: Path, quant_mode: str = "nf4", overwrite: bool = False) -> Path:
    """Write base + adapter as one 16-bit safetensors model that plain transformers loads.

    The base is loaded as it was trained (NF4 by default) and dequantized to the compute dtype: the exact weights the
    adapter was trained against. Each merged weight is rounded once, from float32, to that dtype. The output is
    written to a temporary folder and replaces `out_dir` only once complete; see check_out_dir for what is refused.
    """
    check_adapter_dir(adapter_dir)
    out = check_out_dir(out_dir, model_path, adapter_dir, overwrite)
    base = load_for_inference(model_path, quant_mode)
    merged = merged_model(base, adapter_dir, quant_mode)
    merged.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        files = sorted([p.name for p in tmp.iterdir()] + [MARKER])
        provenance = {"model": model_path, "adapter": str(adapter_dir), "quant": quant_mode, "files": files}
        (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        replace_folder_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
