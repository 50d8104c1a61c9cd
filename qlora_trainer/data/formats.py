"""Row formats: one row of alpaca / chat / sharegpt / text data as (token ids, is_target) segments.

A format's fields are read from the file's columns that `data.columns` names (a field's own name by default).
Alpaca prompts come from `data.prompt_template`; chat and sharegpt conversations go through the tokenizer's chat
template, and only their assistant turns are targets. A row that cannot become an example raises `BadRow`, whose
message is the reason counted.
"""

from dataclasses import dataclass
from typing import Any

import jinja2

from qlora_trainer.errors import UserError
from qlora_trainer.spec import DataConfig

CHAT_ROLES = ("system", "user", "assistant")

# The Alpaca prompt (Taori et al. 2023), with and without an input field: data.prompt_template "alpaca".
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class BadRow(ValueError):
    """A row that cannot become a training example; the message is the reason counted in DataStats."""


@dataclass(frozen=True)
class ChatLayout:
    """How a format writes a conversation: the field holding its turns, each turn's keys, its names for roles."""

    field: str  # the format's field holding the list of turns (data.columns may name another column)
    role_key: str  # each turn's key naming who speaks
    text_key: str  # each turn's key holding the text
    roles: dict[str, str]  # the format's role names -> system / user / assistant


CHAT_LAYOUTS = {
    "chat": ChatLayout("messages", "role", "content", {role: role for role in CHAT_ROLES}),
    "sharegpt": ChatLayout("conversations", "from", "value", {"system": "system", "human": "user", "user": "user",
                                                              "gpt": "assistant", "assistant": "assistant"}),
}


def alpaca_prompt(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """The prompt part of an alpaca example (everything the model is not trained to produce): `template`
    (data.prompt_template) filled in; "alpaca" is the Alpaca prompt, its no-input form where input_text is empty."""
    if template == "alpaca":
        template = ALPACA_WITH_INPUT if input_text else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=input_text)


def check_tokenizer(data_format: str, tokenizer) -> None:
    """What the format needs of the tokenizer: a chat template for conversations, else an EOS token."""
    if data_format in CHAT_LAYOUTS and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data.format: {data_format} needs a tokenizer with a chat template and this one has none; "
                        "use alpaca or text, or a tokenizer with a chat_template")
    if data_format not in CHAT_LAYOUTS and tokenizer.eos_token_id is None:
        raise UserError(f"data.format: {data_format} ends each example with the tokenizer's EOS token and this "
                        "tokenizer has none; use a tokenizer with an eos_token")


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _encodable(value: str, what: str) -> str:
    """Text a tokenizer can take: JSON admits lone surrogates (\\ud800), which no UTF-8 tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"{what} holds a lone surrogate (not valid Unicode text)") from None
    return value


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


def _check_turns(turns: Any, layout: ChatLayout, column: str) -> list[dict[str, Any]]:
    """A conversation as chat messages (role / content): an optional system turn, then user/assistant turns
    alternating, ending with assistant."""
    if turns is None:
        raise BadRow(f"missing field '{column}'")
    if not isinstance(turns, list):
        raise BadRow(f"field '{column}' is not a list")
    if not turns:
        raise BadRow(f"empty field '{column}'")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(layout.text_key), str):
            raise BadRow(f"message without text '{layout.text_key}'")
        text = turn[layout.text_key]
        if not text.strip():
            raise BadRow(f"message with empty '{layout.text_key}'")
        _encodable(text, f"message '{layout.text_key}'")
        role = turn.get(layout.role_key)
        if not isinstance(role, str) or role not in layout.roles:
            raise BadRow(f"unknown role {role!r}")
        messages.append({**turn, "role": layout.roles[role], "content": text})  # a chat turn's other keys kept
    roles = [message["role"] for message in messages]
    after_system = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user" if index % 2 == 0 else "assistant") for index, role in enumerate(after_system)):
        raise BadRow("roles out of order (want system?, then user/assistant alternating)")
    if not after_system or after_system[-1] != "assistant":
        raise BadRow("conversation does not end with an assistant turn")
    return messages


def _template_ids(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))
    except jinja2.TemplateError as err:  # templates reject conversations with raise_exception(...)
        raise BadRow(f"chat template error: {first_line(err)}") from None


def _chat_segments(messages: list[dict[str, Any]], tokenizer) -> list[tuple[list[int], bool]]:
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


def _alpaca_segments(row: dict, config: DataConfig, tokenizer) -> list[tuple[list[int], bool]]:
    instruction = _text_field(row, config.column("instruction"))
    input_text = _text_field(row, config.column("input"), required=False)
    output = _text_field(row, config.column("output"))
    if input_text and "input" not in config.prompt_fields():
        raise BadRow(f"field '{config.column('input')}' has text but data.prompt_template has no {{input}}")
    prompt_ids = tokenizer(alpaca_prompt(instruction, input_text, config.prompt_template),
                           add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return [(prompt_ids, False), (tokenizer(output, add_special_tokens=False)["input_ids"] + eos, True)]


def row_segments(row: Any, config: DataConfig, tokenizer) -> list[tuple[list[int], bool]]:
    """(token ids, is_target) pieces of one row in its format; raises BadRow for unusable rows."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    if config.format in CHAT_LAYOUTS:
        layout = CHAT_LAYOUTS[config.format]
        column = config.column(layout.field)
        return _chat_segments(_check_turns(row.get(column), layout, column), tokenizer)
    if config.format == "alpaca":
        return _alpaca_segments(row, config, tokenizer)
    text = _text_field(row, config.column("text"))
    return [(tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id], True)]
