"""generate speaks the training format: train saves it beside the adapter, generate writes each prompt in it;
sampling flags, streaming, --chat, and bad input in one line. Adapters are trained briefly on the bundled demo
model (its tokenizer has a chat template) on the CPU, once per module."""

import io
import json
import re
import shutil

import pytest
import torch

from conftest import DEMO_DATA_DIR, DEMO_MODEL_DIR
from qlora_trainer.cli import main
from qlora_trainer.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca_prompt, row_segments
from qlora_trainer.engine.adapters import load_adapter
from qlora_trainer.export.generate import (PROMPT_FILE, build_prompt, chat, generate, prompt_format,
                                           read_prompt_format)
from qlora_trainer.export.merge import load_for_inference
from qlora_trainer.spec import DataConfig, spec_from_dict, spec_to_dict
from qlora_trainer.training.checkpoints import CHECKPOINTS
from qlora_trainer.training.recipe import train
from qlora_trainer.training.run_folder import save_final_adapter

MODEL = str(DEMO_MODEL_DIR)
SYSTEM = "You are a helpful assistant."  # every conversation of demo/data/chat-tiny.jsonl begins with it
TOKENS = 6  # max_new_tokens throughout: enough to tell texts apart, few enough to be quick
PERU = "What is the capital of Peru?"  # instructions of the demo's tasks, which its model answers
UPPER = "Write this word in capital letters."


def _run_spec(data: dict, out_dir):
    return spec_from_dict({
        "model": {"path": MODEL},
        "data": data,
        "adapter": {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 2, "learning_rate": 3e-3, "micro_batch_size": 4, "max_seq_len": 96,
                     "save_steps": 1, "save_total_limit": 1, "logging_steps": 1},
        "output": {"dir": str(out_dir)},
    })


def _trained(data: dict, out_dir):
    spec = _run_spec(data, out_dir)
    train(spec, show_progress=False)
    return spec, out_dir / "adapter"


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    return _trained({"path": str(DEMO_DATA_DIR / "alpaca-tiny.jsonl"), "format": "alpaca"},
                    tmp_path_factory.mktemp("alpaca-run"))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return _trained({"path": str(DEMO_DATA_DIR / "chat-tiny.jsonl"), "format": "chat"},
                    tmp_path_factory.mktemp("chat-run"))


def _saved(adapter_dir) -> dict:
    return json.loads((adapter_dir / PROMPT_FILE).read_text())


# --- what train saves -----------------------------------------------------------------------------------------

def test_alpaca_training_saves_its_resolved_templates_beside_the_final_adapter_only(alpaca_run):
    _, adapter_dir = alpaca_run
    assert _saved(adapter_dir) == {
        "version": 1, "format": "alpaca", "system_prompt": None, "chat_template_applied": False,
        "chat_template": None,
        "prompt_template": {"name": "alpaca", "no_input": ALPACA_NO_INPUT, "with_input": ALPACA_WITH_INPUT}}
    checkpoint_adapters = list((adapter_dir.parent / CHECKPOINTS).glob("*/adapter"))
    assert checkpoint_adapters and not any((a / PROMPT_FILE).exists() for a in checkpoint_adapters)


def test_chat_training_saves_the_chat_template_and_the_shared_system_prompt(chat_run, demo_tokenizer):
    _, adapter_dir = chat_run
    assert _saved(adapter_dir) == {
        "version": 1, "format": "chat", "prompt_template": None, "system_prompt": SYSTEM,
        "chat_template_applied": True, "chat_template": demo_tokenizer.get_chat_template()}


def test_the_saved_format_follows_the_data_config(demo_tokenizer, tmp_path):
    custom = DataConfig(prompt_template="Q: {instruction}\nA: ")
    assert prompt_format(custom, demo_tokenizer)["prompt_template"] == {
        "name": "custom", "no_input": "Q: {instruction}\nA: ", "with_input": None}
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    saved = prompt_format(DataConfig(path=str(path), format="sharegpt"), demo_tokenizer)
    assert saved["format"] == "sharegpt" and saved["chat_template_applied"]
    assert saved["system_prompt"] is None  # conversations that differ in their system turn: none is taken
    assert prompt_format(DataConfig(format="text"), demo_tokenizer)["chat_template"] is None


class _SavesAnAdapter:
    """Stands in for the peft model: writes a folder as save_pretrained would."""

    def save_pretrained(self, folder, state_dict=None):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")


