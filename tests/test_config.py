"""Config loading: types, unknown keys, impossible values and overrides, through the real command line."""

from pathlib import Path

import pytest
import yaml

from qlora_trainer.cli import main
from qlora_trainer.errors import ConfigError
from qlora_trainer.spec import load_spec, spec_from_dict, spec_to_dict
from qlora_trainer.spec.load import apply_overrides
from qlora_trainer.spec.sections import DataSource

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
        ("data.format=oasst", "data.format"),
        ("data.columns={question: q}", "data.columns.question: not a field of data.format alpaca; its fields are "
                                       "instruction, input, output"),
        ("data.columns=question", "data.columns"),
        ("data.prompt_template=Q and A", "data.prompt_template: has no {instruction}"),
        ("data.path=[{path: a.jsonl, weight: 0}]", "data.path[0].weight: 0.0 is not allowed"),
        ("training.num_epochs=2", "training.num_epochs: set together with training.max_steps"),
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


def test_data_path_lists_files_with_weights_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    text = ("model: {path: m}\ndata:\n  path:\n    - {path: a.jsonl, weight: 3}\n    - b.jsonl\n"
            "    - {path: elsewhere.jsonl}\n")
    monkeypatch.chdir(tmp_path.parent)  # the config's folder is not the working directory
    spec = load_spec(write(tmp_path, text))
    assert spec.data.sources() == [DataSource(str(tmp_path / "a.jsonl"), 3.0), DataSource(str(tmp_path / "b.jsonl")),
                                   DataSource("elsewhere.jsonl")]
    assert spec_from_dict(spec_to_dict(spec)).data == spec.data  # run_config.json reads back as the same data
    assert spec_from_dict(VALID).data.sources() == [DataSource("data.jsonl", 1.0)]


@pytest.mark.parametrize("path, message", [
    ([], "data.path: missing"),
    (["a.jsonl", " "], "data.path[1]: no path"),
    ([{"weight": 2}], "data.path[0]: no path"),
    ([{"path": "a.jsonl", "weight": -1}], "data.path[0].weight: -1.0 is not allowed"),
    ([{"path": "a.jsonl", "weight": float("inf")}], "data.path[0].weight: inf is not allowed"),
    ([{"path": "a.jsonl", "wieght": 2}], "data.path[0].wieght: unknown key; valid keys of data.path[0] are path, weight"),
    ([{"path": "a.jsonl", "weight": "heavy"}], "data.path[0].weight: 'heavy' is not allowed; expected a number"),
    ({"path": "a.jsonl"}, "data.path: {'path': 'a.jsonl'} is not allowed; expected str or list"),
])
def test_bad_data_path_lists_name_the_entry(path, message):
    with pytest.raises(ConfigError) as err:
        spec_from_dict(dict(VALID, data={"path": path}))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("data, message", [
    ({"format": "chat", "columns": {"instruction": "q"}},
     "data.columns.instruction: not a field of data.format chat; its fields are messages"),
    ({"format": "sharegpt", "columns": {"messages": "dialog"}},
     "data.columns.messages: not a field of data.format sharegpt; its fields are conversations"),
    ({"format": "text", "columns": {"text": "body"}, "text_field": "content"},
     "data.text_field: set twice, also as data.columns.text"),
    ({"columns": {"output": ["a"]}}, "data.columns.output: ['a'] is not allowed; expected a string"),
    ({"prompt_template": "Answer {input}:"}, "data.prompt_template: has no {instruction}"),
    ({"prompt_template": "{instruction} -> {output}"}, "data.prompt_template: unknown placeholder {output}"),
    ({"prompt_template": "{instruction} {}"}, "data.prompt_template: unknown placeholder {}"),
    ({"prompt_template": "{instruction"}, "data.prompt_template: not a valid template (expected '}' before end"),
])
def test_bad_columns_and_templates_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        spec_from_dict(dict(VALID, data={"path": "d.jsonl", **data}))
    assert str(err.value).startswith(message)


def test_columns_and_templates_that_are_valid():
    data = spec_from_dict(dict(VALID, data={"path": "d", "format": "sharegpt", "columns": {"conversations": "c"}})).data
    assert (data.column("conversations"), data.column("text")) == ("c", "text")
    data = spec_from_dict(dict(VALID, data={"path": "d", "prompt_template": '{{"q": "{instruction}"}}'})).data
    assert data.prompt_fields() == {"instruction"}  # literal braces doubled, as str.format reads them
    assert spec_from_dict(dict(VALID, data={"path": "d", "format": "text", "text_field": "body"})).data.column(
        "text") == "body"


def test_num_epochs_replaces_max_steps_and_both_are_refused():
    spec = spec_from_dict(dict(VALID, training={"num_epochs": 2}))
    assert (spec.training.num_epochs, spec.training.max_steps) == (2.0, 100)
    with pytest.raises(ConfigError, match=r"^training.num_epochs: set together with training.max_steps; keep one"):
        spec_from_dict(dict(VALID, training={"max_steps": 10, "num_epochs": 2}))
    with pytest.raises(ConfigError, match=r"^training.num_epochs: -1.0 is not allowed"):
        spec_from_dict(dict(VALID, training={"num_epochs": -1}))
    assert spec_from_dict(dict(VALID, training={"max_steps": 10, "num_epochs": 0})).training.max_steps == 10
