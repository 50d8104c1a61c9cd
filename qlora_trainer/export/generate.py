"""Generate with one or several adapters, each put on and taken off one loaded base in turn."""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qlora_trainer.engine.adapters import load_adapter
from qlora_trainer.errors import UserError
from qlora_trainer.export.merge import check_adapter_dir, load_for_inference


@dataclass(frozen=True)
class Generation:
    adapter: str  # adapter name, or "base" for the model without adapters
    text: str  # the generated continuation only


def generate(model_path: str, adapters: list[tuple[str, Path]], prompts: list[str], max_new_tokens: int,
             quant_mode: str = "nf4", include_base: bool = False) -> Iterator[Generation]:
    """Greedy continuations of each prompt under each adapter (LoRA, LoHa and LoKr mixed freely), base first.

    Everything that can be refused is refused here, before the first continuation: the token count, prompts that
    encode to no tokens, adapter folders and adapters that do not fit the base.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: {max_new_tokens} generates nothing; use 1 or more")
    for _, path in adapters:
        check_adapter_dir(path)
    base = load_for_inference(model_path, quant_mode)
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        tokens = base.tokenizer(prompt, return_tensors="pt").to(base.device)
        if tokens["input_ids"].shape[1] == 0:  # generate() divides by the prompt length
            raise UserError(f"--prompt: prompt {number} ({prompt!r}) encodes to no tokens; give some text")
        encoded.append(tokens)
    for name, path in adapters:  # each is loaded again in its turn; this pass refuses a misfit before any output
        load_adapter(base.model, path, name).unload()
    return _generations(base, adapters, encoded, max_new_tokens, include_base)


def _generations(base, adapters: list[tuple[str, Path]], encoded: list, max_new_tokens: int,
                 include_base: bool) -> Iterator[Generation]:
    # One adapter on the base at a time: peft cannot hold adapters of different types in one PeftModel, and its
    # PeftMixedModel refuses 4- and 8-bit bases. unload() gives back the base exactly as it was.
    def run(name: str, model) -> Iterator[Generation]:
        for tokens in encoded:
            with torch.no_grad():
                output = model.generate(**tokens, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=base.tokenizer.pad_token_id)
            continuation = output[0, tokens["input_ids"].shape[1]:]
            yield Generation(name, base.tokenizer.decode(continuation, skip_special_tokens=True))

    if include_base or not adapters:
        yield from run("base", base.model)
    for name, path in adapters:
        adapted = load_adapter(base.model, path, name)
        try:
            yield from run(name, adapted)
        finally:
            adapted.unload()