def test_a_given_format_is_saved_and_one_that_cannot_be_made_costs_only_a_warning(tmp_path, capsys):
    given = {"version": 1, "format": "text", "prompt_template": None, "system_prompt": None,
             "chat_template_applied": False, "chat_template": None}
    for run in ("given", "gone", "no-model"):
        (tmp_path / run).mkdir()
    adapter_dir = save_final_adapter(_SavesAnAdapter(), tmp_path / "given", given)
    assert json.loads((adapter_dir / PROMPT_FILE).read_text()) == given
    # data gone since training read them: the chat format is saved without the system prompt, with a warning
    gone = _run_spec({"path": str(tmp_path / "gone.jsonl"), "format": "chat"}, tmp_path / "gone")
    (tmp_path / "gone" / "run_config.json").write_text(json.dumps(spec_to_dict(gone)))
    adapter_dir = save_final_adapter(_SavesAnAdapter(), tmp_path / "gone")
    assert _saved(adapter_dir)["chat_template_applied"] and _saved(adapter_dir)["system_prompt"] is None
    assert re.match(f"warning: {PROMPT_FILE}: no system prompt saved, .*gone.jsonl does not exist",
                    capsys.readouterr().err)
    # no tokenizer to be had: the adapter is saved without the file, with a warning
    raw = spec_to_dict(gone)
    raw["model"]["path"] = str(tmp_path / "no-model")
    (tmp_path / "no-model" / "run_config.json").write_text(json.dumps(raw))
    adapter_dir = save_final_adapter(_SavesAnAdapter(), tmp_path / "no-model")
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json"]
    assert re.match(f"warning: {PROMPT_FILE} not written beside the adapter", capsys.readouterr().err)


# --- generate writes prompts as training did ------------------------------------------------------------------

def test_alpaca_prompts_are_what_training_built(alpaca_run, demo_tokenizer):
    spec, adapter_dir = alpaca_run
    fmt = read_prompt_format(adapter_dir)
    for instruction, input_text in ((PERU, ""), (UPPER, "maple")):
        trained_ids = row_segments({"instruction": instruction, "input": input_text, "output": "x"}, spec.data,
                                   demo_tokenizer)[0][0]
        text, ids = build_prompt(fmt, demo_tokenizer, instruction, input_text)
        assert text == alpaca_prompt(instruction, input_text, spec.data.prompt_template) and ids == trained_ids
    [plain] = generate(MODEL, [("tasks", adapter_dir)], [PERU], TOKENS)
    [with_input] = generate(MODEL, [("tasks", adapter_dir)], [UPPER], TOKENS, input_text="maple")
    assert plain.prompt == alpaca_prompt(PERU) and with_input.prompt == alpaca_prompt(UPPER, "maple")
    custom = DataConfig(prompt_template="Q: {instruction} ({input})\nA: ")
    fmt = read_prompt_format(_with_format(adapter_dir, adapter_dir.parent / "custom", prompt_format(custom, None)))
    for input_text in ("", "maple"):
        trained_ids = row_segments({"instruction": "Go.", "input": input_text, "output": "x"}, custom,
                                   demo_tokenizer)[0][0]
        assert build_prompt(fmt, demo_tokenizer, "Go.", input_text)[1] == trained_ids


def test_chat_prompts_are_the_chat_template_with_the_system_prompt(chat_run, demo_tokenizer):
    spec, adapter_dir = chat_run
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PERU}]
    [generation] = generate(MODEL, [("capitals", adapter_dir)], [PERU], TOKENS)
    assert generation.prompt == demo_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True)
    trained_ids = row_segments({"messages": messages + [{"role": "assistant", "content": "Lima"}]}, spec.data,
                               demo_tokenizer)[0][0]
    assert build_prompt(read_prompt_format(adapter_dir), demo_tokenizer, messages[1]["content"])[1] == trained_ids


def _with_format(adapter_dir, copy_dir, saved=None):
    """A copy of the adapter with `saved` as its prompt file, or (None) without one."""
    shutil.copytree(adapter_dir, copy_dir, dirs_exist_ok=True)
    (copy_dir / PROMPT_FILE).unlink(missing_ok=True)
    if saved is not None:
        (copy_dir / PROMPT_FILE).write_text(json.dumps(saved))
    return copy_dir


def test_raw_and_adapters_without_a_format_take_the_prompt_as_given(alpaca_run, tmp_path):
    _, adapter_dir = alpaca_run
    foreign = _with_format(adapter_dir, tmp_path / "foreign")  # the same weights without the prompt file
    raw = list(generate(MODEL, [("tasks", adapter_dir), ("foreign", foreign)], [PERU], TOKENS, raw=True))
    assert [g.prompt for g in raw] == [PERU, PERU] and raw[0].text == raw[1].text
    written_out = list(generate(MODEL, [("foreign", foreign), ("tasks", adapter_dir)], [alpaca_prompt(PERU)], TOKENS))
    assert [g.prompt for g in written_out] == [alpaca_prompt(PERU), alpaca_prompt(alpaca_prompt(PERU))]
    [formatted] = generate(MODEL, [("tasks", adapter_dir)], [PERU], TOKENS)
    assert formatted.text == written_out[0].text and formatted.text.strip()


