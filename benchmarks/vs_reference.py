"""Our trainer beside the plain transformers + peft + bitsandbytes stack and Unsloth, on the same GPU and settings.

Each stack runs in its own process (Unsloth patches transformers on import) on the same random-weight checkpoint,
random tokens from the same seed, LoRA r=16 alpha 32 dropout 0 on q/k/v/o, NF4 + double quantization, bf16,
gradient checkpointing, torch AdamW. `ours` is our trainer's defaults; ours-offload keeps checkpointed inputs in
pinned CPU memory, ours-long adds MLPs 2,048 tokens at a time and 512-token loss chunks (for long sequences;
ours-long-4k: 4,096-token MLP chunks),
ours-eager skips torch.compile, ours-peft-lora also uses peft's LoRA forward. Modes:
  speed:   tokens/s (median of the timed steps after two warm-up steps) and peak allocated / reserved VRAM
           at --seq-len, micro-batch 1;
  longest: the longest sequence (micro-batch 1, a multiple of 1024) that trains one step without running out of
           memory under --cap-gib;
  profile: torch.profiler over two steps after three warm-up ones: the GPU time by operator, as a table.

    python benchmarks/vs_reference.py --model llama-2-7b --seq-len 2048 --out results.jsonl
    python benchmarks/vs_reference.py --model llama-2-7b --mode longest --cap-gib 15 --out results.jsonl

Unsloth runs when it is importable (it is optional: a stack that cannot be imported is reported as skipped);
UNSLOTH_SITE=DIR puts a folder of Unsloth's own packages on the path of its process alone.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not

# our trainer's defaults, then the same with one option changed
OURS = {"ours": {}, "ours-offload": {"offload_checkpoints": True},
        "ours-long": {"offload_checkpoints": True, "mlp_chunk_tokens": 2048, "loss_chunk_tokens": 512},
        "ours-long-4k": {"offload_checkpoints": True, "mlp_chunk_tokens": 4096, "loss_chunk_tokens": 512},
        "ours-eager": {"compile_layers": "off"},
        "ours-peft-lora": {"compile_layers": "off", "fused_lora": False}}
STACKS = ("plain", "unsloth", *OURS)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SEQ_STEP = 1024


def build_plain(model_dir: str, seq_len: int):
    """The stack as peft's and bitsandbytes' documentation show it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return model, lambda tokens: model(input_ids=tokens, labels=tokens).loss


def build_unsloth(model_dir: str, seq_len: int):
    import unsloth  # noqa: F401  (must come before transformers)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq_len, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0,
                                             max_seq_length=seq_len)
    return model, lambda tokens: model(input_ids=tokens, labels=tokens).loss


def build_ours(model_dir: str, seq_len: int, options: dict):
    import torch

    from qlora_trainer.bench.measure import MethodSpec, load_method
    from qlora_trainer.loss import causal_lm_loss

    options = dict(options)
    chunk_tokens = options.pop("loss_chunk_tokens", 1024)
    spec = MethodSpec(method="qlora", model_path=model_dir, seq_len=seq_len, micro_batch_size=1, rank=16,
                      target_modules="attn", **options)
    model, causal_lm, _ = load_method(spec, torch.device("cuda", 0))

    def loss(tokens):
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = causal_lm_loss(causal_lm, batch, chunk_tokens)
        return parts.loss_sum / parts.label_tokens
    return model, loss


BUILDERS = {"plain": build_plain, "unsloth": build_unsloth,
            **{name: (lambda model_dir, seq_len, options=options: build_ours(model_dir, seq_len, options))
               for name, options in OURS.items()}}


def predicted(model_config, seq_len: int, options: dict) -> dict:
    """The planner's peaks for one of our stacks (its plan is build_ours's)."""
    from qlora_trainer.bench.measure import MethodSpec
    from qlora_trainer.bench.run import method_plan
    from qlora_trainer.planner.memory import estimate_memory

    options = dict(options)
    chunk_tokens = options.pop("loss_chunk_tokens", 1024)
    spec = MethodSpec(method="qlora", model_path="", seq_len=seq_len, micro_batch_size=1, rank=16,
                      target_modules="attn", **options)
    plan = dataclasses.replace(method_plan(spec, "nf4", "lora"), loss_chunk_tokens=chunk_tokens)
    estimate = estimate_memory(model_config, plan)
    return {"predicted_allocated_bytes": estimate.predicted_peak_allocated_bytes,
            "predicted_reserved_bytes": estimate.predicted_peak_bytes}


