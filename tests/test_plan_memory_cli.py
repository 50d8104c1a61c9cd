"""`qlora-trainer plan-memory`: the JSON and the table, exit 0 / 1 for fits / does not fit, exit 2 for bad input."""

import argparse
import json

import pytest

from qlora_trainer import cli
from qlora_trainer.cli import main
from qlora_trainer.hardware import GIB, GPU_CATALOGUE, GpuSpec
from qlora_trainer.planner import report
from qlora_trainer.planner.search import SEARCHED_KEYS

BREAKDOWN = {"weights", "adapter", "gradients", "optimizer", "activations", "logits", "overhead"}
PLAN = {"rank", "lora_alpha", "target_modules", "gradient_checkpointing", "micro_batch_size",
        "gradient_accumulation_steps", "seq_len", "optimizer", "compute_dtype", "adapter_dtype", "recompute_keys"}


def _json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["plan-memory", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_on_a_catalogue_gpu(capsys):
    code, out = _json(capsys, "--model", "llama-2-7b", "--gpu", "T4", "--seq-len", "1024")
    assert code == 0 and out["fits"] is True
    assert out["budget_bytes"] == GPU_CATALOGUE["T4"].usable_bytes
    assert BREAKDOWN <= set(out["breakdown"]) and PLAN <= set(out["plan"])
    assert sum(out["breakdown"].values()) == out["predicted_peak_bytes"] <= out["usable_bytes"]
    assert out["plan"]["compute_dtype"] == "float16"  # a T4 has no bf16
    assert out["plan"]["micro_batch_size"] * out["plan"]["gradient_accumulation_steps"] == 16
    assert out["total_params"] == 6_738_415_616 + out["trainable_params"]


def test_a_plan_that_offloads_names_the_pinned_host_memory(capsys):
    # 32k tokens of Llama-2-7B do not fit an L4 with the inputs on the GPU: the plan offloads them
    code, out = _json(capsys, "--model", "llama-2-7b", "--gpu", "L4", "--seq-len", "32768", "--batch-size", "1")
    plan = out["plan"]
    assert code == 0 and plan["offload_checkpoints"] and plan["gradient_checkpointing"]
    layers = 32 if plan["checkpointed_layers"] is None else plan["checkpointed_layers"]
    assert out["pinned_host_bytes"] == layers * 32768 * 4096 * 2  # each checkpointed layer's input, bf16
    code, out = _json(capsys, "--model", "llama-2-7b", "--gpu", "L4", "--seq-len", "1024")
    assert not out["plan"]["offload_checkpoints"] and out["pinned_host_bytes"] == 0
    main(["plan-memory", "--model", "llama-2-7b", "--gpu", "L4", "--seq-len", "32768", "--batch-size", "1"])
    assert f"{layers * 32768 * 4096 * 2 / GIB:.2f} GiB of checkpointed layers' inputs in pinned host" in (
        capsys.readouterr().out)


def test_fixed_choices_from_the_command_line_are_kept(capsys):
    code, out = _json(capsys, "--model", "mistral-7b", "--vram", "24", "--rank", "8", "--targets", "q_proj,v_proj",
                      "--grad-ckpt", "on", "--optimizer", "adamw8bit", "--batch-size", "8", "--seq-len", "512")
    assert code == 0
    plan = out["plan"]
    assert (plan["rank"], plan["lora_alpha"], plan["target_modules"], plan["gradient_checkpointing"],
            plan["optimizer"]) == (8, 16.0, ["q_proj", "v_proj"], True, "adamw8bit")
    assert out["trainable_params"] == 32 * 8 * (4096 + 4096 + 4096 + 1024)  # q: 4096 -> 4096, v: 4096 -> 1024


def test_flags_become_spec_keys_and_only_the_given_ones_are_fixed():
    parser = argparse.ArgumentParser()
    cli.add_plan_memory_arguments(parser)
    spec = report.spec_from_args(parser.parse_args(
        ["--model", "llama-2-7b", "--rank", "8", "--alpha", "4", "--targets", "q_proj,v_proj", "--batch-size", "6",
         "--micro-batch-size", "4", "--quant", "int8"]))
    assert (spec.model.path, spec.adapter.r, spec.adapter.lora_alpha, spec.adapter.target_modules,
            spec.training.micro_batch_size, spec.training.gradient_accumulation_steps, spec.training.max_seq_len,
            spec.quantization.mode) == ("llama-2-7b", 8, 4.0, ["q_proj", "v_proj"], 4, 2, 2048, "int8")
    assert spec.explicit_keys & SEARCHED_KEYS.keys() == {"adapter.r", "adapter.lora_alpha", "adapter.target_modules",
                                                         "training.micro_batch_size"}
    default = report.spec_from_args(parser.parse_args(["--model", "llama-2-7b", "--grad-ckpt", "auto"]))
    assert (default.training.micro_batch_size, default.training.gradient_accumulation_steps) == (1, 16)
    assert not default.explicit_keys & SEARCHED_KEYS.keys()


def test_a_model_folder_with_only_config_json(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    code, out = _json(capsys, "--model", str(tmp_path), "--vram", "1")
    assert code == 0 and out["fits"]
    assert out["plan"]["rank"] == 32  # not 64: k_proj's 32 outputs cap a LoRA's rank


def test_nothing_fits_exits_1_with_the_smallest_budget(capsys):
    code, out = _json(capsys, "--model", "llama-3-8b", "--vram", "4")
    assert code == 1 and out["fits"] is False
    assert out["smallest_fitting_budget_bytes"] > 4 * GIB and "nothing fits" in out["advice"]


def test_table(capsys):
    code = main(["plan-memory", "--model", "tinyllama-1.1b", "--gpu", "L4"])
    table = capsys.readouterr().out
    assert code == 0
    for text in ("tinyllama-1.1b on L4", "weights", "logits", "peak reserved by PyTorch", "CUDA context",
                 "training.micro_batch_size", "fits: targets all-linear, rank 64"):
        assert text in table


def test_the_detected_gpu_is_the_default_budget(monkeypatch, capsys):
    monkeypatch.setattr(report, "detect_gpu", lambda: GpuSpec("NVIDIA A10G", 24 * GIB, 22 * GIB, True, (8, 6)))
    code, out = _json(capsys, "--model", "tinyllama-1.1b")
    assert code == 0 and out["budget_bytes"] == 22 * GIB and out["gpu"] == "NVIDIA A10G"


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-2-7b", "--gpu", "B200"], "error: --gpu B200: unknown GPU; choose one of T4"),
    (["--model", "llama-9b", "--gpu", "T4"], "error: --model llama-9b: not a model folder nor a preset; presets: "),
    (["--model", "llama-2-7b", "--vram", "-1"], "error: --vram -1: not allowed"),
    (["--model", "llama-2-7b", "--vram", "16", "--seq-len", "0"], "error: --seq-len 0: not allowed"),
    (["--model", "llama-2-7b", "--vram", "16", "--targets", "qq_proj"], "error: --targets: 'qq_proj' matches no"),
    (["--model", "llama-2-7b", "--gpu", "T4", "--seq-len", "longest", "--gpus", "2"],
     "error: --seq-len longest: plans one GPU; leave out --gpus"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    assert main(["plan-memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_no_gpu_and_no_budget_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(report, "detect_gpu", lambda: None)
    assert main(["plan-memory", "--model", "llama-2-7b"]) == 2
    assert "no GPU here; name one (--gpu T4) or give its memory (--vram 15.5)" in capsys.readouterr().err


def test_a_folder_without_config_json_exits_2(tmp_path, capsys):
    assert main(["plan-memory", "--model", str(tmp_path), "--vram", "16"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def _run_config(tmp_path, text: str):
    """A run config beside a model folder holding only Llama-3-8B's config.json (its preset)."""
    from qlora_trainer.presets import PRESETS

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((PRESETS / "llama-3-8b.json").read_text())
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: model}\ndata: {path: train.jsonl, format: text, packing: true}\n" + text)
    return path


def test_a_run_config_is_planned_as_train_plans_it(tmp_path, capsys):
    """plan-memory --config plans what `train` would run on that card with training.plan: auto (training/gate.py),
    packed rows included (on a T4, SDPA with the block-diagonal mask), which the flags alone do not describe."""
    from qlora_trainer.engine.base import settle_auto_attention
    from qlora_trainer.hardware import Hardware
    from qlora_trainer.planner.shapes import load_model_config
    from qlora_trainer.spec.load import load_spec
    from qlora_trainer.spec.resolve import resolve
    from qlora_trainer.training.gate import fit_to_budget

    config = _run_config(tmp_path, "training: {max_seq_len: 8192, gradient_accumulation_steps: 16, plan: auto}\n")
    code, out = _json(capsys, "--config", str(config), "--gpu", "T4")
    assert code == 0 and out["fits"]
    spec = load_spec(config)
    model_config = load_model_config(spec.model.path)  # train reads the same config.json (and checks weights)
    trained = fit_to_budget(resolve(settle_auto_attention(spec, model_config), Hardware.planned(GPU_CATALOGUE["T4"])),
                            model_config, force=False)
    capsys.readouterr()
    plan, training = out["plan"], trained.spec.training
    assert (plan["rank"], plan["target_modules"], plan["micro_batch_size"], plan["gradient_accumulation_steps"],
            plan["checkpointed_layers"], plan["offload_checkpoints"], plan["optimizer"], plan["mlp_chunk_tokens"],
            plan["attention_chunk_tokens"], plan["recompute_keys"]) == (
        trained.spec.adapter.r, trained.spec.adapter.target_modules, training.micro_batch_size,
        training.gradient_accumulation_steps, training.checkpointed_layers, training.offload_checkpoints,
        training.optimizer, training.mlp_chunk_tokens, training.attention_chunk_tokens, training.recompute_keys)
    assert (plan["packing"], plan["attention"], plan["seq_len"]) == (True, "sdpa", 8192)
    unpacked = _json(capsys, "--model", str(tmp_path / "model"), "--gpu", "T4", "--seq-len", "8192")[1]["plan"]
    assert (unpacked["packing"], unpacked["attention"]) == (False, "sdpa")  # the flags alone: RunSpec's data section


def test_flags_override_the_run_config_and_its_keys_are_kept(tmp_path, capsys):
    config = _run_config(tmp_path, "adapter: {r: 16, target_modules: attn}\n"
                                   "training: {max_seq_len: 8192, micro_batch_size: 2, gradient_accumulation_steps: 4,"
                                   " plan: auto}\n")
    code, out = _json(capsys, "--config", str(config), "--vram", "24", "--seq-len", "1024", "--rank", "8")
    plan = out["plan"]
    assert code == 0
    assert (plan["seq_len"], plan["rank"], plan["lora_alpha"]) == (1024, 8, 16.0)  # the flags win (alpha: 2 x rank)
    assert (plan["target_modules"], plan["micro_batch_size"], plan["gradient_accumulation_steps"],
            plan["packing"]) == ("attn", 2, 4, True)  # the config's own keys are kept


def test_a_run_config_without_plan_auto_is_estimated_as_written(tmp_path, capsys):
    """train plans nothing for a config without training.plan: auto: plan-memory --config estimates that run as
    written (what train's gate predicts for it), then says what training.plan: auto would run instead."""
    from qlora_trainer.hardware import Hardware
    from qlora_trainer.planner.memory import estimate_memory
    from qlora_trainer.planner.shapes import load_model_config, model_shape
    from qlora_trainer.spec.load import load_spec
    from qlora_trainer.spec.resolve import resolve

    config = _run_config(tmp_path, "adapter: {r: 8}\ntraining: {max_seq_len: 4096, micro_batch_size: 4}\n")
    code, out = _json(capsys, "--config", str(config), "--gpu", "L4")
    spec = load_spec(config)
    shape = model_shape(load_model_config(spec.model.path))
    as_written = estimate_memory(shape, resolve(spec, Hardware.planned(GPU_CATALOGUE["L4"])))
    assert out["as_configured"] and out["predicted_peak_bytes"] == as_written.predicted_peak_bytes
    plan = out["plan"]
    assert (plan["rank"], plan["micro_batch_size"], plan["gradient_accumulation_steps"],
            plan["checkpointed_layers"]) == (8, 4, 1, None)  # the config's values and RunSpec's defaults
    assert code == (0 if out["fits"] else 1) and "with training.plan: auto: " in out["advice"]
    code, out = _json(capsys, "--config", str(config), "--gpu", "T4", "--seq-len", "16384")  # too long as written
    assert code == 1 and not out["fits"] and out["as_configured"]
    assert out["plan"]["seq_len"] == 16384 and "with training.plan: auto: " in out["advice"]


@pytest.mark.parametrize("args, message", [
    ([], "error: plan-memory: name the model (--model FOLDER or preset) or a run config (--config FILE)"),
    (["--config", "no-such-run.yaml", "--gpu", "T4"], "error: "),
])
def test_plan_memory_without_a_model_exits_2_with_one_line(capsys, args, message):
    assert main(["plan-memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_config_whose_model_has_no_config_json_names_model_path(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"model: {{path: {tmp_path}}}\ndata: {{path: train.jsonl, format: text}}\n")
    assert main(["plan-memory", "--config", str(tmp_path / "run.yaml"), "--gpu", "T4"]) == 2
    assert capsys.readouterr().err.startswith(f"error: model.path {tmp_path}: the folder has no config.json")


def test_the_longest_sequence_is_the_last_that_fits(capsys):
    """--seq-len longest against plan-memory itself: a plan at the length it gives, none 1,024 tokens longer."""
    code, out = _json(capsys, "--model", "qwen2.5-7b", "--gpu", "T4", "--seq-len", "longest")
    longest = out["longest_seq_len"]
    assert code == 0 and out["fits"] and out["plan"]["seq_len"] == longest and longest % 1024 == 0
    assert 8192 < longest < 131072  # neither a short answer nor the model's positions
    assert _json(capsys, "--model", "qwen2.5-7b", "--gpu", "T4", "--seq-len", str(longest))[0] == 0
    code, out = _json(capsys, "--model", "qwen2.5-7b", "--gpu", "T4", "--seq-len", str(longest + 1024))
    assert code == 1 and not out["fits"]


def test_the_longest_sequence_stops_at_the_models_positions(capsys):
    assert main(["plan-memory", "--model", "llama-2-7b", "--gpu", "A100-80GB", "--seq-len", "longest"]) == 0
    assert "longest sequence that fits: 4,096 tokens (the model's max_position_embeddings)" in capsys.readouterr().out


def test_the_longest_sequence_where_none_fits_exits_1(capsys):
    code, out = _json(capsys, "--model", "llama-2-7b", "--vram", "3", "--seq-len", "longest")
    assert code == 1 and not out["fits"] and out["plan"]["seq_len"] == 1024 and "longest_seq_len" not in out


def test_seq_len_is_a_number_or_longest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan-memory", "--model", "llama-2-7b", "--seq-len", "long"])
    assert exit_info.value.code == 2
    assert "argument --seq-len: 'long': give a number of tokens or longest" in capsys.readouterr().err
