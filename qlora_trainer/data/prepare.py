"""Training examples: read files or data sets, format rows (formats.py), mask prompts, mix files, pack.

`prepare_data` turns `data.*` of the run specification into token ids and labels: it reads each file of
data.path, formats and tokenizes each row (a malformed row is skipped and counted, or raises with its row number),
masks the prompt with -100, truncates a row longer than `max_seq_len` or drops it (data.truncation, counted either
way), holds out a seeded eval split of each file, mixes the files' train examples by weight (sampling.py) and packs
them if asked.
"""

import bisect
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets

from qlora_trainer.data.formats import BadRow, check_tokenizer, first_line, row_segments
from qlora_trainer.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca_prompt  # noqa: F401 (still here)
from qlora_trainer.data.sampling import mix
from qlora_trainer.errors import UserError
from qlora_trainer.spec import DataConfig
from qlora_trainer.spec.sections import DataSource
from qlora_trainer.hub import require_hub

IGNORE_INDEX = -100
TRUNCATION_WARNING_SHARE = 0.05  # more rows than this share cut or dropped for length: say so before training
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataStats:
    rows_read: int  # rows in the sources
    rows_bad: int  # rows skipped as malformed, or (data.truncation: keep) with a prompt that fills max_seq_len
    bad_reasons: dict[str, int]  # reason -> count, e.g. {"missing field 'output'": 3}
    rows_prompt_too_long: int  # of rows_bad: prompt alone at least max_seq_len (truncation: keep), lost for length
    rows_truncated: int  # usable rows longer than max_seq_len, cut to it (data.truncation: keep)
    rows_dropped: int  # usable rows longer than max_seq_len, skipped (data.truncation: drop)
    label_tokens: int  # label tokens of the rows lost for length or kept, before any cut, as the loss counts them
    label_tokens_lost: int  # of those, how many truncation cut off or lost with their row
    train_examples: int  # examples (or packed rows) in the train split, after mixing the files
    train_tokens: int  # tokens of the train split, padding excluded (packing keeps them all)
    eval_examples: int  # examples in the eval split (never packed, never mixed)


@dataclass(frozen=True)
class TokenizedData:
    train: list[dict[str, list[int]]]  # {"input_ids": [...], "labels": [...]}, labels -100 where masked
    eval: list[dict[str, list[int]]]
    stats: DataStats