def test_each_adapter_gets_its_own_format_and_the_base_the_first_ones(alpaca_run, chat_run, demo_tokenizer):
    question = PERU
    chat_prompt = demo_tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], tokenize=False,
        add_generation_prompt=True)
    mixed = list(generate(MODEL, [("chat", chat_run[1]), ("alpaca", alpaca_run[1])], [question], TOKENS,
                          include_base=True))
    assert [(g.adapter, g.prompt) for g in mixed] == [("base", chat_prompt), ("chat", chat_prompt),
                                                      ("alpaca", alpaca_prompt(question))]
    [alone] = generate(MODEL, [("alpaca", alpaca_run[1])], [question], TOKENS)
    assert alone.text == mixed[2].text


# --- sampling, streaming, chat -----------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_greedy_is_temperature_zero(alpaca_run):
    adapters = [("tasks", alpaca_run[1])]
    prompts = [PERU, "Write these words backwards in order."]

    def texts(**sampling):
        return [g.text for g in generate(MODEL, adapters, prompts, TOKENS, **sampling)]

    sampled = texts(temperature=1.5, top_p=0.95, seed=7)
    assert texts(temperature=1.5, top_p=0.95, seed=7) == sampled
    assert len({tuple(sampled)} | {tuple(texts(temperature=1.5, seed=seed)) for seed in range(3)}) > 1
    greedy = texts()
    assert texts(temperature=0, seed=3) == greedy
    base = load_for_inference(MODEL, "nf4")
    model = load_adapter(base.model, alpaca_run[1], "tasks")
    ids = base.tokenizer(alpaca_prompt(prompts[0]), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
    assert base.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == greedy[0]
    assert greedy[0].strip()


def test_streamed_text_is_the_printed_text(alpaca_run, capsys):
    args = ["generate", "--model", MODEL, "--adapter", f"tasks={alpaca_run[1]}", "--prompt", PERU,
            "--max-new-tokens", str(TOKENS)]
    assert main(args + ["--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == printed and printed.startswith("[tasks] ") and printed.strip() != "[tasks]"


def test_chat_keeps_the_conversation_for_chat_adapters(chat_run, demo_tokenizer, monkeypatch, capsys):
    lines = [PERU + "\n", "Compute 2 + 6.\n", "\n", "never read\n"]
    turns = list(chat(MODEL, ("capitals", chat_run[1]), iter(lines), TOKENS))
    assert len(turns) == 2
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PERU},
               {"role": "assistant", "content": turns[0].text.strip()}, {"role": "user", "content": "Compute 2 + 6."}]
    assert turns[1].prompt == demo_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(lines[:2])))  # the command: end of input ends it too
    assert main(["generate", "--model", MODEL, "--adapter", f"capitals={chat_run[1]}", "--chat",
                 "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out == "".join(turn.text + "\n" for turn in turns)


def test_chat_with_an_alpaca_adapter_takes_each_line_afresh(alpaca_run, capsys):
    turns = list(chat(MODEL, ("tasks", alpaca_run[1]), iter([PERU + "\n", PERU + "\n"]), TOKENS))
    assert [t.prompt for t in turns] == [alpaca_prompt(PERU)] * 2 and turns[0].text == turns[1].text
    assert "each line is a fresh instruction" in capsys.readouterr().err


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--prompt", "hi", "--temperature", "-1"], "--temperature: -1 is not allowed"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature: nan is not allowed"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p: 0 is not allowed"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p: 1.5 is not allowed"),
    (["--chat", "--adapter", "{chat}", "--adapter", "two={alpaca}"], "--chat: talks to one adapter, got 2"),
    (["--chat", "--with-base", "--adapter", "{chat}"], "--chat: talks to one model"),
    (["--chat", "--prompt", "hi"], "--chat: reads its messages from stdin"),
    (["--prompt", "hi", "--input", "x", "--adapter", "{chat}"], r"--input: adapter chat-run\d* was trained on chat"),
    (["--prompt", "hi", "--input", "x", "--adapter", "{alpaca}", "--raw"], "--input: --raw sends each prompt"),
    (["--prompt", "hi", "--input", "x"], "--input: the base alone has no saved prompt format"),
    ([], r"the following arguments are required: --prompt \(or --chat"),
    (["--prompt", "hi", "--adapter", "{broken}"], "--adapter: .*qlora_trainer_prompt.json is not a prompt format"),
])
def test_bad_input_is_one_line_and_exit_2(alpaca_run, chat_run, tmp_path, capsys, extra, message):
    broken = _with_format(alpaca_run[1], tmp_path / "broken", {"version": 1, "format": "alpaca"})
    paths = {"chat": chat_run[1], "alpaca": alpaca_run[1], "broken": broken}
    code = main(["generate", "--model", MODEL, *[arg.format(**paths) for arg in extra]])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(f"error: {message}", errors[0]) and "Traceback" not in captured.err, \
        captured.err
