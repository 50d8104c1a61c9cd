"""Merging an adapter into a dequantized base, and generating with several adapters on one base."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_trainer.engine import adapters
from qlora_trainer.cli import main
from qlora_trainer.spec import AdapterConfig, ModelConfig
from qlora_trainer.export.generate import generate
from qlora_trainer.export.merge import merge
from qlora_trainer.engine.base import load_model_config
from conftest import tiny_base


def make_adapter(model_dir, out_dir, seed: int):
    """A LoRA adapter with non-zero random weights, as training would leave it."""
    base = tiny_base(model_dir).model
    keys, layers = adapters.resolve_targets(adapters.meta_model(load_model_config(ModelConfig(path=str(model_dir)))),
                                            "all-linear")
    peft_model, _ = adapters.attach_adapter(base, AdapterConfig(r=4, lora_alpha=8), keys, layers)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def two_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_llama_dir, root / "a", 1), make_adapter(tiny_llama_dir, root / "b", 2)


def test_merged_model_matches_the_unmerged_one(tiny_llama_dir, two_adapters, tmp_path):
    adapter_dir = two_adapters[0]
    out = merge(str(tiny_llama_dir), adapter_dir, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors")) and not any(out.glob("*.bin"))

    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    base = tiny_base(tiny_llama_dir)
    unmerged = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=x).logits.float()
        unmerged_logits = unmerged(input_ids=x).logits.float()
    # bf16 rounding of the merged weights (and of activations) is the only difference. Tolerance:
    # max |difference| <= 5% and mean |difference| <= 1% of max |logit|; the adapter itself moves them far more.
    scale = unmerged_logits.abs().max()
    difference = (merged_logits - unmerged_logits).abs()
    assert difference.max() <= 0.05 * scale and difference.mean() <= 0.01 * scale, (difference.max(), scale)
    with unmerged.disable_adapter(), torch.no_grad():
        base_logits = unmerged(input_ids=x).logits.float()
    assert (base_logits - unmerged_logits).abs().mean() > 10 * difference.mean()  # the adapter matters


def test_merge_refuses_a_non_empty_output_and_a_bad_adapter(tiny_llama_dir, two_adapters, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code = main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(two_adapters[0]),
                 "--out", str(tmp_path / "taken")])
    assert code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    code = main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")])
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_switching_adapters_gives_each_adapters_own_output(tiny_llama_dir, two_adapters):
    a, b = two_adapters
    prompts = ["the quick brown fox", "hello world"]
    switched = list(generate(str(tiny_llama_dir), [("a", a), ("b", b)], prompts, 8, include_base=True))
    assert [g.adapter for g in switched] == ["base", "base", "a", "a", "b", "b"]
    alone_b = list(generate(str(tiny_llama_dir), [("b", b)], prompts, 8))
    base_only = list(generate(str(tiny_llama_dir), [], prompts, 8))
    assert [g.text for g in switched[4:]] == [g.text for g in alone_b]
    assert [g.text for g in switched[:2]] == [g.text for g in base_only]
    assert [g.text for g in switched[2:4]] != [g.text for g in switched[4:]]
