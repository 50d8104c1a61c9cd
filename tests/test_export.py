"""Merging an adapter into a dequantized base, and generating with several adapters on one base."""

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_trainer.cli import main
from qlora_trainer.export.generate import generate
from qlora_trainer.export.merge import merge
from conftest import tiny_base
from tiny_models import make_adapter, save_tiny_model


@pytest.fixture(scope="module")
def two_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_llama_dir, root / "a", seed=1), make_adapter(tiny_llama_dir, root / "b", seed=2)


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


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loha_lokr_and_lora_generate_together_on_the_4bit_base_they_were_trained_on(tiny_llama_dir, gpt2_dir,
                                                                                    tmp_path, arch):
    model_dir = {"llama": tiny_llama_dir, "gpt2": gpt2_dir}[arch]
    made = [(kind, make_adapter(model_dir, tmp_path / kind, kind)) for kind in ("loha", "lokr", "lora")]
    prompts = ["the quick brown fox"]
    together = list(generate(str(model_dir), made, prompts, 6, include_base=True))
    assert [g.adapter for g in together] == ["base", "loha", "lokr", "lora"]
    # that a loaded LoHa / LoKr computes what was trained is checked on logits in test_adapters.py; tiny random
    # models often greedy-decode the same token under any adapter, so texts show only that the others leave
    # nothing behind
    alone = list(generate(str(model_dir), made[1:2], prompts, 6))
    assert alone[0].text == together[2].text


def test_generate_refuses_bad_input_in_one_line(tiny_llama_dir, gpt2_dir, two_adapters, tmp_path, capsys):
    qwen2_dir = save_tiny_model(tmp_path / "qwen2", "qwen2")
    gpt2_loha = make_adapter(gpt2_dir, tmp_path / "gpt2-loha", "loha")
    cases = [
        (tiny_llama_dir, ["--prompt", ""], r"--prompt: prompt 1 \(''\) encodes to no tokens"),
        (tiny_llama_dir, ["--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens: -1 generates nothing"),
        (tiny_llama_dir, ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: 0 generates nothing"),
        (qwen2_dir, ["--prompt", "hi", "--adapter", str(two_adapters[0])],
         r"adapter .* does not fit this base model \(size mismatch for .*q_proj"),
        (tiny_llama_dir, ["--prompt", "hi", "--adapter", str(gpt2_loha)],
         r"adapter .* does not fit this base model: it targets \['c_attn', 'c_fc', 'c_proj'\], which this base"),
        (gpt2_dir, ["--prompt", "hi", "--adapter", str(gpt2_loha), "--quant", "none"],
         "adapter .*: peft's LoHa cannot wrap Conv1D layers .* use the quantized base it was trained on"),
    ]
    for model_dir, args, message in cases:
        code = main(["generate", "--model", str(model_dir), *args])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", args
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]  # besides progress bars
        assert len(errors) == 1 and re.match(f"error: {message}", errors[0]) and "Traceback" not in captured.err, \
            (args, captured.err)
