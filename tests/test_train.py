"""The training recipe end to end on a tiny NF4 model: metrics, PEFT output, adapters, resume, data order."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_trainer.training.checkpoints import CHECKPOINTS
from qlora_trainer.cli import main
from qlora_trainer.spec import spec_from_dict
from qlora_trainer.errors import UserError
from qlora_trainer.hardware import GpuSpec, Hardware
from qlora_trainer.data.batches import micro_batches
from qlora_trainer.training.recipe import train

REPO = Path(__file__).resolve().parents[1]

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(8) for b in range(8)]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def run_config(model_dir, data_path, out_dir, **training):
    training = {"max_steps": 6, "learning_rate": 5e-3, "micro_batch_size": 4, "max_seq_len": 96,
                "save_steps": 3, "save_total_limit": 5, "logging_steps": 1, "lr_scheduler": "cosine",
                "warmup_steps": 1, **training}
    return spec_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "format": "alpaca"},
        "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"},
        "training": training,
        "output": {"dir": str(out_dir)},
    })


def test_micro_batches_are_seeded_and_resumable():
    stream = micro_batches(10, 3, seed=7, start_example=0)
    flat = [i for _ in range(7) for i in next(stream)]  # 21 examples: two epoch boundaries crossed
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    resumed = micro_batches(10, 2, seed=7, start_example=9)  # re-entered mid-epoch with another batch size
    assert [i for _ in range(3) for i in next(resumed)] == flat[9:15]


def test_training_writes_metrics_and_a_plain_peft_adapter(tiny_llama_dir, alpaca_file, tmp_path):
    config = run_config(tiny_llama_dir, alpaca_file, tmp_path / "run", max_steps=8)
    result = train(config, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "learning_rate", "tokens_per_second", "peak_vram_bytes"):
        assert all(key in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["loss"] for r in records] == pytest.approx(result.losses)

    adapter_dir = tmp_path / "run" / "adapter"
    assert {p.name for p in adapter_dir.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    # loads with plain transformers + peft, no qlora_trainer code, and changes the model's output
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, dtype=torch.bfloat16)
    x = torch.randint(0, 300, (1, 12))
    base_logits = base(input_ids=x).logits
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert not torch.allclose(tuned(input_ids=x).logits, base_logits)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    final_ckpt = load_file(str(tmp_path / "run" / CHECKPOINTS / "step-0000008" / "adapter" /
                               "adapter_model.safetensors"))
    assert saved.keys() == final_ckpt.keys()
    assert all(torch.equal(saved[k], final_ckpt[k]) for k in saved)


@pytest.mark.parametrize("adapter_type", ["loha", "lokr"])
def test_loha_and_lokr_train(tiny_llama_dir, alpaca_file, tmp_path, adapter_type):
    config = run_config(tiny_llama_dir, alpaca_file, tmp_path / adapter_type, max_steps=8, save_steps=0)
    config.adapter.type = adapter_type
    config.adapter.r = 4
    config.adapter.lora_alpha = 4
    config.training.learning_rate = 1e-2
    result = train(config, show_progress=False)
    assert sum(result.losses[-3:]) / 3 < result.losses[0]


def test_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, alpaca_file, tmp_path):
    full = train(run_config(tiny_llama_dir, alpaca_file, tmp_path / "full"), show_progress=False)
    # A run that died right after its step-3 checkpoint: the same folder without anything written later.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "full", broken)
    shutil.rmtree(broken / CHECKPOINTS / "step-0000006")
    shutil.rmtree(broken / "adapter")
    resumed = train(run_config(tiny_llama_dir, alpaca_file, broken), resume=True, show_progress=False)
    assert resumed.losses == full.losses[3:]  # bit-identical on the CPU
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line)["step"] for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, 7))


def test_existing_run_is_not_overwritten(tiny_llama_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_llama_dir, alpaca_file, out, max_steps=1), show_progress=False)
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="output.dir: .* already holds a run"):
        train(run_config(tiny_llama_dir, alpaca_file, out, max_steps=1), show_progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_cli_train_runs_and_reports(tiny_llama_dir, alpaca_file, tmp_path, capsys):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps({
        "model": {"path": str(tiny_llama_dir)}, "data": {"path": str(alpaca_file)},
        "adapter": {"r": 4, "target_modules": "attn"}, "training": {"max_steps": 2, "max_seq_len": 96},
    }))
    code = main(["train", "--config", str(config_path), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable params:" in out and "[k_proj, o_proj, q_proj, v_proj]" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_demo_config_trains_and_the_loss_clearly_falls(tmp_path):
    """The README's first command, shortened: the bundled model and data with the demo config."""
    from qlora_trainer.spec import load_spec

    config = load_spec(REPO / "configs" / "demo-tiny.yaml", ["training.max_steps=30", "training.save_steps=0"],
                         output_dir=str(tmp_path / "demo"))
    result = train(config, show_progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert result.eval_loss is not None and result.eval_loss < 0.6 * result.losses[0]


def _pretend_gpu(budget_bytes: int) -> Hardware:
    """A GPU of `budget_bytes` beside a CPU build of torch: the budget is the GPU's, the run stays on the CPU."""
    return Hardware(GpuSpec("pretend GPU", budget_bytes, budget_bytes, True, (8, 0)), device_type="cpu")


def test_a_run_predicted_not_to_fit_is_refused_before_loading_unless_forced(tiny_llama_dir, alpaca_file, tmp_path,
                                                                             monkeypatch, capsys):
    from qlora_trainer.training import recipe

    monkeypatch.setattr(recipe, "detect_hardware", lambda: _pretend_gpu(2**20))  # 1 MiB: less than the CUDA context
    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps({"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(alpaca_file)},
                                       "training": {"max_steps": 1, "max_seq_len": 96}}))
    out = tmp_path / "out"
    assert main(["train", "--config", str(config_path), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit pretend GPU" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was loaded or written
    assert main(["train", "--config", str(config_path), "--output-dir", str(out), "--no-progress", "--force"]) == 0


def test_plan_auto_fills_the_open_choices_so_the_run_fits(tiny_llama_dir, alpaca_file, tmp_path):
    from qlora_trainer.planner.memory import estimate_memory
    from qlora_trainer.planner.shapes import load_model_config
    from qlora_trainer.spec import resolve

    hardware = _pretend_gpu(2 * 2**30)
    config = run_config(tiny_llama_dir, alpaca_file, tmp_path / "out", max_steps=1, plan="auto")
    config.explicit_keys = frozenset({"adapter.type"})  # everything else open to the planner
    train(config, show_progress=False, hardware=hardware)
    ran = spec_from_dict(json.loads((tmp_path / "out" / "run_config.json").read_text()))
    assert (ran.adapter.target_modules, ran.adapter.r) == ("all-linear", 32)  # the highest rank the layers allow
    assert ran.training.micro_batch_size * ran.training.gradient_accumulation_steps == 4  # effective batch kept
    run = resolve(ran, hardware)
    estimate = estimate_memory(load_model_config(str(tiny_llama_dir)), run)
    assert run.budget.fits(estimate.predicted_peak_bytes)


def test_truncated_rows_are_reported_up_front_and_in_the_metrics(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * (1 + i % 3)}) + "\n"
                            for i in range(12)))
    config = spec_from_dict({"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(data), "format": "text"},
                             "adapter": {"r": 4, "target_modules": "attn"},
                             "training": {"max_steps": 1, "max_seq_len": 24, "save_steps": 0},
                             "output": {"dir": str(tmp_path / "out")}})
    train(config, show_progress=False)
    captured = capsys.readouterr()
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["rows_truncated"] > 0 and 0 < record["label_tokens_lost"] < record["label_tokens"]
    assert f"{record['rows_truncated']} truncated" in captured.out
    assert captured.err.count("warning: ") == 1 and "training.max_seq_len" in captured.err


