"""Build the bundled demo: a tiny Llama, a tokenizer trained on the demo text, and instruction data.

    python demo/build_demo.py        # rewrites demo/tiny-llama/ and demo/data/ (deterministic, ~2 MB, ~1 min)

The data are a few learnable synthetic tasks (add two numbers, name a capital, reverse words, uppercase a word)
in alpaca, chat and plain-text form. The model is small enough to fine-tune on a CPU in seconds with a real NF4
base. It is briefly pre-trained here on the tasks written as plain text ("instruction input" on one line, the
answer on the next), so that it is a (very) small language model rather than random weights: an adapter on a
random base only learns how often each answer occurs, while on this one it learns to read the alpaca prompt and
the demo's loss falls from about 3.5 to below 1 in 60 steps. The answer starts a line, as it does after the alpaca
"### Response:" line, so that it is the same token in both forms (byte-level BPE tells "Paris" from " Paris").
"""

import json
import random
import sys
from pathlib import Path

import jinja2
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO.parent))
from qlora_trainer.data import alpaca_prompt  # noqa: E402

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
            "Greece": "Athens", "Cuba": "Havana", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna"}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "lemon", "piano", "candle", "forest", "rocket",
         "garden", "silver", "window", "planet", "bridge", "pencil", "yellow", "winter", "summer"]
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
VOCAB_SIZE = 1024
PRETRAIN_STEPS = 1000


def task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) from a few tasks a tiny model can learn."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        phrasing = rng.choice(["Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}.",
                               "What is the sum of {a} and {b}?"])
        return phrasing.format(a=a, b=b), "", str(a + b)
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        phrasing = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.",
                               "Which city is the capital of {c}?"])
        return phrasing.format(c=country), "", CAPITALS[country]
    if kind == 2:
        words = rng.sample(WORDS, 3)
        instruction = rng.choice(["Reverse the order of these words.", "Write these words backwards in order.",
                                  "List these words from last to first."])
        return instruction, " ".join(words), " ".join(reversed(words))
    word = rng.choice(WORDS)
    instruction = rng.choice(["Write this word in capital letters.", "Uppercase the word.",
                              "Spell this word in upper case."])
    return instruction, word, word.upper()


def plain_text(instruction: str, input_text: str, output: str) -> str:
    """A task as plain text: what the base is pre-trained on and what the text-format demo holds."""
    return f"{instruction} {input_text}".strip() + "\n" + output


def build_data(rng: random.Random) -> dict[str, list[dict]]:
    alpaca = [dict(zip(("instruction", "input", "output"), task(rng))) for _ in range(400)]
    chat = []
    for _ in range(100):
        instruction, input_text, output = task(rng)
        chat.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": f"{instruction}\n{input_text}".strip()},
                                  {"role": "assistant", "content": output}]})
    text = [{"text": plain_text(*task(rng))} for _ in range(100)]
    return {"alpaca-tiny.jsonl": alpaca, "chat-tiny.jsonl": chat, "text-tiny.jsonl": text}


def tokenizer_corpus(data: dict[str, list[dict]]) -> list[str]:
    """The demo's examples as the trainer renders them, so that the tokenizer splits them into few tokens."""
    eos = SPECIAL_TOKENS["eos_token"]
    chat_template = jinja2.Template(CHAT_TEMPLATE)
    corpus = [alpaca_prompt(row["instruction"], row["input"]) + row["output"] for row in data["alpaca-tiny.jsonl"]]
    corpus += [chat_template.render(messages=row["messages"], eos_token=eos) for row in data["chat-tiny.jsonl"]]
    corpus += [row["text"] for row in data["text-tiny.jsonl"]]
    return corpus


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknown bytes) saved as a transformers fast tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1024, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pretrain(model: LlamaForCausalLM, tokenizer, rng: random.Random) -> LlamaForCausalLM:
    """A short full-parameter pre-training on the tasks as plain text (never in the alpaca or chat format)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Cosine decay to 0 settles the weights: the base then answers every task in its plain-text form.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, PRETRAIN_STEPS)
    model.train()
    for step in range(PRETRAIN_STEPS):
        lines = [plain_text(*task(rng)) + tokenizer.eos_token for _ in range(32)]
        batch = tokenizer(lines, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 200 == 0 or step == PRETRAIN_STEPS - 1:
            print(f"pre-training step {step}: loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    data = build_data(random.Random(0))
    (DEMO / "data").mkdir(exist_ok=True)
    for name, rows in data.items():
        (DEMO / "data" / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenizer = build_tokenizer(tokenizer_corpus(data))
    # Dimensions are multiples of 64 so that every weight splits into whole NF4 blocks of 64.
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = pretrain(LlamaForCausalLM(config), tokenizer, random.Random(1)).to(torch.bfloat16)
    out = DEMO / "tiny-llama"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {sum(p.numel() for p in model.parameters()):,} params) and demo/data/")


if __name__ == "__main__":
    main()
