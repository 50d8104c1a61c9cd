"""Generate with one or several adapters, each put on and taken off one loaded base in turn, each prompt written in
the format its adapter was trained on.

`train` saves that format beside the final adapter's weights (qlora_trainer_prompt.json, from `prompt_format`): the
data format, the alpaca prompt templates as filled in, the chat template and a system prompt. `generate` and `chat`
rebuild each prompt as training built it (`build_prompt`): an alpaca instruction goes into the saved template, a
chat or sharegpt message becomes a user turn through the saved chat template. An adapter without the file (an older
run, another tool's adapter), a text-format adapter, the base alone and `raw=True` get the prompt as given.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import jinja2
import torch
from transformers import TextStreamer

from qlora_trainer.data.formats import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, CHAT_LAYOUTS, BadRow, _check_turns,
                                        first_line)
from qlora_trainer.engine.adapters import load_adapter
from qlora_trainer.errors import UserError
from qlora_trainer.export.merge import check_adapter_dir, load_for_inference
from qlora_trainer.spec import DataConfig

PROMPT_FILE = "qlora_trainer_prompt.json"  # beside the final adapter's weights
PROMPT_FILE_VERSION = 1
FORMATS = ("alpaca", "chat", "sharegpt", "text")


@dataclass(frozen=True)
class Generation:
    adapter: str  # adapter name, or "base" for the model without adapters
    text: str  # the generated continuation only
    prompt: str = ""  # the prompt text the model was given (the --prompt as its adapter's format writes it)
    streamed: bool = False  # already printed to stdout as it was generated


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn: greedy at temperature 0, else sampled (top-p, no top-k cut), seeded."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: {self.max_new_tokens} generates nothing; use 1 or more")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature: {self.temperature:g} is not allowed; use 0 (greedy, the default) or a "
                            "positive number such as 0.7")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"--top-p: {self.top_p:g} is not allowed; use a number above 0 and at most 1 "
                            "(1, the default, keeps every token)")
        if not 0 <= self.seed < 2 ** 63:
            raise UserError(f"--seed: {self.seed} is not allowed; use a whole number from 0 to 2**63 - 1")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        # top_k 0: no top-k cut from the model's generation_config (transformers defaults to 50), only --top-p
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


# --- the prompt format: saved by train, read by generate ------------------------------------------------------

def prompt_format(data: DataConfig, tokenizer) -> dict:
    """What qlora_trainer_prompt.json holds for a run on `data` with `tokenizer`: everything `build_prompt` needs to
    write a prompt as training wrote it, the templates resolved to their text so that a later change of defaults
    does not change what an adapter is given.

    system_prompt is the system turn every usable conversation of the data begins with (none where they differ or
    some have none): the data are read once more for it (chat and sharegpt only), and where they cannot be, a
    warning says so and there is none. Nothing else here can fail for a run that trained."""
    saved = {"version": PROMPT_FILE_VERSION, "format": data.format, "prompt_template": None, "system_prompt": None,
             "chat_template_applied": False, "chat_template": None}
    if data.format == "alpaca":
        if data.prompt_template == "alpaca":
            saved["prompt_template"] = {"name": "alpaca", "no_input": ALPACA_NO_INPUT, "with_input": ALPACA_WITH_INPUT}
        else:  # one template for every row; {input} is "" where a row has none, and a template without it takes none
            template = data.prompt_template
            saved["prompt_template"] = {"name": "custom", "no_input": template,
                                        "with_input": template if "input" in data.prompt_fields() else None}
    elif data.format in CHAT_LAYOUTS:
        saved["chat_template_applied"] = True
        saved["chat_template"] = tokenizer.get_chat_template()
        saved["system_prompt"] = _shared_system_prompt(data)
    return saved


def _shared_system_prompt(data: DataConfig) -> Optional[str]:
    from qlora_trainer.data.prepare import _read_rows  # the reader training used, with its one-line errors

    layout = CHAT_LAYOUTS[data.format]
    column = data.column(layout.field)
    seen: set[Optional[str]] = set()
    for source in data.sources():
        try:
            rows = _read_rows(source.path, data.split)
        except UserError as err:  # moved or deleted since training read it: the format is saved without it
            print(f"warning: {PROMPT_FILE}: no system prompt saved, as the data cannot be read again ({err})",
                  file=sys.stderr)
            return None
        for row in rows:
            if not isinstance(row, dict):
                continue
            try:
                messages = _check_turns(row.get(column), layout, column)
            except BadRow:  # skipped by training as well
                continue
            seen.add(messages[0]["content"] if messages[0]["role"] == "system" else None)
            if len(seen) > 1:
                return None
    return seen.pop() if seen else None


@dataclass(frozen=True)
class PromptFormat:
    """A saved prompt format as generate uses it; None stands for "the prompt as given"."""

    format: str  # alpaca, chat, sharegpt or text
    no_input: Optional[str] = None  # alpaca: the template for an instruction alone
    with_input: Optional[str] = None  # alpaca: the template with an {input}; None where the template has none
    system_prompt: Optional[str] = None  # chat / sharegpt: the system turn put before the conversation
    chat_template: Optional[str] = None  # chat / sharegpt: the chat template training applied

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None


def read_prompt_format(adapter_dir: Path) -> Optional[PromptFormat]:
    """The adapter's saved prompt format; None for an adapter without one (older runs, other tools' adapters)."""
    path = adapter_dir / PROMPT_FILE
    if not path.is_file():
        return None
    fix = "restore it, or pass --raw to send prompts as given"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--adapter: cannot read {path} ({first_line(err)}); {fix}") from None
    try:
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
        if not isinstance(saved.get("version"), int) or saved["version"] > PROMPT_FILE_VERSION:
            raise ValueError(f"version {saved.get('version')!r}; this qlora-trainer reads {PROMPT_FILE_VERSION}")
        data_format = saved.get("format")
        if data_format not in FORMATS:
            raise ValueError(f"unknown format {data_format!r}")
        if data_format == "alpaca":
            template = saved.get("prompt_template")
            if not (isinstance(template, dict) and isinstance(template.get("no_input"), str)
                    and isinstance(template.get("with_input"), (str, type(None)))):
                raise ValueError("alpaca without prompt_template.no_input / with_input")
            for filled in (template["no_input"], template["with_input"] or ""):
                try:
                    filled.format(instruction="", input="")
                except (KeyError, IndexError, ValueError) as err:
                    raise ValueError(f"a prompt template it cannot fill in: {err!r}") from None
            return PromptFormat("alpaca", no_input=template["no_input"], with_input=template["with_input"])
        if data_format in CHAT_LAYOUTS:
            if not isinstance(saved.get("chat_template"), str):
                raise ValueError(f"{data_format} without a chat_template")
            if not isinstance(saved.get("system_prompt"), (str, type(None))):
                raise ValueError("system_prompt is not text")
            return PromptFormat(data_format, system_prompt=saved["system_prompt"],
                                chat_template=saved["chat_template"])
        return PromptFormat(data_format)
    except ValueError as err:
        raise UserError(f"--adapter: {path} is not a prompt format qlora-trainer wrote ({err}); {fix}") from None


def build_prompt(fmt: Optional[PromptFormat], tokenizer, text: str, input_text: str = "",
                 history: Sequence[dict] = ()) -> tuple[str, list[int]]:
    """(prompt text, token ids) of `text` as training wrote a prompt in `fmt`, tokenized as training tokenized it:
    an alpaca instruction (with `input_text` for {input}) in the template, or a chat/sharegpt user message after the
    system prompt and `history` (earlier user/assistant turns) through the chat template, with the generation
    prompt. The text format and no format: `text` as given."""
    if fmt is not None and fmt.format == "alpaca":
        template = fmt.with_input if input_text else fmt.no_input
        prompt = template.format(instruction=text, input=input_text)
        return prompt, tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if fmt is not None and fmt.is_chat:
        messages = ([{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []) + \
            list(history) + [{"role": "user", "content": text}]
        try:
            prompt = tokenizer.apply_chat_template(messages, chat_template=fmt.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer.apply_chat_template(messages, chat_template=fmt.chat_template, tokenize=True,
                                                return_dict=False, add_generation_prompt=True)
        except jinja2.TemplateError as err:  # templates reject conversations with raise_exception(...)
            raise UserError(f"--prompt: the adapter's chat template refuses this conversation ({first_line(err)}); "
                            "pass --raw to send the prompt as given") from None
        return prompt, list(ids)
    return text, tokenizer(text)["input_ids"]


def _formats(adapters: list[tuple[str, Path]], with_base: bool, raw: bool,
             input_text: Optional[str]) -> list[tuple[str, Optional[PromptFormat]]]:
    """(model name, prompt format) of each model to run, the base first where it runs (with the first adapter's
    format); an --input every one of them can place, or a one-line refusal."""
    formats = [(name, None if raw else read_prompt_format(path)) for name, path in adapters]
    checked = [(f"adapter {name}", fmt) for name, fmt in formats] or [("the base alone", None)]
    if with_base or not adapters:
        formats.insert(0, ("base", formats[0][1] if formats else None))
    if input_text is None:
        return formats
    if raw:
        raise UserError("--input: --raw sends each prompt as given, with no template to put an input in; put the "
                        "text in --prompt or drop --raw")
    for what, fmt in checked:
        if fmt is None or fmt.format != "alpaca":
            trained = ("has no saved prompt format (prompts go as given)" if fmt is None
                       else f"was trained on {fmt.format} data")
            raise UserError(f"--input: {what} {trained}; --input fills the {{input}} of an alpaca prompt, so put the "
                            "text in --prompt")
        if fmt.with_input is None:
            raise UserError(f"--input: {what} was trained with a data.prompt_template without {{input}}; put the "
                            "text in --prompt")
    return formats


def _encode(base, prompt: str, number: int, fmt: Optional[PromptFormat], input_text: Optional[str],
            history: Sequence[dict] = ()) -> tuple[str, dict]:
    text, ids = build_prompt(fmt, base.tokenizer, prompt, input_text or "", history)
    if not ids:  # generate() divides by the prompt length
        raise UserError(f"--prompt: prompt {number} ({prompt!r}) encodes to no tokens; give some text")
    input_ids = torch.tensor([ids], device=base.device)
    return text, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _continue(base, model, tokens: dict, sampling: Sampling, stream_header: Optional[str]) -> str:
    """One continuation of `tokens`, seeded afresh: the same seed gives the same text whatever ran before. With a
    stream_header, the text is printed to stdout after it as it comes."""
    streamer = None
    if stream_header is not None:
        print(stream_header, end="", flush=True)
        streamer = TextStreamer(base.tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        output = model.generate(**tokens, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
                                pad_token_id=base.tokenizer.pad_token_id, **sampling.generate_kwargs())
    return base.tokenizer.decode(output[0, tokens["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(model_path: str, adapters: list[tuple[str, Path]], prompts: list[str], max_new_tokens: int,
             quant_mode: str = "nf4", include_base: bool = False, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, raw: bool = False, input_text: Optional[str] = None,
             stream: bool = False) -> Iterator[Generation]:
    """Continuations of each prompt under each adapter (LoRA, LoHa and LoKr mixed freely), base first, each prompt
    written in its adapter's saved format (the base: the first adapter's) unless `raw`; greedy at temperature 0,
    else sampled with top_p from `seed`. With `stream`, each continuation is printed as it is generated, after
    "[name] ".

    Everything that can be refused is refused here, before the first continuation: the sampling settings, adapter
    folders and their prompt formats, an input_text a format cannot place, prompts that encode to no tokens, and
    adapters that do not fit the base.
    """
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    for _, path in adapters:
        check_adapter_dir(path)
    formats = _formats(adapters, include_base, raw, input_text)
    base = load_for_inference(model_path, quant_mode)
    # each model's prompts (the base's first where it runs), encoded in its format
    encoded = [[_encode(base, prompt, number, fmt, input_text) for number, prompt in enumerate(prompts, 1)]
               for _, fmt in formats]
    for name, path in adapters:  # each is loaded again in its turn; this pass refuses a misfit before any output
        load_adapter(base.model, path, name).unload()
    return _generations(base, adapters, encoded, sampling, stream)


def _generations(base, adapters: list[tuple[str, Path]], encoded: list[list[tuple[str, dict]]],
                 sampling: Sampling, stream: bool) -> Iterator[Generation]:
    # One adapter on the base at a time: peft cannot hold adapters of different types in one PeftModel, and its
    # PeftMixedModel refuses 4- and 8-bit bases. unload() gives back the base exactly as it was.
    def run(name: str, model, prompts: list[tuple[str, dict]]) -> Iterator[Generation]:
        for prompt, tokens in prompts:
            text = _continue(base, model, tokens, sampling, f"[{name}] " if stream else None)
            yield Generation(name, text, prompt, stream)

    if len(encoded) > len(adapters):
        yield from run("base", base.model, encoded[0])
    for (name, path), prompts in zip(adapters, encoded[len(encoded) - len(adapters):]):
        adapted = load_adapter(base.model, path, name)
        try:
            yield from run(name, adapted, prompts)
        finally:
            adapted.unload()


def chat(model_path: str, adapter: Optional[tuple[str, Path]], lines: Iterable[str], max_new_tokens: int,
         quant_mode: str = "nf4", *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, raw: bool = False,
         input_text: Optional[str] = None, stream: bool = False) -> Iterator[Generation]:
    """A conversation with one adapter (or the base alone): each of `lines`, until an empty one, is a message and
    gets a reply. A chat or sharegpt adapter sees the whole conversation through its chat template; an alpaca
    adapter (and one without a saved format, or with `raw`) takes each line afresh. With `stream`, each reply is
    printed as it is generated. Refusals come before the base loads, as in `generate`."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    adapters = [adapter] if adapter else []
    for _, path in adapters:
        check_adapter_dir(path)
    [(name, fmt)] = _formats(adapters, False, raw, input_text)
    if fmt is not None and fmt.format == "alpaca":
        print(f"note: {name} was trained on alpaca data: each line is a fresh instruction, with no memory of "
              "earlier ones", file=sys.stderr)
    elif fmt is None or not fmt.is_chat:
        print(f"note: {name}: each line goes to the model as given, with no memory of earlier ones", file=sys.stderr)
    base = load_for_inference(model_path, quant_mode)
    model = load_adapter(base.model, adapter[1], name) if adapter else base.model
    return _conversation(base, model, name, fmt, lines, sampling, input_text, stream)


def _conversation(base, model, name: str, fmt: Optional[PromptFormat], lines: Iterable[str], sampling: Sampling,
                  input_text: Optional[str], stream: bool) -> Iterator[Generation]:
    history: list[dict] = []
    try:
        for number, line in enumerate(lines, 1):
            message = line.rstrip("\r\n")
            if not message.strip():
                return
            prompt, tokens = _encode(base, message, number, fmt, input_text, history)
            reply = _continue(base, model, tokens, sampling, "" if stream else None)
            if fmt is not None and fmt.is_chat:
                history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply.strip()}]
            yield Generation(name, reply, prompt, stream)
    finally:
        if model is not base.model:
            model.unload()


def stdin_messages() -> Iterator[str]:
    """stdin's lines as they come, for `chat`; on a terminal each is asked for with "> " on stderr."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message and press Enter; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line
