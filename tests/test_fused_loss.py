"""The fused lm_head + cross-entropy (Liger-Kernel's Triton kernel, engine/loss.py) against the chunked loss, on the
tiny NF4 Llama with a LoRA adapter; which runs resolve picks it for; and its term in the planner.

Triton kernels need a GPU, so here they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
triton is imported), which executes the same kernel code on the CPU. The interpreter cannot run libdevice's tanh,
so Liger's logit softcapping (Gemma-2) is not exercised here."""

import importlib.util
import os

import pytest
import torch

from qlora_trainer.engine.loss import _fused_cross_entropy, causal_lm_loss
from qlora_trainer.errors import ConfigError
from qlora_trainer.hardware import CPU, Hardware, lookup_gpu
from qlora_trainer.planner.memory import estimate_memory, fused_loss_chunk_bytes
from qlora_trainer.planner.shapes import load_model_config, model_shape
from qlora_trainer.spec import RunSpec, resolve
from test_fast_paths import _adapted

RUNS_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("liger_kernel") is not None


def _loss_and_grads(model, batch: dict, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    parts = causal_lm_loss(model.get_base_model(), batch, chunk_tokens=5, fused=fused)
    parts.loss_sum.backward()
    return parts.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not RUNS_KERNELS, reason="needs liger-kernel (Linux) and Triton's interpreter")
def test_fused_loss_equals_the_chunked_loss_and_its_gradients(tiny_llama_dir):
    """fp32 throughout: both sum the same per-token fp32 cross-entropies over the same fp32 logits, in another order
    and with the logits' gradient formed in another way (softmax minus one-hot in the kernel, autograd here), so
    they agree to a few fp32 ulps of each quantity (~1e-7 relative); 1e-5 leaves room for the sums' order. A
    lost label, a prompt token counted or a gradient left out is off by far more."""
    model = _adapted(tiny_llama_dir, "float32", compute_dtype="float32")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 300, (2, 40), generator=generator)
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt: not a label
    labels[1, 30:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(40) < 30), "labels": labels}
    want_loss, want = _loss_and_grads(model, batch, fused=False)
    got_loss, got = _loss_and_grads(model, batch, fused=True)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * 7
    for name in want:
        assert float((got[name] - want[name]).norm()) <= 1e-5 * float(want[name].norm()) + 1e-12, name


def test_the_loss_kernel_is_fused_on_gpus_that_run_it_and_chunked_elsewhere():
    h100, t4 = Hardware.planned(lookup_gpu("H100-80GB")), Hardware.planned(lookup_gpu("T4"))
    assert resolve(RunSpec(), h100).fused_loss and resolve(RunSpec(), t4).fused_loss
    assert not resolve(RunSpec(), CPU).fused_loss
    assert not resolve(RunSpec(), Hardware(lookup_gpu("H100-80GB"), "cuda", liger=False)).fused_loss
    assert not resolve(RunSpec().with_values({"training.loss_kernel": "chunked"}), h100).fused_loss
    head = RunSpec().with_values({"adapter.target_modules": ["q_proj", "lm_head"]})
    assert not resolve(head, h100).fused_loss  # the kernel reads lm_head's frozen weight alone
    with pytest.raises(ConfigError, match=r"^training.loss_kernel: fused needs a CUDA GPU .*; use auto or chunked$"):
        resolve(RunSpec().with_values({"training.loss_kernel": "fused"}), CPU)
    with pytest.raises(ConfigError, match="fused cannot read an adapter on lm_head"):
        resolve(head.with_values({"training.loss_kernel": "fused"}), h100)


def test_the_planner_counts_one_fused_chunk_of_logits_instead_of_a_chunk_of_loss_chunk_tokens():
    # Liger's rows per chunk: next_power_of_2(ceil(tokens / ceil(vocab / hidden))), at most every token
    assert fused_loss_chunk_bytes(2048, 4096, 128256, 2) == 64 * 128256 * 2 + 4 * 2048  # ceil(128256/4096) = 32
    assert fused_loss_chunk_bytes(8192, 3584, 152064, 2) == 256 * 152064 * 2 + 4 * 8192  # 43 -> 191 -> 256 rows
    assert fused_loss_chunk_bytes(10, 4096, 4000, 2) == 10 * 4000 * 2 + 40  # one chunk holds them all
    shape = model_shape(load_model_config("llama-3-8b"))
    h100 = Hardware.planned(lookup_gpu("H100-80GB"))
    spec = RunSpec().with_values({"model.path": "llama-3-8b", "training.max_seq_len": 2048,
                                  "training.gradient_checkpointing": True})
    fused = estimate_memory(shape, resolve(spec, h100))
    chunked = estimate_memory(shape, resolve(spec.with_values({"training.loss_kernel": "chunked"}), h100))
    # the chunked loss's 1,024-token chunk (12 bytes a logit) gives way to the fused 64-row chunk; nothing else moves
    assert chunked.phases["loss"].logits == 1024 * 128256 * 12
    assert fused.phases["loss"].logits == fused_loss_chunk_bytes(2048, 4096, 128256, 2)
    assert fused.phases["loss"].activations == chunked.phases["loss"].activations
    assert fused.phases["layer backward"] == chunked.phases["layer backward"]
    # at 2,048 tokens the loss was the peak; with the fused loss the layers' backward is
    assert (chunked.phase, fused.phase) == ("loss", "layer backward")
    assert fused.predicted_peak_bytes < chunked.predicted_peak_bytes


@pytest.mark.skipif(not RUNS_KERNELS, reason="needs liger-kernel (Linux) and Triton's interpreter")
def test_the_fused_kernel_reads_a_vocabulary_wider_than_one_block():
    """Liger's kernel runs over the vocabulary 32,768 logits at a time (an online softmax across blocks); 40,000
    makes it take two, one partial. fp32 here, so the bound is fp32 rounding over sums of 40,000 terms (well
    under 1e-5 relative); an ignored label counted, a block dropped or its max mishandled is off by far more."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(24, 32, generator=generator)
    weight = torch.randn(40_000, 32, generator=generator) * 0.05
    labels = torch.randint(0, 40_000, (24,), generator=generator)
    labels[:3] = -100
    lm_head = torch.nn.Linear(32, 40_000, bias=False)
    lm_head.weight.data.copy_(weight)
    lm_head.weight.requires_grad_(False)
    results = []
    for fuse in (True, False):
        x = hidden.clone().requires_grad_()
        loss = (_fused_cross_entropy(x, labels, lm_head, 0.0) if fuse
                else torch.nn.functional.cross_entropy(x @ weight.t(), labels, reduction="sum"))
        loss.backward()
        results.append((loss.detach(), x.grad))
    (fused_loss, fused_grad), (want_loss, want_grad) = results
    assert float(fused_loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert float((fused_grad - want_grad).norm()) <= 1e-5 * float(want_grad.norm())