@dataclass
class _Tally:
    """One source's usable examples and what reading it counted."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    rows_read: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    prompt_too_long: int = 0
    truncated: int = 0
    dropped: int = 0
    label_tokens: int = 0
    label_tokens_lost: int = 0


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
        raise UserError(f"data.path: cannot read {path} as {path.suffix}: {first_line(err)}") from None
    return loaded.to_list()


def _read_saved(path: Path, split: str) -> list[Any]:
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError:
        raise UserError(f"data.path: {path} is a folder but not a data set written by save_to_disk; give such a "
                        f"folder or a {', '.join(EXTENSIONS)} file") from None
    except Exception as err:
        raise UserError(f"data.path: cannot read the data set in {path}: {first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"data.split: {split!r} is not in {path}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(name: str, split: str) -> list[Any]:
    require_hub("data.path", name)
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, gated, missing split: all end here
        raise UserError(f"data.path: {name} is neither a local file nor a reachable data set "
                        f"({first_line(err)})") from None
    return loaded.to_list()


def _read_rows(source: str, split: str) -> list[Any]:
    """Rows of one source as plain values (dicts when well formed), with one-line errors for unusable sources."""
    datasets.disable_progress_bars()
    path = Path(source)
    if path.is_file():
        rows = _read_file(path)
    elif path.is_dir():
        rows = _read_saved(path, split)
    elif path.suffix or path.is_absolute() or source.startswith("."):
        raise UserError(f"data.path: {source} does not exist; give a {', '.join(EXTENSIONS)} file, a "
                        "save_to_disk folder or a hub data set name")
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise UserError(f"data.path: {source} holds no rows")
    return rows


def _tokenize_row(row: Any, config: DataConfig, tokenizer) -> dict[str, list[int]]:
    """One example with labels, whole (not yet fitted to max_seq_len); raises BadRow for unusable rows."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_target in row_segments(row, config, tokenizer):
        input_ids += ids
        labels += ids if (is_target or not config.mask_prompt) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def _label_count(labels: list[int]) -> int:
    """Labels the loss is taken on: the first token is never predicted (the loss shifts labels by one)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def _skip(bad: BadRow, number: int, where: str, config: DataConfig, tally: _Tally) -> None:
    """Count a bad row by its reason, or stop with its row number (data.on_bad_row: error)."""
    if config.on_bad_row == "error":
        raise UserError(f"data.path: {where}row {number}: {bad} (data.on_bad_row: skip would skip it)") from None
    tally.bad_reasons[str(bad)] += 1


def _tokenize_source(source: DataSource, config: DataConfig, tokenizer, max_seq_len: int, where: str) -> _Tally:
    """The usable examples of one source, each fitted to max_seq_len (data.truncation), and what was counted.
    `where` names the source in a row's error where there are several."""
    rows = _read_rows(source.path, config.split)
    tally = _Tally(rows_read=len(rows))
    for number, row in enumerate(rows, start=1):
        try:
            example = _tokenize_row(row, config, tokenizer)
        except BadRow as bad:
            _skip(bad, number, where, config, tally)
            continue
        written_labels = _label_count(example["labels"])
        tally.label_tokens += written_labels
        if len(example["input_ids"]) <= max_seq_len:
            tally.examples.append(example)
            continue
        if config.truncation == "drop":
            tally.dropped += 1
            tally.label_tokens_lost += written_labels
            continue
        example = {"input_ids": example["input_ids"][:max_seq_len], "labels": example["labels"][:max_seq_len]}
        tally.label_tokens_lost += written_labels - _label_count(example["labels"])
        if not _label_count(example["labels"]):  # the prompt alone fills max_seq_len: nothing left to learn
            tally.prompt_too_long += 1
            _skip(BadRow(f"prompt longer than max_seq_len={max_seq_len}"), number, where, config, tally)
            continue
        tally.truncated += 1
        tally.examples.append(example)
    if not tally.examples:
        counts = tally.bad_reasons + Counter({f"longer than max_seq_len={max_seq_len} (data.truncation: drop)":
                                              tally.dropped})
        summary = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
        raise UserError(f"data.path: none of the {len(rows)} rows of {source.path} is usable ({summary})")
    return tally


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
    """A one-line warning when more than 5% of the rows not malformed lost tokens to max_seq_len, else None: cut,
    dropped, or (data.truncation: keep) skipped as their prompt alone fills it, a long data.prompt_template's."""
    usable = stats.rows_read - stats.rows_bad + stats.rows_prompt_too_long
    cut = stats.rows_truncated + stats.rows_dropped + stats.rows_prompt_too_long
    if cut <= TRUNCATION_WARNING_SHARE * usable:
        return None
    what = [f"{stats.rows_truncated} truncated (a cut response loses its EOS too)"] if stats.rows_truncated else []
    if stats.rows_prompt_too_long:
        what.append(f"{stats.rows_prompt_too_long} skipped (the prompt alone is that long)")
    if stats.rows_dropped:
        what.append(f"{stats.rows_dropped} dropped")
    fix = "raise training.max_seq_len" + (" or set data.truncation: drop" if stats.rows_truncated else "")
    lost = stats.label_tokens_lost / stats.label_tokens
    return (f"warning: {cut} of {usable} rows ({cut / usable:.1%}) are longer than training.max_seq_len="
            f"{max_seq_len}: {', '.join(what)}, {lost:.1%} of the label tokens lost; {fix}")


def _stats(tallies: list[_Tally], train: list[dict[str, list[int]]], held_out: list) -> DataStats:
    reasons = sum((tally.bad_reasons for tally in tallies), Counter())
    return DataStats(
        rows_read=sum(tally.rows_read for tally in tallies),
        rows_bad=sum(reasons.values()),
        bad_reasons=dict(reasons),
        rows_prompt_too_long=sum(tally.prompt_too_long for tally in tallies),
        rows_truncated=sum(tally.truncated for tally in tallies),
        rows_dropped=sum(tally.dropped for tally in tallies),
        label_tokens=sum(tally.label_tokens for tally in tallies),
        label_tokens_lost=sum(tally.label_tokens_lost for tally in tallies),
        train_examples=len(train),
        train_tokens=sum(len(example["input_ids"]) for example in train),
        eval_examples=len(held_out),
    )


def prepare_data(config: DataConfig, tokenizer, max_seq_len: int, seed: int) -> TokenizedData:
    """Read, check, tokenize, split and mix the data; bad rows are skipped and counted (or raise, on_bad_row=error),
    rows longer than max_seq_len are truncated or dropped (data.truncation) and counted. Each source's eval
    examples are held out before the mix (with seed + its index), so no repeat of a train example is evaluated."""
    check_tokenizer(config.format, tokenizer)
    sources = config.sources()
    tallies = [_tokenize_source(source, config, tokenizer, max_seq_len, f"{source.path} " if len(sources) > 1 else "")
               for source in sources]
    splits = [_split_eval(tally.examples, config.eval_fraction, seed + index) for index, tally in enumerate(tallies)]
    train = mix([train for train, _ in splits], [source.weight for source in sources], seed)
    held_out = [example for _, held in splits for example in held]
    if config.packing:
        train = pack(train, max_seq_len)
    return TokenizedData(train=train, eval=held_out, stats=_stats(tallies, train, held_out))
