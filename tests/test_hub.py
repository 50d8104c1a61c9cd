"""A model or data name that is not a local path needs the hub; where it cannot be reached, the run says so at
once in one line (exit 2) instead of after the libraries' retries."""

import json

import huggingface_hub.constants
import pytest

from qlora_trainer.cli import main
from qlora_trainer.hub import hub_reachable


@pytest.fixture
def hub_down(monkeypatch):
    """An endpoint nothing listens on: what an offline machine sees, without depending on this one's network."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_offline_setting_or_a_closed_endpoint_is_unreachable(hub_down, monkeypatch):
    assert not hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()


@pytest.mark.parametrize("key", ["model.path", "data.path"])
def test_a_hub_name_without_the_hub_is_one_line(key, hub_down, tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Add 1 and 2.", "input": "", "output": "3"}) + "\n")
    raw = {"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(data)},
           "training": {"max_steps": 1, "max_seq_len": 256}, "output": {"dir": str(tmp_path / "out")}}
    section, _ = key.split(".")
    raw[section]["path"] = "some-org/some-name"
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {key}: some-org/some-name is not a local path and the model hub cannot be reached "
                   "from here; give a local folder or file")
    assert not (tmp_path / "out").exists()
