"""Random-weight checkpoints of full-size architectures, and synthetic text, for measuring with no model hub.

Memory and speed do not depend on the weights' values, so a model built from a config with random weights,
saved and loaded the way users load theirs, measures what the real checkpoint would.

    python -m qlora_trainer.bench.random_model --model llama-2-7b --out /tmp/random-llama-2-7b
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from qlora_trainer.planner.shapes import load_model_config

_WORDS = [f"w{i}" for i in range(4000)]


def synthetic_lines(n_lines: int, words_per_line: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words_per_line)) for _ in range(n_lines)]


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on the synthetic words (the vocabulary only needs to fit the model's)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(synthetic_lines(2000, 50), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(folder)


def make_random_checkpoint(model: str, out_dir: Path) -> Path:
    """Build `model` with random bf16 weights (on the GPU when there is one) and save it as safetensors."""
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    config = load_model_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        network = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out_dir)
    save_tokenizer(out_dir, config.vocab_size)
    del network
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def random_checkpoint_in_subprocess(model: str, out_dir: Optional[Path] = None) -> Path:
    """make_random_checkpoint in a process of its own, so the caller never holds a CUDA context beside the runs
    it measures. By default the checkpoint goes to (and is reused from) the temp folder."""
    out_dir = out_dir or Path(tempfile.gettempdir()) / f"random-{Path(model).name}"
    subprocess.run([sys.executable, "-m", "qlora_trainer.bench.random_model", "--model", model, "--out",
                    str(out_dir)], check=True)
    return out_dir


def write_synthetic_text(path: Path, n_docs: int, words_per_doc: int, min_words: Optional[int] = None) -> Path:
    """A JSONL file of `text` rows made of random words, enough to pack full rows of any length: each of
    `words_per_doc` words, or of min_words to words_per_doc words (seeded) so that packing fills its rows as real
    documents of many lengths do (documents of one length leave the same gap in every row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = random.Random(0)
    with open(path, "w") as handle:
        for line in synthetic_lines(n_docs, words_per_doc, seed=1):
            if min_words is not None:
                line = " ".join(line.split()[:lengths.randint(min_words, words_per_doc)])
            handle.write(json.dumps({"text": line}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="preset name (qlora_trainer/presets) or a folder with config.json")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    print(make_random_checkpoint(args.model, args.out))


if __name__ == "__main__":
    main()
