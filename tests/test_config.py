"""Config loading: types, unknown keys, impossible values and overrides, through the real command line."""

from pathlib import Path

import pytest
import yaml

from qlora_trainer.cli import main
from qlora_trainer.errors import ConfigError
from qlora_trainer.spec import load_spec, spec_from_dict
from qlora_trainer.spec.load import apply_overrides

VALID = {
    "model": {"path": "some/model"},
    "data": {"path": "data.jsonl", "format": "alpaca"},
    "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "training": {"max_steps": 3, "learning_rate": "2e-4"},
}


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def test_valid_config_types_are_coerced():
    config = spec_from_dict(VALID)
    assert config.training.learning_rate == pytest.approx(2e-4)  # YAML reads 2e-4 as a string
    assert config.adapter.lora_alpha == 16.0 and isinstance(config.adapter.lora_alpha, float)
    assert config.adapter.target_modules == "all-linear"


def test_renamed_keys_still_work_with_a_one_line_notice(capsys):
    raw = dict(VALID, adapter={"r": 8, "alpha": 16, "dropout": 0.1})
    spec = spec_from_dict(raw)
    assert (spec.adapter.lora_alpha, spec.adapter.lora_dropout) == (16.0, 0.1)
    assert {"adapter.lora_alpha", "adapter.lora_dropout"} <= spec.explicit_keys
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: adapter.alpha is now called adapter.lora_alpha; the old name still works",
                     "note: adapter.dropout is now called adapter.lora_dropout; the old name still works"]
    with pytest.raises(ConfigError, match="adapter.alpha: set twice, also as adapter.lora_alpha"):
        spec_from_dict(dict(VALID, adapter={"alpha": 16, "lora_alpha": 8}))


def test_yaml_on_and_off_switches(tmp_path):
    spec = load_spec(write(tmp_path, "model: {path: m}\ndata: {path: d}\ntraining: {compile_layers: on}\n"))
    assert spec.training.compile_layers == "on"
    spec = load_spec(write(tmp_path, "model: {path: m}\ndata: {path: d}\ntraining: {compile_layers: off}\n"))
    assert spec.training.compile_layers == "off"


def test_overrides_replace_and_add_keys():
    raw = apply_overrides(VALID, ["training.learning_rate=1e-3", "adapter.target_modules=[q_proj, v_proj]",
                                  "training.resume=auto"])
    config = spec_from_dict(raw)
    assert config.training.learning_rate == pytest.approx(1e-3)
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.training.resume == "auto"
    assert VALID["training"]["learning_rate"] == "2e-4"  # the original mapping is untouched


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("adapter.r=0", "adapter.r"),
        ("adapter.r=-4", "adapter.r"),
        ("adapter.r=2.5", "adapter.r"),
        ("training.learning_rate=0", "training.learning_rate"),
        ("training.learning_rate=-1e-4", "training.learning_rate"),
        ("training.learning_rate=fast", "training.learning_rate"),
        ("training.max_steps=true", "training.max_steps"),
        ("adapter.type=ia3", "adapter.type"),
        ("adapter.dtype=float16", "adapter.dtype"),
        ("adapter.lora_dropout=1.5", "adapter.lora_dropout"),
        ("data.format=sharegpt", "data.format"),
        ("training.optimizer=sgd", "training.optimizer"),
        ("training.bogus=1", "training.bogus"),
        ("nosection.key=1", "nosection"),
        ("model.path=", "model.path"),
        ("adapter.target_modules=[]", "adapter.target_modules"),
        ("quantization.mode=int4", "quantization.mode"),
    ],
)
def test_bad_values_exit_2_naming_the_key(tmp_path, capsys, override, culprit):
    code = main(["train", "--config", str(write(tmp_path, VALID)), "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and culprit in err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    "text, culprit",
    [("model: {path: [unclosed\n", "malformed YAML"), ("- just\n- a list\n", "mapping"),
     ("model: 5\n", "model")],
)
def test_malformed_files_exit_2(tmp_path, capsys, text, culprit):
    code = main(["train", "--config", str(write(tmp_path, text))])
    assert code == 2 and culprit in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_output_dir_flag_sets_output_dir(tmp_path):
    config = load_spec(write(tmp_path, VALID), [], output_dir=str(tmp_path / "out"))
    assert config.output.dir == str(tmp_path / "out")


def test_missing_model_folder_is_reported_before_loading(tmp_path, capsys):
    raw = dict(VALID, model={"path": str(tmp_path / "absent")})
    assert main(["train", "--config", str(write(tmp_path, raw))]) == 2
    assert "model.path" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {path: m}\ndata: {path: d}\ntraining:\n  max_steps: 3\ntraining:\n  seed: 1\n",
         "training: given twice in {path}, at lines 3 and 5"),
        ("model: {path: m}\ndata: {path: d}\ntraining:\n  max_steps: 3\n  learning_rate: 1e-3\n  max_steps: 5\n",
         "training.max_steps: given twice in {path}, at lines 4 and 6"),
        ('{"model": {"path": "m"}, "data": {"path": "d", "path": "e"}}\n',
         "data.path: given twice in {path}, at lines 1 and 1"),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value).startswith(message.format(path=path))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    merged = "model: {path: m}\ndata: {path: d}\ntraining:\n  <<: {max_steps: 3, seed: 1}\n  seed: 2\n"
    spec = load_spec(write(tmp_path, merged))
    assert (spec.training.max_steps, spec.training.seed) == (3, 2)  # a merge then an override is what YAML means


@pytest.mark.parametrize("word, expected", [("on", True), ("off", False), ("true", True), ("false", False),
                                            ("On", True), ("FALSE", False)])
def test_every_switch_takes_on_off_true_false(tmp_path, word, expected):
    for quoted in (word, f'"{word}"'):  # bare (YAML 1.1 reads a boolean) and quoted (a string)
        text = (f"model: {{path: m, trust_remote_code: {quoted}}}\ndata: {{path: d, packing: {quoted}}}\n"
                f"training: {{fused_lora: {quoted}, compile_layers: {quoted}}}\n")
        spec = load_spec(write(tmp_path, text))
        assert (spec.model.trust_remote_code, spec.data.packing, spec.training.fused_lora) == (expected,) * 3
        assert spec.training.compile_layers == ("on" if expected else "off")
        if not expected:  # a Literal with "off" but no "on"
            assert load_spec(write(tmp_path, f"model: {{path: m}}\ndata: {{path: d}}\n"
                                             f"training: {{resume: {quoted}}}\n")).training.resume == "off"
    spec = load_spec(write(tmp_path, VALID), [f"training.gradient_checkpointing={word}", f"output.overwrite={word}"])
    assert (spec.training.gradient_checkpointing, spec.output.overwrite) == (expected, expected)


@pytest.mark.parametrize("text, culprit", [("training: {resume: on}\n", "training.resume: true / on is not allowed"),
                                           ('training: {fused_lora: "yes"}\n', "training.fused_lora: 'yes'")])
def test_switch_words_a_key_cannot_take_are_refused(tmp_path, text, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(")):
        load_spec(write(tmp_path, "model: {path: m}\ndata: {path: d}\n" + text))
