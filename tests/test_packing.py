"""Packed rows compute what their examples compute alone: the tiny Llama in real NF4 on the CPU, tiny models of the
other preset families, and the planner's count of the mask that keeps the examples apart.

Tolerances follow from the compute precision. A packed example and the same example alone run the same arithmetic
on tensors of other shapes, so only the reduction order inside matmuls and softmax differs. In fp32 that is a few
ulps (1.2e-7 relative) per op; measured at most 2.4e-7 on logits below 1, allowed 1e-5, four orders of magnitude
under what one example moved another's logits by before (0.7 here, 12.3 in issue 13). In bf16 (8 significant
bits) every op rounds its output and another order can flip a rounding: measured 1 ulp, allowed 4 ulps of the
largest logit. An example whose row-mates change is compared exactly: the attention weights it gets from them are
exact zeros, and the shapes, hence the kernels and their order, stay the same.
"""

import math

import pytest
import torch
from conftest import tiny_base
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config)

from qlora_trainer.data.batches import collate
from qlora_trainer.data.prepare import IGNORE_INDEX, pack
from qlora_trainer.engine import packed_attention
from qlora_trainer.engine.loss import causal_lm_loss, model_inputs
from qlora_trainer.hardware import Hardware, lookup_gpu
from qlora_trainer.planner.memory import estimate_memory
from qlora_trainer.planner.shapes import load_model_config
from qlora_trainer.spec import RunSpec, resolve
from qlora_trainer.spec.resolve import PACKED_VARLEN

FP32_ATOL = 1e-5
PAD_ID = 3  # the tiny Llama's; ids 0-3 are its special tokens


