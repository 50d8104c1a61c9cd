"""Generate with one or several adapters switched on one loaded base."""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel

from qlora_trainer.export.merge import check_adapter_dir, load_for_inference


@dataclass(frozen=True)
class Generation:
    adapter: str  # adapter name, or "base" for the model without adapters
    text: str  # the generated continuation only


def generate(model_path: str, adapters: list[tuple[str, Path]], prompts: list[str], max_new_tokens: int,
             quant_mode: str = "nf4", include_base: bool = False) -> Iterator[Generation]:
    """Greedy continuations of each prompt under each adapter; adapters are switched on one loaded base."""
    for _, path in adapters:
        check_adapter_dir(path)
    base = load_for_inference(model_path, quant_mode)
    tokenizer = base.tokenizer
    model = base.model
    if adapters:
        first_name, first_path = adapters[0]
        model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
        for name, path in adapters[1:]:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()

    def run(name: str) -> Iterator[Generation]:
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(base.device)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            continuation = output[0, encoded["input_ids"].shape[1]:]
            yield Generation(name, tokenizer.decode(continuation, skip_special_tokens=True))

    if include_base or not adapters:
        if adapters:
            with model.disable_adapter():
                yield from run("base")
        else:
            yield from run("base")
    for name, _ in adapters:
        model.set_adapter(name)
        yield from run(name)
