"""Data loading and formatting with real datasets and the bundled demo tokenizer: masks, sources, errors, packing."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from qlora_trainer.config import DataConfig
from qlora_trainer.data import IGNORE_INDEX, alpaca_prompt, collate, pack, prepare_data
from qlora_trainer.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "demo"
ROWS = [{"instruction": f"Add {a} and {b}.", "input": "" if a % 2 else "numbers", "output": str(a + b)}
        for a in range(5) for b in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO / "tiny-llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_alpaca_labels_cover_exactly_the_response_and_eos(tokenizer, tmp_path):
    data = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))), tokenizer, 256, seed=0)
    assert data.stats.train_examples == len(ROWS) and data.stats.rows_bad == 0
    for row, example in zip(ROWS, data.train):
        assert labelled_text(tokenizer, example) == row["output"] + tokenizer.eos_token
        prompt_ids = tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        assert example["input_ids"][:len(prompt_ids)] == prompt_ids
        assert set(example["labels"][:len(prompt_ids)]) == {IGNORE_INDEX}


def test_mask_prompt_off_labels_everything(tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS[:3])), mask_prompt=False)
    for example in prepare_data(config, tokenizer, 256, seed=0).train:
        assert example["labels"] == example["input_ids"]


def test_every_source_kind_gives_the_same_examples(tokenizer, tmp_path):
    reference = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))), tokenizer, 256, 0).train
    table = datasets.Dataset.from_list(ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    for source in ("d.json", "d.csv", "d.parquet", "disk", "dict"):
        loaded = prepare_data(DataConfig(path=str(tmp_path / source)), tokenizer, 256, 0).train
        assert loaded == reference, source
    with pytest.raises(UserError, match="data.split: 'validation' is not in"):
        prepare_data(DataConfig(path=str(tmp_path / "dict"), split="validation"), tokenizer, 256, 0)


def test_chat_labels_only_assistant_turns(tokenizer, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
                    {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 and 2?"},
                    {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    (example,) = prepare_data(DataConfig(path=str(path), format="chat"), tokenizer, 512, 0).train
    full = tokenizer.apply_chat_template(conversation, tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert example["input_ids"] == list(full)
    assert labelled_text(tokenizer, example) == f"3{tokenizer.eos_token}\n4{tokenizer.eos_token}\n"


def test_bad_rows_are_counted_by_reason_or_raise_with_the_row_number(tokenizer, tmp_path):
    bad = [{"instruction": "x"}, {"instruction": "", "output": "y"}, {"instruction": ["a"], "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:4] + bad)
    data = prepare_data(DataConfig(path=str(path)), tokenizer, 256, 0)
    assert data.stats.rows_read == 7 and data.stats.rows_bad == 3
    assert data.stats.bad_reasons == {"missing field 'output'": 1, "empty field 'instruction'": 1,
                                      "field 'instruction' is not text": 1}
    with pytest.raises(UserError, match="row 5: missing field 'output'"):
        prepare_data(DataConfig(path=str(path), on_bad_row="error"), tokenizer, 256, 0)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"}]}])
    with pytest.raises(UserError, match=r"none of the 1 rows .* \(roles out of order"):
        prepare_data(DataConfig(path=str(chat), format="chat"), tokenizer, 256, 0)


def test_truncation_and_prompts_longer_than_max_seq_len(tokenizer, tmp_path):
    long_output = {"instruction": "Say it.", "input": "", "output": "word " * 100}
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [long_output])
    data = prepare_data(DataConfig(path=str(path)), tokenizer, 60, 0)
    assert data.stats.rows_truncated == 1 and max(len(e["input_ids"]) for e in data.train) == 60
    with pytest.raises(UserError, match="prompt longer than max_seq_len=10"):
        prepare_data(DataConfig(path=str(path)), tokenizer, 10, 0)


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b'{"text": "caf\xe9"}\n', "not UTF-8"),
                                              (b"[1, 2", "not valid JSON")])
def test_unreadable_files(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_data(DataConfig(path=str(path)), tokenizer, 64, 0)


def test_missing_file_and_unsupported_extension(tokenizer, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(DataConfig(path=str(tmp_path / "none.jsonl")), tokenizer, 64, 0)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported extension; use .jsonl, .json, .csv, .parquet"):
        prepare_data(DataConfig(path=str(tmp_path / "d.txt")), tokenizer, 64, 0)


def test_eval_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), eval_fraction=0.25)
    first, again, other = (prepare_data(config, tokenizer, 256, seed) for seed in (1, 1, 2))
    assert (first.stats.train_examples, first.stats.eval_examples) == (15, 5)
    assert first.eval == again.eval and first.eval != other.eval
    assert not {tuple(e["input_ids"]) for e in first.eval} & {tuple(e["input_ids"]) for e in first.train}


def test_packing_fills_rows_with_the_examples_in_order(tokenizer, tmp_path):
    config = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), packing=True)
    unpacked = prepare_data(DataConfig(path=config.path), tokenizer, 64, 0).train
    packed = prepare_data(config, tokenizer, 64, 0).train
    assert all(len(row["input_ids"]) == 64 for row in packed)
    flat_labels = [label for example in unpacked for label in example["labels"]]
    assert [label for row in packed for label in row["labels"]] == flat_labels[:64 * len(packed)]
    assert pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], 8) == [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]


def test_collate_pads_right_with_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