def train_step(model, loss_fn: Callable, optimizer, tokens) -> float:
    loss = loss_fn(tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def worker(stack: str, model_dir: str, mode: str, seq_len: int, steps: int, cap_gib: float, max_seq_len: int
           ) -> dict:
    if stack == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    import torch

    from qlora_trainer.hardware import apply_memory_cap

    apply_memory_cap(cap_gib)
    model, loss_fn = BUILDERS[stack](model_dir, max(seq_len, max_seq_len if mode == "longest" else seq_len))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    record = {"stack": stack, "mode": mode, "device": torch.cuda.get_device_name(0),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        batches = [torch.randint(0, vocab, (1, seq_len), generator=generator).cuda() for _ in range(5)]
        for tokens in batches[:3]:
            train_step(model, loss_fn, optimizer, tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for tokens in batches[3:]:
                train_step(model, loss_fn, optimizer, tokens)
            torch.cuda.synchronize()
        table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        return record | {"seq_len": seq_len, "profile": table}
    if stack in OURS and mode == "speed":
        record |= predicted(model.config, seq_len, OURS[stack])
    if mode == "speed":
        torch.cuda.reset_peak_memory_stats()
        speeds, losses = [], []
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (1, seq_len), generator=generator).cuda()
            torch.cuda.synchronize()
            started = time.perf_counter()
            losses.append(train_step(model, loss_fn, optimizer, tokens))
            torch.cuda.synchronize()
            speeds.append(seq_len / (time.perf_counter() - started))
        return record | {"seq_len": seq_len, "tokens_per_second": statistics.median(speeds[2:] or speeds),
                         "first_step_s": seq_len / speeds[0],  # includes torch.compile's compilation
                         "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                         "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "losses": losses}

    def trains(length: int) -> bool:
        tokens = torch.randint(0, vocab, (1, length), generator=generator).cuda()
        try:
            train_step(model, loss_fn, optimizer, tokens)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            del tokens
            torch.cuda.empty_cache()

    # doubling from seq_len, then bisection between the last length that trained and the first that did not
    good, bad, length = 0, None, seq_len
    while length <= max_seq_len:
        if not trains(length):
            bad = length
            break
        good, length = length, 2 * length
    high = bad or max_seq_len + SEQ_STEP
    while high - good > SEQ_STEP:
        middle = (good + high) // 2 // SEQ_STEP * SEQ_STEP
        good, high = (middle, high) if trains(middle) else (good, middle)
    return record | {"cap_gib": cap_gib, "longest_seq_len": good, "searched_up_to": max_seq_len}


def run_stack(stack: str, args: argparse.Namespace, model_dir: Path) -> dict:
    from qlora_trainer.hardware import ALLOCATOR_SETTINGS

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", stack, "--model-dir", str(model_dir), "--mode", args.mode,
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--cap-gib", str(args.cap_gib),
                   "--max-seq-len", str(args.max_seq_len), "--out", str(out)]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
        if stack in OURS:  # the allocator settings our command line sets
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTINGS)
        if stack == "unsloth" and os.environ.get("UNSLOTH_SITE"):  # Unsloth's own packages, for its process alone
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["UNSLOTH_SITE"], env.get("PYTHONPATH")]))
        process = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, env=env)
        if process.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        if "ModuleNotFoundError" in process.stderr and stack == "unsloth":
            return {"stack": stack, "mode": args.mode, "skipped": "unsloth is not importable"}
        return {"stack": stack, "mode": args.mode, "error": (process.stderr.strip().splitlines() or ["?"])[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b", help="preset name or folder with config.json")
    parser.add_argument("--mode", choices=("speed", "longest", "profile"), default="speed")
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--seq-len", type=int, default=2048, help="speed: the length; longest: where to start")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cap-gib", type=float, default=0.0)
    parser.add_argument("--max-seq-len", type=int, default=49152, help="longest: search no further")
    parser.add_argument("--timeout-s", type=int, default=300, help="per stack")
    parser.add_argument("--out", type=Path, help="JSONL the results are appended to")
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model_dir, args.mode, args.seq_len, args.steps, args.cap_gib,
                        args.max_seq_len)
        args.out.write_text(json.dumps(result))
        return
    from qlora_trainer.bench.random_model import random_checkpoint_in_subprocess

    model_dir = random_checkpoint_in_subprocess(args.model)
    for stack in args.stacks.split(","):
        record = run_stack(stack, args, model_dir) | {"model": args.model}
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        print(record.pop("profile", ""))
        print(json.dumps({k: v for k, v in record.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
