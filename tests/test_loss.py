"""The chunked loss equals the plain full-logits loss, in value and in gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_trainer.engine.loss import causal_lm_loss


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_loss_matches_full_logits(chunk_tokens):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100)).float()
    input_ids = torch.randint(0, 100, (2, 12))
    labels = input_ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, 9:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    parts = causal_lm_loss(model, batch, chunk_tokens)
    chunked = parts.loss_sum / parts.label_tokens
    chunked.backward()
    chunked_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()

    assert parts.label_tokens == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_grad, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-7)
