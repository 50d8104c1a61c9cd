"""Training data: load a file or data set, format rows (alpaca / chat / text), mask prompts, pack, collate."""

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from qlora_trainer.config import DataConfig
from qlora_trainer.errors import UserError

IGNORE_INDEX = -100
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# The Alpaca prompt (Taori et al. 2023), with and without an input field.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class DataStats:
    rows_read: int  # rows in the source
    rows_bad: int  # rows skipped as malformed
    bad_reasons: dict[str, int]  # reason -> count
    rows_truncated: int  # usable rows cut to max_seq_len
    train_examples: int  # examples (or packed rows) in the train split
    eval_examples: int


@dataclass(frozen=True)
class TokenizedData:
    train: list[dict[str, list[int]]]  # {"input_ids": [...], "labels": [...]}, labels -100 where masked
    eval: list[dict[str, list[int]]]
    stats: DataStats


class BadRow(ValueError):
    """A row that cannot become a training example; the message is the reason counted in DataStats."""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt part of an alpaca example (everything the model is not trained to produce)."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


_MALFORMED = "__malformed_json__"


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL (or a JSON list) parsed here rather than by Arrow, which would coerce mixed types column-wide and
    fail the whole file on one malformed line; such a line becomes one bad row instead."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"data.path: {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
        return [row if isinstance(row, dict) else {_MALFORMED: True} for row in rows]
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else {_MALFORMED: True})
    return rows


def _read_rows(config: DataConfig) -> list[dict[str, Any]]:
    """Rows of the source as plain dicts, with one-line errors for unusable sources."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(config.path)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                if config.split not in loaded:
                    raise UserError(f"data.split: {config.split!r} is not in {path}; it has {', '.join(loaded)}")
                loaded = loaded[config.split]
        elif path.is_file():
            builder = EXTENSIONS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"data.path: {path} has an unsupported extension; use "
                                f"{', '.join(EXTENSIONS)} or a save_to_disk folder")
            if path.stat().st_size == 0:
                raise UserError(f"data.path: {path} is empty")
            try:
                if builder == "json":
                    rows = _read_json_rows(path)
                    if not rows:
                        raise UserError(f"data.path: {config.path} holds no rows")
                    return rows
                if builder == "csv":
                    path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"data.path: {path} is not UTF-8 text (bad byte at offset {err.start})") from None
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
        elif path.is_absolute() or path.suffix or config.path.startswith("."):
            raise UserError(f"data.path: {config.path} does not exist; give a JSONL/JSON/CSV/Parquet file or a "
                            "save_to_disk folder")
        else:
            loaded = datasets.load_dataset(config.path, split=config.split)
    except UserError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for unreadable input
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"data.path: cannot read {config.path}: {first_line}") from None
    rows = loaded.to_list()
    if not rows:
        raise UserError(f"data.path: {config.path} holds no rows")
    return rows


def _text_field(row: dict, name: str, required: bool = True) -> str:
    if row.get(_MALFORMED):
        raise BadRow("not a JSON object")
    value = row.get(name)
    if value is None:
        if required:
            raise BadRow(f"missing field '{name}'")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV and Parquet type numeric columns; "8" is a fine answer
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' is not text")
    if required and not value.strip():
        raise BadRow(f"empty field '{name}'")
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRow("missing field 'messages'")
    turns = list(messages)
    if isinstance(turns[0], dict) and turns[0].get("role") == "system":
        turns = turns[1:]
    for index, message in enumerate(turns):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRow("message without text 'content'")
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") not in ("user", "assistant", "system"):
            raise BadRow(f"unknown role {message.get('role')!r}")
        if message["role"] != expected:
            raise BadRow("roles out of order (want system?, then user/assistant alternating)")
    if not turns or turns[-1]["role"] != "assistant":
        raise BadRow("no assistant reply at the end")
    return messages


def _chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[list[int], bool]]:
    """Token segments of a conversation, each flagged True when it is assistant text to learn."""
    segments = []
    previous: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:index + 1], tokenize=True)
        prompt, full = _as_ids(prompt), _as_ids(full)
        segments.append((prompt[len(previous):], False))
        segments.append((full[len(prompt):], True))
        previous = full
    return segments


def _as_ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _segments(row: dict, config: DataConfig, tokenizer) -> list[tuple[list[int], bool]]:
    """(token ids, is_target) pieces of one row in its format."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if config.format == "alpaca":
        instruction = _text_field(row, "instruction")
        input_text = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        prompt_ids = tokenizer(alpaca_prompt(instruction, input_text), add_special_tokens=True)["input_ids"]
        output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + eos
        return [(prompt_ids, False), (output_ids, True)]
    if config.format == "chat":
        return _chat_segments(_check_messages(row.get("messages")), tokenizer)
    text = _text_field(row, config.text_field)
    return [(tokenizer(text, add_special_tokens=True)["input_ids"] + eos, True)]


