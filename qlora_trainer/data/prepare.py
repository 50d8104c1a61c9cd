"""Training examples: load a file or data set, format rows (alpaca / chat / text), mask prompts, pack.

`prepare_data` turns `data.*` of the run specification into token ids and labels: it reads the rows, formats and
tokenizes each one (a malformed row is skipped and counted, or raises with its row number), masks the prompt
with -100, truncates a row longer than `max_seq_len` or drops it (data.truncation, counted either way), holds out
a seeded eval split and packs the train split if asked.
"""

import bisect
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import jinja2

from qlora_trainer.spec import DataConfig
from qlora_trainer.errors import UserError

IGNORE_INDEX = -100
TRUNCATION_WARNING_SHARE = 0.05  # more rows than this share cut or dropped for length: say so before training
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CHAT_ROLES = ("system", "user", "assistant")

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
    bad_reasons: dict[str, int]  # reason -> count, e.g. {"missing field 'output'": 3}
    rows_truncated: int  # usable rows longer than max_seq_len, cut to it (data.truncation: keep)
    rows_dropped: int  # usable rows longer than max_seq_len, skipped (data.truncation: drop)
    label_tokens: int  # label tokens of the usable rows before any cut, as the loss counts them (not a row's first)
    label_tokens_lost: int  # of those, how many truncation cut off or dropped with their row
    train_examples: int  # examples (or packed rows) in the train split
    train_tokens: int  # tokens of the train split, padding excluded (packing keeps them all)
    eval_examples: int  # examples in the eval split (never packed)


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


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _read_json_rows(path: Path) -> list[Any]:
    """A JSON list of rows, or JSON Lines. Parsed here rather than by Arrow, which coerces mixed types column-wide
    and fails the whole file on one malformed line; such a line becomes one bad row instead."""
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark would otherwise spoil the first row
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"data.path: {path} is not valid JSON (line {err.lineno}: {err.msg}); expected a list "
                            "of rows or one JSON object per line") from None
    rows: list[Any] = []
    first_error = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(BadRow("line is not valid JSON"))
            first_error = first_error or f"line {number}: {err.msg}"
    if rows and all(isinstance(row, BadRow) for row in rows):
        raise UserError(f"data.path: {path} is neither a JSON list of rows nor JSON Lines ({first_error})")
    return rows