def test_num_epochs_sets_the_steps_from_the_train_examples(tiny_llama_dir, tmp_path):
    """0.5 epochs of 36 rows less 4 eval rows (32 train examples) at 4 examples a step: ceil(0.5 * 32 / 4) = 4
    steps, the learning-rate schedule laid over those 4."""
    import yaml

    from qlora_trainer.data.sampling import steps_for_epochs

    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(6) for b in range(6)]
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = {"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(data), "format": "alpaca", "eval_fraction": 0.1},
           "adapter": {"r": 4, "target_modules": "attn"},
           "training": {"num_epochs": 0.5, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_len": 96,
                        "save_steps": 0, "logging_steps": 1, "lr_scheduler": "linear", "warmup_steps": 0},
           "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    train_examples = 36 - round(36 * 0.1)
    assert len(steps) == steps_for_epochs(train_examples, 2, 2, 0.5) == 4
    # linear decay over those 4 steps from the default peak 2e-4: 3/4 of it after the first, 0 after the last
    assert [s["learning_rate"] for s in steps] == pytest.approx([1.5e-4, 1e-4, 5e-5, 0.0])


def test_the_adapter_names_its_base_by_absolute_path_or_as_asked(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    """A config naming the model relative to itself, run from another folder: adapter_config.json holds the base's
    absolute path, so peft's AutoPeftModelForCausalLM loads the adapter from anywhere without a hub."""
    from peft import AutoPeftModelForCausalLM

    config_path = tiny_llama_dir.parent / "relative-run.yaml"
    raw = {"model": {"path": tiny_llama_dir.name}, "data": {"path": str(alpaca_file)},
           "adapter": {"r": 4, "target_modules": "attn"}, "training": {"max_steps": 1, "max_seq_len": 96},
           "output": {"dir": str(tmp_path / "out")}}
    config_path.write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).is_absolute()
    assert Path(saved["base_model_name_or_path"]).resolve() == tiny_llama_dir.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out" / "adapter"))
    assert model.peft_config["default"].base_model_name_or_path == saved["base_model_name_or_path"]

    raw["output"] |= {"dir": str(tmp_path / "shared"), "base_model_name": "my-org/tiny-llama"}
    config_path.write_text(json.dumps(raw))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    shared = json.loads((tmp_path / "shared" / "adapter" / "adapter_config.json").read_text())
    assert shared["base_model_name_or_path"] == "my-org/tiny-llama"