def tokenize_row(row: dict, config: DataConfig, tokenizer, max_seq_len: int) -> tuple[dict[str, list[int]], bool]:
    """One example with labels, and whether it was truncated; raises BadRow for unusable rows."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_target in _segments(row, config, tokenizer):
        input_ids += ids
        labels += ids if (is_target or not config.mask_prompt) else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise BadRow(f"prompt longer than max_seq_len={max_seq_len}")
    return {"input_ids": input_ids, "labels": labels}, truncated


def pack(examples: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples (each already ends with EOS) and cut rows of exactly max_seq_len tokens."""
    ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    rows = [
        {"input_ids": ids[start:start + max_seq_len], "labels": labels[start:start + max_seq_len]}
        for start in range(0, len(ids), max_seq_len)
    ]
    if len(rows) > 1 and len(rows[-1]["input_ids"]) < max_seq_len:
        rows.pop()
    return rows


def prepare_data(config: DataConfig, tokenizer, max_seq_len: int, seed: int) -> TokenizedData:
    """Read, check, tokenize and split the data; bad rows are skipped and counted (or raise, on_bad_row=error)."""
    if config.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format: chat needs a tokenizer with a chat template; this one has none "
                        "(use alpaca or text, or a tokenizer with a chat_template)")
    rows = _read_rows(config)
    examples, reasons, truncated = [], Counter(), 0
    for number, row in enumerate(rows, start=1):
        try:
            example, was_truncated = tokenize_row(row, config, tokenizer, max_seq_len)
        except BadRow as bad:
            if config.on_bad_row == "error":
                raise UserError(f"data.path: row {number}: {bad} (data.on_bad_row: skip would skip it)") from None
            reasons[str(bad)] += 1
            continue
        examples.append(example)
        truncated += was_truncated
    if not examples:
        summary = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
        raise UserError(f"data.path: none of the {len(rows)} rows of {config.path} is usable ({summary})")
    eval_examples: list[dict[str, list[int]]] = []
    if config.eval_fraction > 0 and len(examples) >= 2:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = min(len(examples) - 1, max(1, round(len(examples) * config.eval_fraction)))
        held_out = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held_out)]
        examples = [example for i, example in enumerate(examples) if i not in held_out]
    train_examples = pack(examples, max_seq_len) if config.packing else examples
    stats = DataStats(
        rows_read=len(rows),
        rows_bad=sum(reasons.values()),
        bad_reasons=dict(reasons),
        rows_truncated=truncated,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
    )
    return TokenizedData(train=train_examples, eval=eval_examples, stats=stats)


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_token_id, attention_mask 0 and labels -100 on pads."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_for_generation(instruction: str, data_format: str, tokenizer, input_text: str = "") -> Optional[str]:
    """The prompt a model trained on `data_format` expects for an instruction (None for plain text)."""
    if data_format == "alpaca":
        return alpaca_prompt(instruction, input_text)
    if data_format == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return None