def documents(count: int, vocab_size: int, seed: int) -> list[dict[str, list[int]]]:
    """Examples of 3 to 40 random tokens whose first third is an unlabelled prompt, as alpaca rows have."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in torch.randint(3, 41, (count,), generator=generator).tolist():
        ids = torch.randint(4, vocab_size, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 3) + ids[length // 3:]})
    return examples


def spans(row: dict[str, list[int]]) -> list[slice]:
    """Where each example of a packed row lies: from one position id 0 to the next."""
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["position_ids"])]
    return [slice(start, end) for start, end in zip(starts, starts[1:])]


def logits(model, examples: list[dict[str, list[int]]], attention: str = "sdpa") -> torch.Tensor:
    """Logits of the collated examples, the model called as the training loss calls it for `attention`."""
    batch = collate(examples, PAD_ID)
    with torch.no_grad():
        return model(**model_inputs(batch, attention)).logits.float().reshape(*batch["input_ids"].shape, -1)


def alone(model, row: dict[str, list[int]], span: slice) -> torch.Tensor:
    """The logits of one example of a packed row run as an unpacked example of its own."""
    return logits(model, [{"input_ids": row["input_ids"][span], "labels": row["labels"][span]}])[0]


@pytest.fixture(scope="module")
def nf4_fp32(tiny_llama_dir):
    return tiny_base(tiny_llama_dir, compute_dtype="float32").model.eval()


def test_position_ids_restart_at_every_example_and_no_token_is_lost():
    examples = documents(30, 384, seed=0)
    rows = pack(examples, 64)
    assert sum(len(row["input_ids"]) for row in rows) == sum(len(e["input_ids"]) for e in examples)
    pieces = sorted(row["input_ids"][span] for row in rows for span in spans(row))
    assert pieces == sorted(e["input_ids"] for e in examples)
    assert all(row["position_ids"][span] == list(range(span.stop - span.start)) for row in rows for span in spans(row))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_packed_example_computes_what_it_computes_alone(tiny_llama_dir, compute_dtype):
    model = tiny_base(tiny_llama_dir, compute_dtype=compute_dtype).model.eval()
    rows = pack(documents(30, 384, seed=0), 64)
    assert len(rows) > 1 and any(len(spans(row)) > 2 for row in rows)
    packed = logits(model, rows)
    for index, row in enumerate(rows):
        for span in spans(row):
            expected = alone(model, row, span)
            if compute_dtype == "float32":
                atol = FP32_ATOL
            else:  # 4 bf16 ulps (8 significant bits) of the largest logit
                atol = 4 * 2.0 ** (math.floor(math.log2(expected.abs().max())) - 7)
            torch.testing.assert_close(packed[index, span], expected, rtol=0, atol=atol)


def test_an_example_does_not_move_when_its_row_mates_change(nf4_fp32):
    rows = pack(documents(30, 384, seed=0), 64)
    changed = []
    for row in rows:
        first = spans(row)[0]
        ids = list(row["input_ids"])
        ids[first] = [4 + (token + 7) % 380 for token in ids[first]]
        changed.append(row | {"input_ids": ids})
    before, after = logits(nf4_fp32, rows), logits(nf4_fp32, changed)
    row = next(i for i, r in enumerate(rows) if len(spans(r)) > 1)
    second = spans(rows[row])[1]
    for index, packed_row in enumerate(rows):
        rest = slice(spans(packed_row)[0].stop, None)
        assert torch.equal(before[index, rest], after[index, rest])
    # what the same rows did without position ids (one long sequence, as packing did before): the change moves
    # the second example
    unpacked = [{key: r[key] for key in ("input_ids", "labels")} for r in (rows[row], changed[row])]
    moved = logits(nf4_fp32, unpacked[:1])[0, second] - logits(nf4_fp32, unpacked[1:])[0, second]
    assert moved.abs().max() > 0.1


def test_the_loss_of_packed_rows_is_the_token_weighted_loss_of_their_examples_alone(nf4_fp32):
    examples = documents(30, 384, seed=1)
    rows = pack(examples, 64)
    packed = causal_lm_loss(nf4_fp32, collate(rows, PAD_ID), chunk_tokens=7)
    separate = [causal_lm_loss(nf4_fp32, collate([example], PAD_ID), chunk_tokens=7) for example in examples]
    assert packed.label_tokens == sum(parts.label_tokens for parts in separate)
    torch.testing.assert_close(packed.loss_sum, sum(parts.loss_sum for parts in separate), rtol=FP32_ATOL, atol=0)


def test_flattened_rows_as_flash_attention_takes_them_compute_the_same(nf4_fp32):
    rows = pack(documents(30, 384, seed=0), 64)
    batch = collate(rows, PAD_ID)
    flat = model_inputs(batch, "flash_attention_2")
    assert set(flat) == {"input_ids", "position_ids", "use_cache"} and "attention_mask" not in flat
    assert flat["input_ids"].shape == flat["position_ids"].shape == (1, batch["input_ids"].numel())
    # SDPA stands in for flash attention's varlen kernel, which reads the same restarts (no GPU here)
    torch.testing.assert_close(logits(nf4_fp32, rows, "flash_attention_2"), logits(nf4_fp32, rows), rtol=0,
                               atol=FP32_ATOL)
    unpacked = collate([{"input_ids": [5, 6], "labels": [5, 6]}], PAD_ID)
    assert model_inputs(unpacked, "flash_attention_2").keys() == {"input_ids", "attention_mask"}


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, pad_token_id=0)
FAMILIES = {  # the preset families besides Llama; windows shorter than the examples, so they matter
    "mistral": MistralConfig(sliding_window=5, **TINY),
    "qwen2": Qwen2Config(**TINY),
    "gemma": GemmaConfig(head_dim=8, **TINY),
    "gemma2": Gemma2Config(sliding_window=5, head_dim=8, **TINY),  # sliding and full layers alternate
    "phi3": Phi3Config(**TINY),
}


@pytest.mark.parametrize("family, attn_implementation", [
    (family, attn) for family in FAMILIES for attn in ("sdpa", "eager") if (family, attn) != ("gemma2", "sdpa")])
def test_every_preset_family_keeps_packed_examples_apart(family, attn_implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family], attn_implementation=attn_implementation).eval()
    rows = pack(documents(12, 100, seed=2), 32)
    packed = logits(model, rows)
    for index, row in enumerate(rows):
        for span in spans(row):
            torch.testing.assert_close(packed[index, span], alone(model, row, span), rtol=0, atol=FP32_ATOL)


def planned_peak(values: dict, varlen: bool = False) -> int:
    run = resolve(RunSpec().with_values(values), Hardware(lookup_gpu("H100"), "cuda", varlen_attention=varlen))
    return estimate_memory(load_model_config("llama-3-8b"), run).predicted_peak_allocated_bytes


def test_the_planner_counts_the_mask_that_keeps_packed_examples_apart():
    seq = 2048
    base = {"training.max_seq_len": seq, "training.gradient_checkpointing": False}
    unpacked, packed = planned_peak(base), planned_peak(base | {"data.packing": True})
    # Llama-3-8B: q 4096, kv 1024, 32 layers. With a mask SDPA gets repeated kv heads and keeps its additive
    # copy of the mask in every layer, 2 * (4 * 4096 + seq) bytes a token against 2 * (2 * 4096 + 2 * 1024)
    per_layer = seq * 2 * ((4 * 4096 + seq) - (2 * 4096 + 2 * 1024))
    assert packed - unpacked == 32 * per_layer + seq * seq  # and the bool mask, once
    # padded micro-batches are masked already; flash attention takes packed rows without a mask
    padded = base | {"training.micro_batch_size": 2}
    assert planned_peak(padded | {"data.packing": True}) == planned_peak(padded)
    flash = base | {"model.attn_implementation": "flash_attention_2"}
    assert planned_peak(flash | {"data.packing": True}) == planned_peak(flash)
    # the varlen kernel takes no mask; it gets the kv heads repeated: 2 * (4 * 4096) against 2 * (2 * 4096 + 2 * 1024)
    varlen = planned_peak(base | {"data.packing": True}, varlen=True)
    assert varlen - unpacked == 32 * seq * 2 * ((4 * 4096) - (2 * 4096 + 2 * 1024))


def reference_varlen(query, key, value, cu_lengths, max_length, scale, window):
    """What torch's CUDA-only varlen kernel computes, example by example with SDPA (the CPU has no such kernel)."""
    outputs = []
    for start, end in zip(cu_lengths[:-1].tolist(), cu_lengths[1:].tolist()):
        assert end - start <= max_length
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, n, dim)
        n = end - start
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window[0] >= 0:
            allowed &= torch.ones(n, n, dtype=torch.bool).triu(-window[0])
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # grouped kv heads; Mistral's window shorter than examples
def test_packed_rows_through_the_varlen_attention_compute_what_sdpa_computes(family, monkeypatch):
    torch.manual_seed(0)
    config = LlamaConfig(**TINY) if family == "llama" else FAMILIES[family]
    monkeypatch.setattr(packed_attention, "_varlen", reference_varlen)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=packed_attention.register()).eval()
    rows = pack(documents(12, 100, seed=2), 32)
    rows.append(rows[0] | {"input_ids": rows[0]["input_ids"][:20], "labels": rows[0]["labels"][:20],
                           "position_ids": rows[0]["position_ids"][:20]})  # a short row: padding, its own example
    batch = collate(rows, PAD_ID)
    inputs = model_inputs(batch, PACKED_VARLEN)
    starts = [i for i, p in enumerate(batch["position_ids"].reshape(-1).tolist()) if p == 0]
    assert inputs["cu_seq_lens_q"].tolist() == starts + [batch["input_ids"].numel()]
    assert inputs["input_ids"].shape == (1, batch["input_ids"].numel()) and "attention_mask" not in inputs
    varlen = logits(model, rows, PACKED_VARLEN)
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(varlen, logits(model, rows), rtol=0, atol=FP32_ATOL)
    # without the examples' lengths (an unpacked batch) it is SDPA with transformers' padding mask
    model.config._attn_implementation = packed_attention.ATTENTION_NAME
    unpacked = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[-2:]]
    with_varlen = logits(model, unpacked, PACKED_VARLEN)
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(with_varlen, logits(model, unpacked), rtol=0, atol=0)