def _read_file(path: Path) -> list[Any]:
    builder = EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"data.path: {path} has an unsupported extension; use {', '.join(EXTENSIONS)} "
                        "or a save_to_disk folder")
    if path.stat().st_size == 0:
        raise UserError(f"data.path: {path} is empty")
    try:
        if builder == "json":
            return _read_json_rows(path)
        if builder == "csv" and len(path.read_text(encoding="utf-8").strip().splitlines()) < 2:
            raise UserError(f"data.path: {path} holds no rows, only a header")
    except UnicodeDecodeError as err:
        raise UserError(f"data.path: {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    # A CSV cell is taken as written: an empty cell is "", and "NA" or "null" is text, not a missing value.
    options = {"keep_default_na": False} if builder == "csv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **options)
    except Exception as err:  # datasets, pandas and pyarrow raise many types for unreadable input
        raise UserError(f"data.path: cannot read {path} as {path.suffix}: {_first_line(err)}") from None
    return loaded.to_list()


def _read_saved(path: Path, split: str) -> list[Any]:
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError:
        raise UserError(f"data.path: {path} is a folder but not a data set written by save_to_disk; give such a "
                        f"folder or a {', '.join(EXTENSIONS)} file") from None
    except Exception as err:
        raise UserError(f"data.path: cannot read the data set in {path}: {_first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"data.split: {split!r} is not in {path}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(name: str, split: str) -> list[Any]:
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, gated, missing split: all end here
        raise UserError(f"data.path: {name} is neither a local file nor a reachable data set "
                        f"({_first_line(err)})") from None
    return loaded.to_list()


def _read_rows(config: DataConfig) -> list[Any]:
    """Rows of the source as plain values (dicts when well formed), with one-line errors for unusable sources."""
    datasets.disable_progress_bars()
    path = Path(config.path)
    if path.is_file():
        rows = _read_file(path)
    elif path.is_dir():
        rows = _read_saved(path, config.split)
    elif path.suffix or path.is_absolute() or config.path.startswith("."):
        raise UserError(f"data.path: {config.path} does not exist; give a {', '.join(EXTENSIONS)} file, a "
                        "save_to_disk folder or a hub data set name")
    else:
        rows = _read_hub(config.path, config.split)
    if not rows:
        raise UserError(f"data.path: {config.path} holds no rows")
    return rows


def _text_field(row: dict, name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise BadRow(f"missing field '{name}'")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV and Parquet type numeric columns; 8 is a fine answer to "Add 3 and 5."
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' is not text")
    if required and not value.strip():
        raise BadRow(f"empty field '{name}'")
    return _encodable(value, f"field '{name}'")


def _encodable(value: str, what: str) -> str:
    """Text a tokenizer can take: JSON admits lone surrogates (\\ud800), which no UTF-8 tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"{what} holds a lone surrogate (not valid Unicode text)") from None
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """A conversation: an optional system turn, then user/assistant turns alternating, ending with assistant."""
    if messages is None:
        raise BadRow("missing field 'messages'")
    if not isinstance(messages, list):
        raise BadRow("field 'messages' is not a list")
    if not messages:
        raise BadRow("empty field 'messages'")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRow("message without text 'content'")
        if not message["content"].strip():
            raise BadRow("message with empty 'content'")
        _encodable(message["content"], "message 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise BadRow(f"unknown role {message.get('role')!r}")
    roles = [message["role"] for message in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user" if index % 2 == 0 else "assistant") for index, role in enumerate(turns)):
        raise BadRow("roles out of order (want system?, then user/assistant alternating)")
    if not turns or turns[-1] != "assistant":
        raise BadRow("conversation does not end with an assistant turn")
    return messages


def _template_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))
    except jinja2.TemplateError as err:  # templates reject conversations with raise_exception(...)
        raise BadRow(f"chat template error: {_first_line(err)}") from None


def _chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[list[int], bool]]:
    """Token segments of a conversation, each flagged True when it is an assistant turn to learn.

    The boundaries come from templating prefixes: the conversation up to a user turn with the generation prompt
    ends where the assistant's text starts, and up to the assistant turn where it ends (its end-of-turn tokens
    included, so the model learns to stop)."""
    segments: list[tuple[list[int], bool]] = []
    previous: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _template_ids(tokenizer, messages[:index], add_generation_prompt=True)
        full = _template_ids(tokenizer, messages[:index + 1], add_generation_prompt=False)
        if prompt[:len(previous)] != previous or full[:len(prompt)] != prompt:
            raise BadRow("chat template renders earlier turns differently once later turns follow")
        segments += [(prompt[len(previous):], False), (full[len(prompt):], True)]
        previous = full
    return segments


def _segments(row: Any, config: DataConfig, tokenizer) -> list[tuple[list[int], bool]]:
    """(token ids, is_target) pieces of one row in its format."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if config.format == "chat":
        return _chat_segments(_check_messages(row.get("messages")), tokenizer)
    eos = [tokenizer.eos_token_id]
    if config.format == "alpaca":
        instruction = _text_field(row, "instruction")
        input_text = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        prompt_ids = tokenizer(alpaca_prompt(instruction, input_text), add_special_tokens=True)["input_ids"]
        return [(prompt_ids, False), (tokenizer(output, add_special_tokens=False)["input_ids"] + eos, True)]
    text = _text_field(row, config.text_field)
    return [(tokenizer(text, add_special_tokens=True)["input_ids"] + eos, True)]


def _tokenize_row(row: Any, config: DataConfig, tokenizer) -> dict[str, list[int]]:
    """One example with labels, whole (not yet fitted to max_seq_len); raises BadRow for unusable rows."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_target in _segments(row, config, tokenizer):
        input_ids += ids
        labels += ids if (is_target or not config.mask_prompt) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def _label_count(labels: list[int]) -> int:
    """Labels the loss is taken on: the first token is never predicted (the loss shifts labels by one)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def _truncate(example: dict[str, list[int]], max_seq_len: int) -> dict[str, list[int]]:
    """The first max_seq_len tokens; raises BadRow when no label is left in them."""
    cut = {"input_ids": example["input_ids"][:max_seq_len], "labels": example["labels"][:max_seq_len]}
    if not _label_count(cut["labels"]):
        raise BadRow(f"prompt longer than max_seq_len={max_seq_len}")
    return cut


def _split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of round(n * eval_fraction) examples (at least 1, at most n - 1); both keep file order."""
    if eval_fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))])
    train = [example for i, example in enumerate(examples) if i not in held_out]
    return train, [example for i, example in enumerate(examples) if i in held_out]


def _packed_row(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Examples end to end, with position ids that restart at 0 for each. Each example's first label is masked:
    there it would be predicted from the previous example's last token, and alone nothing predicts it."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        row["position_ids"] += range(len(example["input_ids"]))
    return row


def pack(examples: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Whole examples (none longer than max_seq_len) in rows of at most max_seq_len tokens, best fit decreasing:
    longest first, each into the row it leaves the least room in, or a new row. No example is split or dropped;
    what a row leaves free is padded by `collate`. Rows carry position_ids that restart at every example, from
    which the model blocks attention across examples (engine/loss.py)."""
    rows: list[list[dict[str, list[int]]]] = []
    rooms: list[tuple[int, int]] = []  # (tokens free, row index), sorted: the best fit is the first with enough room
    for example in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):  # stable: ties keep order
        length = len(example["input_ids"])
        at = bisect.bisect_left(rooms, (length, -1))
        if at == len(rooms):
            rows.append([])
            room, index = max_seq_len, len(rows) - 1
        else:
            room, index = rooms.pop(at)
        rows[index].append(example)
        if room > length:
            bisect.insort(rooms, (room - length, index))
    return [_packed_row(row) for row in rows]


def truncation_warning(stats: DataStats, max_seq_len: int) -> Optional[str]:
    """A one-line warning when more than 5% of the usable rows did not fit max_seq_len, else None."""
    usable = stats.rows_read - stats.rows_bad
    cut = stats.rows_truncated + stats.rows_dropped
    if cut <= TRUNCATION_WARNING_SHARE * usable:
        return None
    if stats.rows_truncated:
        what = f"{stats.rows_truncated} truncated (a cut response loses its EOS too)"
        fix = "raise training.max_seq_len or set data.truncation: drop"
    else:
        what, fix = f"{stats.rows_dropped} dropped", "raise training.max_seq_len"
    lost = stats.label_tokens_lost / stats.label_tokens
    return (f"warning: {cut} of {usable} rows ({cut / usable:.1%}) are longer than training.max_seq_len="
            f"{max_seq_len}: {what}, {lost:.1%} of the label tokens lost; {fix}")


def prepare_data(config: DataConfig, tokenizer, max_seq_len: int, seed: int) -> TokenizedData:
    """Read, check, tokenize and split the data; bad rows are skipped and counted (or raise, on_bad_row=error),
    rows longer than max_seq_len are truncated or dropped (data.truncation) and counted."""
    if config.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format: chat needs a tokenizer with a chat template and this one has none; "
                        "use alpaca or text, or a tokenizer with a chat_template")
    if config.format != "chat" and tokenizer.eos_token_id is None:
        raise UserError(f"data.format: {config.format} ends each example with the tokenizer's EOS token and this "
                        "tokenizer has none; use a tokenizer with an eos_token")
    rows = _read_rows(config)
    examples, reasons = [], Counter()
    truncated = dropped = label_tokens = label_tokens_lost = 0
    for number, row in enumerate(rows, start=1):
        try:
            example = _tokenize_row(row, config, tokenizer)
            written_labels = _label_count(example["labels"])
            too_long = len(example["input_ids"]) > max_seq_len
            if too_long and config.truncation == "keep":
                example = _truncate(example, max_seq_len)
        except BadRow as bad:
            if config.on_bad_row == "error":
                raise UserError(f"data.path: row {number}: {bad} (data.on_bad_row: skip would skip it)") from None
            reasons[str(bad)] += 1
            continue
        label_tokens += written_labels
        if too_long and config.truncation == "drop":
            dropped += 1
            label_tokens_lost += written_labels
            continue
        truncated += too_long
        label_tokens_lost += written_labels - _label_count(example["labels"])
        examples.append(example)
    if not examples:
        counts = reasons + Counter({f"longer than max_seq_len={max_seq_len} (data.truncation: drop)": dropped})
        summary = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
        raise UserError(f"data.path: none of the {len(rows)} rows of {config.path} is usable ({summary})")
    train, held_out = _split_eval(examples, config.eval_fraction, seed)
    if config.packing:
        train = pack(train, max_seq_len)
    stats = DataStats(
        rows_read=len(rows),
        rows_bad=sum(reasons.values()),
        bad_reasons=dict(reasons),
        rows_truncated=truncated,
        rows_dropped=dropped,
        label_tokens=label_tokens,
        label_tokens_lost=label_tokens_lost,
        train_examples=len(train),
        train_tokens=sum(len(example["input_ids"]) for example in train),
        eval_examples=len(held_out),
    )
    return TokenizedData(train=train, eval=held_out, stats=stats)
