"""Data loading and formatting with real datasets and the bundled demo tokenizer: masks, sources, errors, packing,
mixed files and epochs."""

import copy
import dataclasses
import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import DEMO_DATA_DIR, DEMO_MODEL_DIR
from transformers import AutoModelForCausalLM

from qlora_trainer.spec import DataConfig
from qlora_trainer.spec.sections import DataSource
from qlora_trainer.data.batches import collate
from qlora_trainer.data.prepare import IGNORE_INDEX, alpaca_prompt, pack, prepare_data, truncation_warning
from qlora_trainer.data.sampling import mix, steps_for_epochs
from qlora_trainer.errors import UserError

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "" if a % 2 else "numbers", "output": str(a + b)}
        for a in range(5) for b in range(4)]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 and 2?"},
                {"role": "assistant", "content": "4"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def labelled_runs(tokenizer, example) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def packed_examples(row: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The examples of a packed row, cut where its position ids restart."""
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["position_ids"])]
    return [{key: row[key][start:end] for key in row} for start, end in zip(starts, starts[1:])]


def with_template(tokenizer, template):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_alpaca_labels_cover_exactly_the_response_and_eos(demo_tokenizer, tmp_path):
    data = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))), demo_tokenizer, 256, seed=0)
    assert data.stats.train_examples == len(ROWS) and data.stats.rows_bad == 0 and data.eval == []
    for row, example in zip(ROWS, data.train):
        prompt_ids = demo_tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        response_ids = demo_tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == prompt_ids + response_ids + [demo_tokenizer.eos_token_id]
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [demo_tokenizer.eos_token_id]
        assert labelled_runs(demo_tokenizer, example) == [row["output"] + demo_tokenizer.eos_token]
    assert ("### Input:\nnumbers" in alpaca_prompt("x", "numbers")) and ("### Input" not in alpaca_prompt("x"))


def test_mask_prompt_off_labels_everything(demo_tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS[:3])), mask_prompt=False)
    for example in prepare_data(config, demo_tokenizer, 256, seed=0).train:
        assert example["labels"] == example["input_ids"]


def test_text_format_labels_every_token_of_the_chosen_field(demo_tokenizer, tmp_path):
    texts = ["Add 1 and 2.\n3", "Uppercase the word. apple\nAPPLE"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": text, "text": "other"} for text in texts])
    data = prepare_data(DataConfig(path=str(path), format="text", text_field="body"), demo_tokenizer, 256, 0)
    eos = demo_tokenizer.eos_token_id
    assert [e["input_ids"] for e in data.train] == [demo_tokenizer(t)["input_ids"] + [eos] for t in texts]
    assert all(e["labels"] == e["input_ids"] for e in data.train)


def test_every_source_kind_gives_the_same_examples(demo_tokenizer, tmp_path):
    reference = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))), demo_tokenizer, 256, 0)
    table = datasets.Dataset.from_list(ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=1))
    table.to_csv(str(tmp_path / "d.csv"), index=False)  # the output column is read back as integers
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    for source in ("d.json", "d.csv", "d.parquet", "disk", "dict"):
        loaded = prepare_data(DataConfig(path=str(tmp_path / source)), demo_tokenizer, 256, 0)
        assert loaded == reference, source
    test_split = prepare_data(DataConfig(path=str(tmp_path / "dict"), split="test"), demo_tokenizer, 256, 0)
    assert test_split.train == reference.train[:2]
    with pytest.raises(UserError, match="data.split: 'validation' is not in .*; it has train, test"):
        prepare_data(DataConfig(path=str(tmp_path / "dict"), split="validation"), demo_tokenizer, 256, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "d.json", "d.jsonl", "d.parquet", "dict", "disk"]


def test_csv_cells_are_text_as_written(demo_tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay it.,,NA\nSay nothing.,,\nAdd 1 and 2.,,3\n")
    data = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, 0)
    assert data.stats.bad_reasons == {"empty field 'output'": 1}
    eos = demo_tokenizer.eos_token
    assert [labelled_runs(demo_tokenizer, e) for e in data.train] == [["NA" + eos], ["3" + eos]]


def test_chat_labels_only_assistant_turns(demo_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    (example,) = prepare_data(DataConfig(path=str(path), format="chat"), demo_tokenizer, 512, 0).train
    assert example["input_ids"] == list(demo_tokenizer.apply_chat_template(CONVERSATION, return_dict=False))
    eos = demo_tokenizer.eos_token
    assert labelled_runs(demo_tokenizer, example) == [f"3{eos}\n", f"4{eos}\n"]
    unmasked = prepare_data(DataConfig(path=str(path), format="chat", mask_prompt=False), demo_tokenizer, 512, 0)
    assert unmasked.train[0]["labels"] == example["input_ids"]


def test_demo_chat_data_labels_each_assistant_reply(demo_tokenizer):
    config = DataConfig(path=str(DEMO_DATA_DIR / "chat-tiny.jsonl"), format="chat")
    data = prepare_data(config, demo_tokenizer, 128, 0)
    rows = [json.loads(line) for line in (DEMO_DATA_DIR / "chat-tiny.jsonl").read_text().splitlines()]
    assert (data.stats.rows_read, data.stats.train_examples, data.stats.rows_truncated) == (100, 100, 0)
    for row, example in zip(rows, data.train):
        assert labelled_runs(demo_tokenizer, example) == [row["messages"][-1]["content"] + demo_tokenizer.eos_token
                                                          + "\n"]


def test_chat_rows_with_bad_turns_are_counted_by_reason(demo_tokenizer, tmp_path):
    user, reply = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    rows = [
        {"messages": CONVERSATION},
        {"messages": [user, user, reply]},
        {"messages": [user, reply, {"role": "system", "content": "late"}, user, reply]},
        {"messages": [{"role": "bot", "content": "a"}, reply]},
        {"messages": [user, reply, user]},
        {"messages": [user, {"role": "assistant", "content": " "}]},
        {"messages": [user, {"role": "assistant", "content": 5}]},
        {"messages": "a then b"},
        {"messages": []},
        {"conversation": [user, reply]},
    ]
    data = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows)), format="chat"),
                        demo_tokenizer, 256, 0)
    assert (data.stats.rows_read, data.stats.train_examples) == (10, 1)
    assert data.stats.bad_reasons == {
        "roles out of order (want system?, then user/assistant alternating)": 2,
        "unknown role 'bot'": 1,
        "conversation does not end with an assistant turn": 1,
        "message with empty 'content'": 1,
        "message without text 'content'": 1,
        "field 'messages' is not a list": 1,
        "empty field 'messages'": 1,
        "missing field 'messages'": 1,
    }


def test_chat_needs_a_template_that_extends_earlier_turns(demo_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}])
    config = DataConfig(path=str(path), format="chat")
    with pytest.raises(UserError, match="^data.format: chat needs a tokenizer with a chat template"):
        prepare_data(config, with_template(demo_tokenizer, None), 256, 0)
    # Adds a header once the conversation is long, so the first exchange renders differently after the second.
    turns = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    unstable = "{% if messages | length > 3 %}[long]\n{% endif %}" + turns
    data = prepare_data(config, with_template(demo_tokenizer, unstable), 256, 0)
    assert data.stats.bad_reasons == {"chat template renders earlier turns differently once later turns follow": 1}
    assert data.stats.train_examples == 1
    strict = "{% if messages | length > 3 %}{{ raise_exception('at most one exchange') }}{% endif %}" + turns
    with pytest.raises(UserError, match=r"row 1: chat template error: at most one exchange"):
        prepare_data(DataConfig(path=str(path), format="chat", on_bad_row="error"),
                     with_template(demo_tokenizer, strict), 256, 0)


def test_bad_rows_are_counted_by_reason_or_raise_with_the_row_number(demo_tokenizer, tmp_path):
    bad = [{"instruction": "x"}, {"instruction": "", "output": "y"}, {"instruction": ["a"], "output": "y"}, [1, 2]]
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:4] + bad)
    with path.open("a") as file:
        file.write('{"instruction": "unterminated\n\n')
    data = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, 0)
    assert (data.stats.rows_read, data.stats.rows_bad, data.stats.train_examples) == (9, 5, 4)
    assert data.stats.bad_reasons == {"missing field 'output'": 1, "empty field 'instruction'": 1,
                                      "field 'instruction' is not text": 1, "row is not a JSON object": 1,
                                      "line is not valid JSON": 1}
    with pytest.raises(UserError, match=r"^data.path: row 5: missing field 'output' \(data.on_bad_row: skip"):
        prepare_data(DataConfig(path=str(path), on_bad_row="error"), demo_tokenizer, 256, 0)


def test_no_usable_row_is_an_error_with_the_reason_counts(demo_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 3 + [{"output": "c"}])
    with pytest.raises(UserError, match=r"none of the 4 rows of .* is usable \(missing field 'instruction': 4\)"):
        prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, 0)


def test_truncation_and_prompts_longer_than_max_seq_len(demo_tokenizer, tmp_path):
    long_output = {"instruction": "Say it.", "input": "", "output": "apple " * 100}
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [long_output])
    data = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 60, 0)
    assert data.stats.rows_truncated == 1 and data.stats.rows_bad == data.stats.rows_dropped == 0
    full = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 1024, 0)
    assert (full.stats.rows_truncated, full.stats.label_tokens_lost) == (0, 0)
    full = full.train
    assert data.train[:2] == full[:2] and len(full[2]["input_ids"]) > 60
    assert data.train[2] == {"input_ids": full[2]["input_ids"][:60], "labels": full[2]["labels"][:60]}
    labelled = [sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in full]
    kept = sum(label != IGNORE_INDEX for label in data.train[2]["labels"][1:])
    assert data.stats.label_tokens == sum(labelled) and data.stats.label_tokens_lost == labelled[2] - kept > 0
    prompt_tokens = len(demo_tokenizer(alpaca_prompt("Say it."))["input_ids"])
    alone = DataConfig(path=str(write_jsonl(tmp_path / "long.jsonl", [long_output, ROWS[0]])))
    # One response token fits: it is a label, so the row is usable; without it the row is bad.
    (example,) = prepare_data(alone, demo_tokenizer, prompt_tokens + 1, 0).train
    assert labelled_runs(demo_tokenizer, example) == ["apple"]
    with pytest.raises(UserError, match=rf"none of the 2 rows .*\(prompt longer than max_seq_len={prompt_tokens}: 2\)"):
        prepare_data(alone, demo_tokenizer, prompt_tokens, 0)


LONG_ROW = {"instruction": "Say it.", "input": "", "output": "apple " * 100}


def label_count(example: dict[str, list[int]]) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


@pytest.mark.parametrize("truncation", ["keep", "drop"])
def test_rows_longer_than_max_seq_len_are_counted_and_warned_about(demo_tokenizer, tmp_path, truncation):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:18] + [LONG_ROW] * 2)  # 2 of 20 rows (10%) do not fit
    data = prepare_data(DataConfig(path=str(path), truncation=truncation, on_bad_row="error"), demo_tokenizer, 60, 0)
    whole = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 1024, 0).train
    # 2 labels (answer and EOS) in each short row, 102 in each long one ("apple" 100 times, a space, EOS)
    assert data.stats.label_tokens == sum(label_count(example) for example in whole) == 18 * 2 + 2 * 102
    assert data.stats.rows_bad == 0 and data.train[:18] == whole[:18]
    if truncation == "keep":
        assert (data.stats.rows_truncated, data.stats.rows_dropped, len(data.train)) == (2, 0, 20)
        # 36 prompt tokens leave 24 of the response's in 60, its EOS not among them
        assert label_count(data.train[18]) == 24 and data.train[18]["labels"][-1] != demo_tokenizer.eos_token_id
        assert data.stats.label_tokens_lost == 2 * (102 - 24)
        share = 2 * (102 - 24) / 240
        message = "2 truncated (a cut response loses its EOS too)"
        fix = "raise training.max_seq_len or set data.truncation: drop"
    else:
        assert (data.stats.rows_truncated, data.stats.rows_dropped, len(data.train)) == (0, 2, 18)
        assert data.stats.label_tokens_lost == 2 * 102
        share, message, fix = 2 * 102 / 240, "2 dropped", "raise training.max_seq_len"
    assert truncation_warning(data.stats, 60) == (
        f"warning: 2 of 20 rows (10.0%) are longer than training.max_seq_len=60: {message}, {share:.1%} of the label "
        f"tokens lost; {fix}")
    one_in_twenty = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "e.jsonl", ROWS[:19] + [LONG_ROW])),
                                            truncation=truncation), demo_tokenizer, 60, 0)
    assert one_in_twenty.stats.rows_truncated + one_in_twenty.stats.rows_dropped == 1
    assert truncation_warning(one_in_twenty.stats, 60) is None  # 5% is not more than 5%


def test_drop_skips_rows_whose_prompt_alone_is_too_long(demo_tokenizer, tmp_path):
    long_prompt = {"instruction": "Say it. " * 30, "input": "", "output": "yes"}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt, ROWS[0]])
    kept = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 60, 0)
    assert kept.stats.bad_reasons == {"prompt longer than max_seq_len=60": 1} and kept.stats.rows_truncated == 0
    dropped = prepare_data(DataConfig(path=str(path), truncation="drop"), demo_tokenizer, 60, 0)
    assert (dropped.stats.rows_bad, dropped.stats.rows_dropped, dropped.train) == (0, 1, kept.train)
    with pytest.raises(UserError, match=r"none of the 1 rows .*\(longer than max_seq_len=60 \(data.truncation: drop\)"):
        prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "e.jsonl", [long_prompt])), truncation="drop"),
                     demo_tokenizer, 60, 0)


@pytest.mark.parametrize("name, content, message", [
    ("d.json", b"", r"is empty$"),
    ("d.jsonl", b'{"text": "caf\xe9"}\n', r"is not UTF-8 text \(bad byte at offset 13\)"),
    ("d.csv", b"text\ncaf\xe9\n", r"is not UTF-8 text \(bad byte at offset 8\)"),
    ("d.json", b"[1, 2", r"is not valid JSON \(line 1: Expecting ',' delimiter\)"),
    ("d.json", b'{\n "instruction": "x",\n "output": "y"\n}\n', r"is neither a JSON list of rows nor JSON Lines"),
    ("d.jsonl", b"\n\n", r"holds no rows"),
    ("d.csv", b"instruction,output\n", r"holds no rows, only a header"),
    ("d.parquet", b"not parquet", r"as .parquet: Parquet magic bytes not found"),
])
def test_unreadable_files_are_one_line_errors(demo_tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"^data.path: .*{message}") as raised:
        prepare_data(DataConfig(path=str(path)), demo_tokenizer, 64, 0)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_missing_file_folder_and_unsupported_extension(demo_tokenizer, tmp_path):
    with pytest.raises(UserError, match="none.jsonl does not exist; give a .jsonl, .json, .csv, .parquet file"):
        prepare_data(DataConfig(path=str(tmp_path / "none.jsonl")), demo_tokenizer, 64, 0)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported extension; use .jsonl, .json, .csv, .parquet or a save_to_disk"):
        prepare_data(DataConfig(path=str(tmp_path / "d.txt")), demo_tokenizer, 64, 0)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder is a folder but not a data set written by save_to_disk"):
        prepare_data(DataConfig(path=str(tmp_path / "folder")), demo_tokenizer, 64, 0)


@pytest.mark.parametrize("rows, fraction, sizes", [(20, 0.25, (15, 5)), (20, 0.01, (19, 1)), (2, 0.9, (1, 1)),
                                                   (1, 0.5, (1, 0)), (20, 0.0, (20, 0))])
def test_eval_split_sizes(demo_tokenizer, tmp_path, rows, fraction, sizes):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS[:rows])), eval_fraction=fraction)
    data = prepare_data(config, demo_tokenizer, 256, 0)
    assert (len(data.train), len(data.eval)) == (data.stats.train_examples, data.stats.eval_examples) == sizes


def test_eval_split_is_seeded_disjoint_and_keeps_file_order(demo_tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), eval_fraction=0.25)
    everything = prepare_data(DataConfig(path=config.path), demo_tokenizer, 256, 0).train
    first, again, other = (prepare_data(config, demo_tokenizer, 256, seed) for seed in (1, 1, 2))
    assert first == again and first.eval != other.eval
    assert [e for e in everything if e in first.eval] == first.eval
    assert [e for e in everything if e not in first.eval] == first.train


@pytest.mark.parametrize("max_seq_len, rows", [(64, 16), (128, 7), (200, 5)])  # 16 examples of 58 or 37 tokens
def test_packing_keeps_every_example_whole_and_apart(demo_tokenizer, tmp_path, max_seq_len, rows):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    unpacked = prepare_data(DataConfig(path=path, eval_fraction=0.2), demo_tokenizer, max_seq_len, 0)
    packed = prepare_data(DataConfig(path=path, eval_fraction=0.2, packing=True), demo_tokenizer, max_seq_len, 0)
    assert len(packed.train) == packed.stats.train_examples == rows
    assert all(len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_seq_len
               for row in packed.train)
    # every example is in one row, whole, its positions counting from 0 and its first label masked as it is
    # never predicted alone (the examples start with BOS, whose label the prompt mask already removed)
    pieces = [piece for row in packed.train for piece in packed_examples(row)]
    assert sorted(piece["input_ids"] for piece in pieces) == sorted(e["input_ids"] for e in unpacked.train)
    for piece in pieces:
        example = next(e for e in unpacked.train if e["input_ids"] == piece["input_ids"])
        assert piece["labels"] == [IGNORE_INDEX] + example["labels"][1:]
        assert piece["position_ids"] == list(range(len(example["input_ids"])))
    assert packed.stats.train_tokens == unpacked.stats.train_tokens == sum(len(e["input_ids"]) for e in unpacked.train)
    assert packed.eval == unpacked.eval


def test_pack_is_best_fit_decreasing_and_masks_each_first_label():
    examples = [{"input_ids": [n] * n, "labels": [10 + n] * n} for n in (2, 5, 3, 1, 4, 3, 2)]
    rows = pack(examples, 8)
    # longest first, each into the row it leaves the least room in: 5 | 4 | 3 -> 5+3 | 3 -> 4+3 | 2 -> new row
    # | 2 -> 2+2 | 1 -> 4+3+1
    assert [row["input_ids"] for row in rows] == [[5] * 5 + [3] * 3, [4] * 4 + [3] * 3 + [1], [2] * 4]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert rows[1]["labels"] == [IGNORE_INDEX, 14, 14, 14, IGNORE_INDEX, 13, 13, IGNORE_INDEX]
    assert pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], 3) == [
        {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "position_ids": [0, 1, 2]}]


def test_demo_packing_keeps_every_token(demo_tokenizer):
    config = DataConfig(path=str(DEMO_DATA_DIR / "alpaca-tiny.jsonl"), eval_fraction=0.1)  # as demo-tiny.yaml
    unpacked = prepare_data(config, demo_tokenizer, 128, 42)
    packed = prepare_data(dataclasses.replace(config, packing=True), demo_tokenizer, 128, 42)
    assert packed.stats.train_tokens == unpacked.stats.train_tokens == 17_493
    # 360 examples of 37 to 60 tokens: 2 or 3 whole ones a row, 153 rows with 2091 tokens of padding
    assert (packed.stats.train_examples, 128 * packed.stats.train_examples - packed.stats.train_tokens) == (153, 2091)


def test_collate_gives_packed_padding_positions_of_its_own():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9], "labels": [-100], "position_ids": [0]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, -100, -100, -100]]
    assert "position_ids" not in collate([{"input_ids": [5], "labels": [5]}], pad_token_id=0)


def test_collate_pads_right_with_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert {tensor.dtype for tensor in batch.values()} == {torch.long}


@pytest.mark.parametrize("name, data_format, rows",
                         [("alpaca-tiny.jsonl", "alpaca", 400), ("chat-tiny.jsonl", "chat", 100),
                          ("text-tiny.jsonl", "text", 100)])
def test_demo_data_is_clean_and_short(demo_tokenizer, name, data_format, rows):
    data = prepare_data(DataConfig(path=str(DEMO_DATA_DIR / name), format=data_format), demo_tokenizer, 128, 0)
    assert (data.stats.rows_read, data.stats.rows_bad, data.stats.rows_truncated) == (rows, 0, 0)
    assert max(len(example["input_ids"]) for example in data.train) < 80


def test_demo_model_matches_its_tokenizer(demo_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    config = model.config
    assert model.dtype == torch.bfloat16 and config.tie_word_embeddings is False
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 4, 2)
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0
    assert config.vocab_size == len(demo_tokenizer)
    assert (config.eos_token_id, config.pad_token_id) == (demo_tokenizer.eos_token_id, demo_tokenizer.pad_token_id)
    prompt = demo_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                add_generation_prompt=True)
    assert prompt == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_a_byte_order_mark_does_not_cost_the_first_row(demo_tokenizer, tmp_path):
    path = tmp_path / "bom.jsonl"
    plain = write_jsonl(tmp_path / "plain.jsonl", ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    with_bom = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, seed=0)
    without = prepare_data(DataConfig(path=str(plain)), demo_tokenizer, 256, seed=0)
    assert with_bom.stats.rows_bad == 0 and with_bom.train == without.train


def test_a_lone_surrogate_is_a_counted_bad_row_not_a_crash(demo_tokenizer, tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"instruction": "Add 1 and \\ud800.", "input": "", "output": "x"}\n'
                    + "".join(json.dumps(row) + "\n" for row in ROWS))
    data = prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, seed=0)
    assert data.stats.rows_bad == 1 and "lone surrogate" in next(iter(data.stats.bad_reasons))
    assert data.stats.train_examples == len(ROWS)


# --- sharegpt, column mapping, prompt templates, mixed files, epochs -----------------------------------------

SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages: list[dict], names: dict[str, str] = SHAREGPT_NAMES) -> list[dict]:
    return [{"from": names[message["role"]], "value": message["content"]} for message in messages]


@pytest.mark.parametrize("names", [SHAREGPT_NAMES, {"system": "system", "user": "user", "assistant": "assistant"}])
def test_sharegpt_rows_are_the_chat_path_with_only_gpt_turns_labelled(demo_tokenizer, tmp_path, names):
    chat = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])),
                                   format="chat"), demo_tokenizer, 512, 0)
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": as_sharegpt(CONVERSATION, names)}])
    (example,) = prepare_data(DataConfig(path=str(path), format="sharegpt"), demo_tokenizer, 512, 0).train
    assert example == chat.train[0]
    assert example["input_ids"] == list(demo_tokenizer.apply_chat_template(CONVERSATION, return_dict=False))
    eos = demo_tokenizer.eos_token
    assert labelled_runs(demo_tokenizer, example) == [f"3{eos}\n", f"4{eos}\n"]


def test_sharegpt_rows_with_bad_turns_are_counted_by_reason(demo_tokenizer, tmp_path):
    human, gpt = {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}
    rows = [
        {"conversations": as_sharegpt(CONVERSATION)},
        {"conversations": [human, human, gpt]},
        {"conversations": [{"from": "bot", "value": "a"}, gpt]},
        {"conversations": [{"from": ["gpt"], "value": "a"}, gpt]},
        {"conversations": [{"role": "user", "content": "a"}, gpt]},  # chat's keys in a sharegpt file
        {"conversations": [human, gpt, human]},
        {"conversations": [human, {"from": "gpt", "value": "  "}]},
        {"conversations": [human, {"from": "gpt", "value": 5}]},
        {"conversations": {"from": "human", "value": "a"}},
        {"conversations": []},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    data = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)), format="sharegpt"),
                        demo_tokenizer, 256, 0)
    assert (data.stats.rows_read, data.stats.rows_bad, data.stats.train_examples) == (11, 10, 1)
    assert data.stats.bad_reasons == {
        "roles out of order (want system?, then user/assistant alternating)": 1,
        "unknown role 'bot'": 1,
        "unknown role ['gpt']": 1,
        "message without text 'value'": 2,
        "conversation does not end with an assistant turn": 1,
        "message with empty 'value'": 1,
        "field 'conversations' is not a list": 1,
        "empty field 'conversations'": 1,
        "missing field 'conversations'": 1,
    }
    with pytest.raises(UserError, match="^data.format: sharegpt needs a tokenizer with a chat template"):
        prepare_data(DataConfig(path=str(tmp_path / "s.jsonl"), format="sharegpt"),
                     with_template(demo_tokenizer, None), 256, 0)


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(key, key): value for key, value in row.items()} for row in rows]


@pytest.mark.parametrize("data_format, rows, columns", [
    ("alpaca", ROWS, {"instruction": "question", "input": "context", "output": "answer"}),
    ("text", [{"text": "Add 1 and 2.\n3"}, {"text": "Say hi.\nhi"}], {"text": "body"}),
    ("chat", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}], {"messages": "dialog"}),
    ("sharegpt", [{"conversations": as_sharegpt(CONVERSATION)}], {"conversations": "convo"}),
])
def test_columns_read_each_format_field_from_the_mapped_column(demo_tokenizer, tmp_path, data_format, rows, columns):
    plain = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "plain.jsonl", rows)), format=data_format),
                         demo_tokenizer, 512, 0)
    # a decoy 7 under each field's own name: read, it would change the example or make the row bad
    mapped_rows = [dict(row, **{field: 7 for field in columns}) for row in renamed(rows, columns)]
    config = DataConfig(path=str(write_jsonl(tmp_path / "mapped.jsonl", mapped_rows)), format=data_format,
                        columns=columns)
    mapped = prepare_data(config, demo_tokenizer, 512, 0)
    assert mapped.train == plain.train and mapped.stats.rows_bad == 0


def test_a_mapped_column_missing_from_rows_is_a_counted_bad_row(demo_tokenizer, tmp_path):
    rows = renamed(ROWS[:3], {"instruction": "question", "output": "answer"}) + [{"question": "Say hi.", "output": "hi"}]
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                        columns={"instruction": "question", "output": "answer"})
    data = prepare_data(config, demo_tokenizer, 256, 0)
    assert (data.stats.rows_bad, data.stats.train_examples) == (1, 3)
    assert data.stats.bad_reasons == {"missing field 'answer'": 1}
    with pytest.raises(UserError, match=r"none of the 4 rows .* is usable \(missing field 'reply': 4\)"):
        prepare_data(dataclasses.replace(config, columns={"instruction": "question", "output": "reply"}),
                     demo_tokenizer, 256, 0)


TEMPLATE = "Task: {instruction}\nContext: {input}\nAnswer:\n"


def test_a_prompt_template_is_used_for_every_row_and_only_the_output_is_labelled(demo_tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), prompt_template=TEMPLATE)
    data = prepare_data(config, demo_tokenizer, 256, 0)
    eos = demo_tokenizer.eos_token_id
    assert data.stats.train_examples == len(ROWS)
    for row, example in zip(ROWS, data.train):
        prompt_ids = demo_tokenizer(f"Task: {row['instruction']}\nContext: {row['input']}\nAnswer:\n")["input_ids"]
        response_ids = demo_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [eos]
        assert example["input_ids"] == prompt_ids + response_ids
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert alpaca_prompt("Add 1 and 2.", "", TEMPLATE) == "Task: Add 1 and 2.\nContext: \nAnswer:\n"
    assert alpaca_prompt("x", "y", "alpaca") == alpaca_prompt("x", "y")  # the default is the Alpaca prompt


def test_a_template_without_input_counts_rows_whose_input_it_would_lose(demo_tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), prompt_template="Q: {instruction}\nA: ")
    data = prepare_data(config, demo_tokenizer, 256, 0)
    with_input = sum(bool(row["input"]) for row in ROWS)
    assert (data.stats.rows_bad, data.stats.train_examples) == (with_input, len(ROWS) - with_input) == (12, 8)
    assert data.stats.bad_reasons == {"field 'input' has text but data.prompt_template has no {input}": 12}
    assert data.train[0]["input_ids"][:len(demo_tokenizer("Q: Add 1 and 0.\nA: ")["input_ids"])] == \
        demo_tokenizer("Q: Add 1 and 0.\nA: ")["input_ids"]


# A long fixed preamble: 90 prompt tokens with an input, 84 without, each answer 1 token and EOS.
LONG_TEMPLATE = "You are a careful assistant. " * 6 + TEMPLATE


def test_a_long_template_at_a_small_max_seq_len_is_counted_and_warned_about(demo_tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    fits = prepare_data(DataConfig(path=path, prompt_template=LONG_TEMPLATE), demo_tokenizer, 86, 0)
    # the 12 rows with an input: their prompt alone is longer than 86; the 8 without fit whole
    assert (fits.stats.rows_bad, fits.stats.rows_prompt_too_long, fits.stats.rows_truncated) == (12, 12, 0)
    assert fits.stats.bad_reasons == {"prompt longer than max_seq_len=86": 12}
    assert (fits.stats.label_tokens, fits.stats.label_tokens_lost, fits.stats.train_examples) == (40, 24, 8)
    assert truncation_warning(fits.stats, 86) == (
        "warning: 12 of 20 rows (60.0%) are longer than training.max_seq_len=86: 12 skipped (the prompt alone is "
        "that long), 60.0% of the label tokens lost; raise training.max_seq_len")
    cut = prepare_data(DataConfig(path=path, prompt_template=LONG_TEMPLATE), demo_tokenizer, 85, 0)
    assert (cut.stats.rows_prompt_too_long, cut.stats.rows_truncated, cut.stats.label_tokens_lost) == (12, 8, 32)
    assert truncation_warning(cut.stats, 85) == (
        "warning: 20 of 20 rows (100.0%) are longer than training.max_seq_len=85: 8 truncated (a cut response loses "
        "its EOS too), 12 skipped (the prompt alone is that long), 80.0% of the label tokens lost; raise "
        "training.max_seq_len or set data.truncation: drop")
    dropped = prepare_data(DataConfig(path=path, prompt_template=LONG_TEMPLATE, truncation="drop"),
                           demo_tokenizer, 86, 0)
    assert (dropped.stats.rows_bad, dropped.stats.rows_dropped, dropped.train) == (0, 12, fits.train)
    assert truncation_warning(dropped.stats, 86).startswith("warning: 12 of 20 rows (60.0%)")


def test_mix_repeats_and_samples_each_group_to_its_weighted_share():
    small, large = list("ab"), list("cdefgh")
    assert mix([large], [5.0], seed=0) == large  # one file: as it is
    # 8 examples: weights 3:1 give the small file 6 (three times whole) and the large one 2 of its 6
    mixed = mix([small, large], [3.0, 1.0], seed=0)
    assert mixed[:6] == small * 3 and len(mixed) == 8
    sample = mixed[6:]
    assert len(set(sample)) == 2 and set(sample) <= set(large) and sample == sorted(sample)
    assert mix([small, large], [3.0, 1.0], seed=0) == mixed
    assert {tuple(mix([small, large], [3.0, 1.0], seed)[6:]) for seed in range(10)} != {tuple(sample)}
    # equal weights: 4 each; 4 of the large file's 6 and the small file twice
    equal = mix([small, large], [1.0, 1.0], seed=1)
    assert equal[:4] == small * 2 and len(equal[4:]) == 4 and set(equal[4:]) < set(large)


def test_several_files_are_mixed_by_weight_with_eval_held_out_of_each(demo_tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    second = write_jsonl(tmp_path / "b.jsonl", ROWS[2:8])
    alone = {name: prepare_data(DataConfig(path=str(path)), demo_tokenizer, 256, 0).train
             for name, path in (("a", first), ("b", second))}
    sources = [DataSource(str(first), 3.0), DataSource(str(second), 1.0)]
    data = prepare_data(DataConfig(path=sources), demo_tokenizer, 256, 0)
    assert data.train[:6] == alone["a"] * 3
    assert len(data.train[6:]) == 2 and all(example in alone["b"] for example in data.train[6:])
    assert (data.stats.rows_read, data.stats.train_examples) == (8, 8)
    # plain paths weigh 1: an equal share each
    plain = prepare_data(DataConfig(path=[str(first), str(second)]), demo_tokenizer, 256, 0)
    assert plain.train[:4] == alone["a"] * 2 and len(plain.train) == 8
    # a single path, plain or in a list, is read as before
    assert prepare_data(DataConfig(path=[DataSource(str(second), 2.0)]), demo_tokenizer, 256, 0).train == alone["b"]
    held = prepare_data(DataConfig(path=sources, eval_fraction=0.5), demo_tokenizer, 256, 0)
    assert held.stats.eval_examples == 1 + 3 and not any(example in held.train for example in held.eval)
    assert all(example in alone["a"] + alone["b"] for example in held.eval)


def test_a_bad_file_in_a_mix_is_named(demo_tokenizer, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:4])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}] * 2)
    with pytest.raises(UserError, match=rf"^data.path: none of the 2 rows of {bad} is usable"):
        prepare_data(DataConfig(path=[str(good), str(bad)]), demo_tokenizer, 256, 0)
    with pytest.raises(UserError, match=rf"^data.path: {bad} row 1: missing field 'output'"):
        prepare_data(DataConfig(path=[str(good), str(bad)], on_bad_row="error"), demo_tokenizer, 256, 0)


@pytest.mark.parametrize("examples, micro_batch, accumulation, epochs, steps", [
    (10, 2, 2, 1, 3),  # 10 examples at 4 a step: the third step starts the second pass
    (12, 2, 2, 1, 3), (12, 2, 2, 2.5, 8), (30, 1, 1, 0.1, 3), (5, 4, 4, 0.01, 1), (360, 8, 1, 3, 135),
])
def test_steps_for_epochs(examples, micro_batch, accumulation, epochs, steps):
    assert steps_for_epochs(examples, micro_batch, accumulation, epochs) == steps
