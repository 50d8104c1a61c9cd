"""Checkpointed layers whose inputs are offloaded to pinned host memory (engine/checkpointing.py): on a CUDA GPU the
copies run on a side stream, overlapping the layers' compute, and must give exactly the gradients of inputs kept on
the GPU. On a machine without a GPU offloading does nothing, so these tests need one (the GPU machine runs them:
`python -m pytest tests/test_checkpoint_offload.py`)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_trainer.engine import checkpointing
from qlora_trainer.engine.checkpointing import enable_activation_checkpointing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading copies only where there is a GPU")


def _gradients(model: LlamaForCausalLM, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for input_ids in batches:  # gradient accumulation: one backward per micro-batch
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    torch.cuda.synchronize()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("checkpointed_layers, prefetch", [(None, True), (3, True), (None, False)])
def test_offloaded_inputs_give_the_gradients_of_inputs_kept_on_the_gpu(checkpointed_layers, prefetch):
    # fp32 and eager attention: the same kernels on the same inputs give the same bits, so any copy read before it
    # finished (or a buffer reused too early) shows as a difference; inputs of 2 x 1024 x 1024 floats (8 MiB) take
    # long enough to copy for a missing wait to matter
    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    kept = LlamaForCausalLM(config).to("cuda", torch.float32)
    offloaded = copy.deepcopy(kept)
    kept.train(), offloaded.train()
    enable_activation_checkpointing(kept, checkpointed_layers)
    enable_activation_checkpointing(offloaded, checkpointed_layers, offload=True, prefetch=prefetch)
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 512, (2, 1024), device="cuda", generator=generator) for _ in range(2)]

    expected = _gradients(kept, batches)
    for _ in range(2):  # a second step reuses the first step's pinned buffers and GPU blocks
        got = _gradients(offloaded, batches)
        assert got.keys() == expected.keys() and len(got) > 0
        for name, gradient in expected.items():
            assert torch.equal(got[name], gradient), name
    assert not any(ref() is not None and ref().stored is not None for ref in checkpointing._HOST_COPIES._pending)
