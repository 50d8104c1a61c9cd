"""Broken model folders and Ctrl-C before training: one line naming the culprit, the right exit code, nothing
written. (The GPU-free part of the bad-input classes; tests/test_robustness.py holds the table of config errors.)"""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import DEMO_DATA_DIR
from qlora_trainer.cli import main


def _broken(tiny_llama_dir, tmp_path, kind: str):
    folder = tmp_path / kind
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    if kind == "empty":
        weights.write_bytes(b"")
    elif kind == "garbage":
        weights.write_bytes(os.urandom(1000))
    elif kind == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif kind == "missing-tensor":  # a tensor under a name the model does not have
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.up.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
        save_file(tensors, weights, metadata={"format": "pt"})
    elif kind == "config-disagrees":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _config(tmp_path, model_dir) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"model": {"path": str(model_dir)},
                                "data": {"path": str(DEMO_DATA_DIR / "alpaca-tiny.jsonl")},
                                "training": {"max_steps": 1, "max_seq_len": 256}}))
    return str(path)


@pytest.mark.parametrize("kind, culprit", [
    ("empty", "model.safetensors is not a complete safetensors file"),
    ("garbage", "model.safetensors is not a complete safetensors file"),
    ("truncated", "model.safetensors is not a complete safetensors file"),
    ("config-disagrees", "config.json does not describe these weights"),
    ("missing-tensor", "holds no weights for model.layers.1.mlp.up_proj.weight (transformers would start them at "
                       "random)"),
])
def test_broken_model_folders_exit_2_before_anything_is_written(tiny_llama_dir, tmp_path, capsys, kind, culprit):
    model_dir = _broken(tiny_llama_dir, tmp_path, kind)
    out = tmp_path / "out"
    assert main(["train", "--config", _config(tmp_path, model_dir), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    if kind == "missing-tensor":  # found by transformers' own loading, after its progress bar
        err = err.splitlines(keepends=True)[-1]
    assert err.startswith("error: model.path: ") and culprit in err and err.count("\n") == 1
    assert not out.exists()


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from qlora_trainer.engine import build as build_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # what SIGINT raises in the middle of from_pretrained

    monkeypatch.setattr(build_module, "load_base", interrupted)
    out = tmp_path / "out"
    assert main(["train", "--config", _config(tmp_path, tiny_llama_dir), "--output-dir", str(out),
                 "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
