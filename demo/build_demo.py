"""Build the bundled demo: a tiny Llama, a tokenizer trained on the demo text, and data.

    python demo/build_demo.py        # rewrites demo/tiny-llama/ and demo/data/ (deterministic, ~2 MB)

The model is small enough to fine-tune on a CPU in well under a minute with a real NF4 base. It is briefly
pre-trained here on the tasks written as plain sentences, so that it is a (very) small language model rather
than random weights: an adapter on a random base can only learn the answers' frequencies, while on this one
the demo's loss falls clearly as the adapter learns the alpaca format. The data are a few learnable synthetic
tasks in alpaca, chat and plain-text form.
"""

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO.parent))
from qlora_trainer.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT  # noqa: E402

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
            "Greece": "Athens", "Cuba": "Havana", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna"}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "lemon", "piano", "candle", "forest", "rocket",
         "garden", "silver", "window", "planet", "bridge", "pencil", "yellow", "winter", "summer"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) from a few tasks a tiny model can learn."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        phrasing = rng.choice(["Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}."])
        return phrasing.format(a=a, b=b), "", str(a + b)
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        phrasing = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}."])
        return phrasing.format(c=country), "", CAPITALS[country]
    if kind == 2:
        words = rng.sample(WORDS, 3)
        return rng.choice(["Reverse the order of these words.", "Write these words backwards in order."]), \
            " ".join(words), " ".join(reversed(words))
    word = rng.choice(WORDS)
    return rng.choice(["Write this word in capital letters.", "Uppercase the word."]), word, word.upper()


def build_data(rng: random.Random) -> dict[str, list[dict]]:
    alpaca = [dict(zip(("instruction", "input", "output"), task(rng))) for _ in range(400)]
    chat = []
    for _ in range(100):
        instruction, input_text, output = task(rng)
        user = f"{instruction}\n{input_text}".strip()
        chat.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": user}, {"role": "assistant", "content": output}]})
    text = [{"text": f"{i} {o}".strip() + ". " + f"{task(rng)[0]}"} for i, _, o in (task(rng) for _ in range(100))]
    return {"alpaca-tiny.jsonl": alpaca, "chat-tiny.jsonl": chat, "text-tiny.jsonl": text}


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pretrain(model: LlamaForCausalLM, tokenizer, rng: random.Random, steps: int = 400) -> LlamaForCausalLM:
    """A short full-parameter pre-training on the tasks as plain sentences (not the alpaca prompt)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        lines = [f"{i} {x} = {o}".replace("  ", " ") + tokenizer.eos_token for i, x, o in (task(rng) for _ in range(32))]
        batch = tokenizer(lines, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pre-training step {step}: loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    rng = random.Random(0)
    data = build_data(rng)
    (DEMO / "data").mkdir(exist_ok=True)
    for name, rows in data.items():
        (DEMO / "data" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 50 + [json.dumps(row) for rows in data.values() for row in rows]
    corpus += [" ".join(row.values()) for row in data["alpaca-tiny.jsonl"]]
    tokenizer = build_tokenizer(corpus)
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
