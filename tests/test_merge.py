"""Merging LoRA / LoHa / LoKr into Llama, Qwen2 and GPT-2 bases, and what merge --out may replace."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import tiny_base
from qlora_trainer.errors import UserError
from qlora_trainer.export.merge import MARKER, merge
from qlora_trainer.spec import QuantizationConfig
from tiny_models import make_adapter, save_tiny_model

# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself
BF16_ROUNDING = 2.0 ** -8
# float32 sums taken in another order may differ in the last bit, which can move a bf16 rounding across a tie
FLOAT32_SLACK = 2.0 ** -23


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"llama": tiny_llama_dir, "qwen2": save_tiny_model(root / "qwen2", "qwen2"),
            "gpt2": save_tiny_model(root / "gpt2", "gpt2")}


@pytest.fixture(scope="module")
def adapter_for(bases, tmp_path_factory):
    """adapter_for(arch, type, quant): an adapter trained (randomly) on that base, made once per module."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}

    def get(arch: str, adapter_type: str, quant_mode: str = "nf4") -> Path:
        key = (arch, adapter_type, quant_mode)
        if key not in made:
            made[key] = make_adapter(bases[arch], root / "-".join(key), adapter_type, quant_mode=quant_mode)
        return made[key]
    return get


def reference(model_dir: Path, adapter_dir: Path, quant_mode: str) -> PeftModel:
    """Base + adapter unmerged, in float32: the base as trained (dequantized to the bf16 values the adapter was
    trained against), the adapter through plain peft."""
    model = tiny_base(model_dir, quantization=QuantizationConfig(mode=quant_mode)).model
    if quant_mode != "none":
        model = model.dequantize(dtype=torch.bfloat16)
    return PeftModel.from_pretrained(model.float(), str(adapter_dir)).eval()


def linear_layout(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out, in), whatever the layer's own layout."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def tensor_layout(folder: Path) -> dict[str, tuple]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}


CASES = [(arch, kind, "nf4") for arch in ("llama", "qwen2", "gpt2") for kind in ("lora", "loha", "lokr")]


@pytest.mark.parametrize("arch, adapter_type, quant_mode", CASES + [("gpt2", "lora", "none")],
                         ids=["-".join(case) for case in CASES + [("gpt2", "lora", "none")]])
def test_merged_model_loads_in_plain_transformers_and_equals_base_plus_adapter(bases, adapter_for, tmp_path,
                                                                               arch, adapter_type, quant_mode):
    adapter_dir = adapter_for(arch, adapter_type, quant_mode)
    out = merge(str(bases[arch]), adapter_dir, tmp_path / "merged", quant_mode)
    assert tensor_layout(out) == tensor_layout(bases[arch])  # every tensor in the base's own keys, shapes, dtype
    merged, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    merged.eval()
    unmerged = reference(bases[arch], adapter_dir, quant_mode)

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids=x).logits
        unmerged_logits = unmerged(input_ids=x).logits
        with unmerged.disable_adapter():
            base_logits = unmerged(input_ids=x).logits
    # Both run in float32; they differ only by the rounding of each merged weight to bf16. To first order a layer
    # whose weights move by at most 2^-8 of themselves moves its output by at most 2^-8 of its size, and the merged
    # layers' moves add up: |difference| <= (merged layers) * 2^-8 * max |logit|.
    merged_layers = sum(isinstance(module, BaseTunerLayer) for module in unmerged.modules())
    scale = unmerged_logits.abs().max()
    difference = (merged_logits - unmerged_logits).abs()
    assert difference.max() <= merged_layers * BF16_ROUNDING * scale, (difference.max(), scale)
    assert (base_logits - unmerged_logits).abs().mean() > 10 * difference.mean()  # the adapter matters

    # weight by weight: the float32 merge of the same base and adapter, rounded once to bf16
    exact = unmerged.merge_and_unload()
    for name, module in merged.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            got, want = linear_layout(module), linear_layout(exact.get_submodule(name))
            assert ((got - want).abs() <= (BF16_ROUNDING + FLOAT32_SLACK) * want.abs()).all(), name


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file and folder under `folders`, with the files' bytes."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            found[str(path)] = path.read_bytes() if path.is_file() else b"<dir>"
    return found


def test_merge_replaces_only_an_earlier_merge_and_a_refused_merge_changes_nothing(bases, adapter_for, tmp_path):
    model = str(bases["llama"])
    run = tmp_path / "run"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    for file in adapter_for("llama", "lora").iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    earlier = merge(model, adapter, tmp_path / "merged")
    assert sorted(p.name for p in earlier.iterdir()) == json.loads((earlier / MARKER).read_text())["files"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    annotated = tmp_path / "annotated"
    merge(model, adapter, annotated)
    (annotated / "notes.txt").write_text("mine too")
    (tmp_path / "a-file").write_text("not a folder")

    refused = [
        (adapter, True, "holds the adapter"),
        (run, True, "holds the adapter"),
        (bases["llama"], True, "holds the base model"),
        (mine, True, "holds no earlier merge"),
        (annotated, True, r"holds files merge did not write \(notes.txt\)"),
        (earlier, False, "pass --overwrite"),
        (tmp_path / "a-file", True, "is a file"),
    ]
    before = snapshot(tmp_path, bases["llama"])
    for out, overwrite, message in refused:
        with pytest.raises(UserError, match=f"^--out: .*{message}"):
            merge(model, adapter, out, overwrite=overwrite)
        assert snapshot(tmp_path, bases["llama"]) == before, out
    # a merge that fails after loading (an adapter of another model) leaves the earlier output as it was
    with pytest.raises(UserError, match="does not fit this base model"):
        merge(model, adapter_for("gpt2", "lora"), earlier, overwrite=True)
    assert snapshot(tmp_path, bases["llama"]) == before

    loha = adapter_for("llama", "loha")
    merge(model, loha, earlier, overwrite=True)
    after = snapshot(tmp_path, bases["llama"])
    elsewhere = lambda files: {path: data for path, data in files.items() if not path.startswith(str(earlier))}
    assert elsewhere(after) == elsewhere(before)  # nothing else touched, no temporary folder left behind
    assert after[str(earlier / "model.safetensors")] != before[str(earlier / "model.safetensors")]
    assert json.loads((earlier / MARKER).read_text())["adapter"] == str(loha)
