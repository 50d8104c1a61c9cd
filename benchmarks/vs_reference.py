"""Our trainer beside the plain transformers + peft + bitsandbytes stack and Unsloth, on the same GPU, data and settings.

Every stack runs in its own process (Unsloth patches transformers on import) on the same random-weight checkpoint
and the same token batches: packed synthetic text through this trainer's own data pipeline (data/prepare.py,
data/batches.py), micro-batch 1. Settings: LoRA r=16 (--rank), alpha 2 x r, dropout 0 on q/k/v/o (--targets
all-linear: every linear layer of the decoder), NF4 + double quantization,
bf16, gradient checkpointing, torch AdamW at a constant 1e-4, gradients clipped at norm 1.0 (the default of
`qlora-trainer train`, and of the Trainer the peers are usually driven by).

`ours` is `qlora-trainer train` itself, in its own process, with its defaults (benchmarks/measure_training.py reads
tokens/s and peaks from its metrics.jsonl); ours-offload sets `training.offload_checkpoints` (the default since
2026-12-06), ours-on-gpu turns it off, ours-long offloads,
MLPs 2,048 tokens at a time and 512-token loss chunks (ours-long-4k: 4,096-token MLP chunks), ours-eager turns
torch.compile off, ours-compiled turns it on, ours-auto-attention-chunks is ours-auto with each layer's backward
4,096 queries at a time (engine/chunked_attention.py) at any length (ours-auto chooses it where nothing else
fits), ours-peft-lora also uses peft's LoRA forward; ours-engine (and
ours-engine-compiled) is the same engine (build + step) in this script's loop, beside the peers, to show what the
command line around it costs (ours-engine-bnb-dequant: its compiled layers call bitsandbytes' dequantization, as
before engine/nf4_in_graph.py); ours-auto leaves to the planner what `training.plan: auto` leaves it (checkpointing,
offloading, MLP and layer-backward chunks, recomputed keys) for --cap-gib, as `train` does. Every stack of ours runs under --cap-gib as
`training.memory_cap_gib`. Modes:
  speed:   tokens/s (median of the steps after two warm-up steps) and peak allocated / reserved VRAM at --seq-len;
  longest: the longest sequence (a multiple of 1024) at which a run trains under --cap-gib: every length probed is
           a run of its own (a new process, as `probe` below), so a length passes only where a run's first step
           and its second, which holds the optimizer's state, both fit; ours' search starts at the planner's
           predicted longest for a run planned at --max-seq-len, or at --first-probe (each probe of ours at 100,000
           tokens and more takes minutes: few probes); the peers' search doubles from --seq-len, then bisects;
  probe:   whether a run at --seq-len trains its first two steps under --cap-gib, in a process of its own, with
           each step's peaks and what loading left allocated; ours through the engine that `train` builds
           (engine/build.py, engine/step.py), planned by `train`'s own gate for that length (training/gate.py), with
           `train`'s compiler settings;
  profile: torch.profiler over two steps after three warm-up ones and three timed without it (their time is
           recorded: the profiler's own host time inflates the profiled steps); ours through the engine, in process;
  snapshot: the CUDA allocator's trace of one step after two warm-up ones (--warm-up-steps), and what is alive at
           its peak by the code that allocated it (memory_peak.py; ours through the engine, in process); a step that
           runs out of memory is traced up to the allocation that failed.

    python benchmarks/vs_reference.py --model llama-2-7b --seq-len 2048 --out results.jsonl
    python benchmarks/vs_reference.py --model llama-2-7b --mode longest --cap-gib 15 --out results.jsonl

A branch beside this checkout, in the same call: unpack its files into a folder the GPU machine receives (e.g.
`git archive BRANCH | tar -x -C .trees/BRANCH`, not ignored by git) and name its stacks `STACK@.trees/BRANCH`: that
stack's `qlora-trainer train`, or its own copy of this script as the worker, runs from there.

Unsloth runs when it is importable (it is optional: a stack that cannot be imported is reported as skipped);
UNSLOTH_SITE=DIR puts a folder of Unsloth's own packages on the path of its process alone.
"""

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's qlora_trainer, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

# our trainer's defaults, then the same with some run-specification keys changed
OURS = {"ours": {}, "ours-auto": {"training.plan": "auto"}, "ours-offload": {"training.offload_checkpoints": True},
        "ours-on-gpu": {"training.offload_checkpoints": False},
        "ours-long": {"training.offload_checkpoints": True, "training.mlp_chunk_tokens": 2048,
                      "training.loss_chunk_tokens": 512},
        "ours-long-4k": {"training.offload_checkpoints": True, "training.mlp_chunk_tokens": 4096,
                         "training.loss_chunk_tokens": 512},
        "ours-auto-attention-chunks": {"training.plan": "auto", "training.attention_chunk_tokens": 4096},
        "ours-eager": {"training.compile_layers": "off"},
        "ours-compiled": {"training.compile_layers": "on"},
        "ours-peft-lora": {"training.compile_layers": "off", "training.fused_lora": False},
        "ours-unpacked": {"data.packing": False}}
# the same run specifications through the engine in this script's own loop, the loop the peers get (no CLI around it)
ENGINE = {"ours-engine": OURS["ours"], "ours-engine-compiled": OURS["ours-compiled"],
          "ours-engine-with-data": OURS["ours"],  # also holds the tokenized dataset, as the command line does
          "ours-engine-contaminated": OURS["ours"],  # packed rows without position ids: attention across examples
          "ours-engine-bnb-dequant": OURS["ours"]}  # compiled layers calling bitsandbytes' dequantization ops
STACKS = ("plain", "unsloth", *OURS, *ENGINE)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTED = {"qkvo": TARGETS, "all-linear": TARGETS + ["gate_proj", "up_proj", "down_proj"]}  # --targets
SEQ_STEP = 1024
LEARNING_RATE, MAX_GRAD_NORM, SEED = 1e-4, 1.0, 42


def ours_config(model_dir: Path, data_path: Path, seq_len: int, steps: int, changes: dict, output_dir: Path,
                rank: int = 16, targets: str = "qkvo", cap_gib: float = 0.0) -> dict:
    """The run config of one of our stacks (YAML sections, as a user writes them)."""
    config = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "format": "text", "packing": True},
        "adapter": {"type": "lora", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
                    "target_modules": ADAPTED[targets]},
        "training": {"max_steps": steps, "micro_batch_size": 1, "max_seq_len": seq_len, "save_steps": 0,
                     "learning_rate": LEARNING_RATE, "lr_scheduler": "constant", "max_grad_norm": MAX_GRAD_NORM,
                     "logging_steps": 1, "seed": SEED, **({"memory_cap_gib": cap_gib} if cap_gib else {})},
        "output": {"dir": str(output_dir), "overwrite": True},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def synthetic_documents(min_words: int, max_words: int, n_docs: int = 4000) -> Path:
    """Synthetic text documents of min_words to max_words words each (seeded), as a JSONL file."""
    from measure_training import WORK
    from qlora_trainer.bench.random_model import write_synthetic_text

    return write_synthetic_text(WORK / f"synthetic-text-{min_words}-{max_words}.jsonl", n_docs, max_words, min_words)


def token_batches(config: dict, steps: int) -> list:
    """The micro-batches `qlora-trainer train` takes for `config`, in its order (its data pipeline and sampler)."""
    from qlora_trainer.data.batches import collate, micro_batches
    from qlora_trainer.data.prepare import prepare_data
    from qlora_trainer.engine.base import load_tokenizer
    from qlora_trainer.spec import spec_from_dict

    spec = spec_from_dict(config)
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.training.max_seq_len, spec.training.seed)
    stream = micro_batches(len(data.train), 1, spec.training.seed, 0)
    return [collate([data.train[i] for i in next(stream)], tokenizer.pad_token_id) for _ in range(steps)]


def build_plain(model_dir: str, seq_len: int, rank: int, targets: list[str]):
    """The stack as peft's and bitsandbytes' documentation show it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    return model, lambda batch: peer_loss(model, batch)


def peer_loss(model, batch: dict):
    """The peer's own loss on the batch as our engine feeds it (packed rows: position ids that restart per example and
    no 2D mask, so every stack keeps the examples apart)."""
    from qlora_trainer.engine.loss import model_inputs

    return model(**model_inputs(batch, "sdpa"), labels=batch["labels"]).loss


def build_unsloth(model_dir: str, seq_len: int, rank: int, targets: list[str]):
    import unsloth  # noqa: F401  (must come before transformers)
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq_len, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=2 * rank, lora_dropout=0, target_modules=targets,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0,
                                             max_seq_length=seq_len)
    return model, lambda batch: peer_loss(model, batch)


def peer_step(model, loss_fn: Callable, optimizer, batch: dict) -> float:
    import torch

    loss = loss_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def ours_plan(config: dict, seq_len: int):
    """The run `train` would make of `config` at `seq_len` on this machine: its gate fills what `training.plan: auto`
    leaves open (forced, so a length past what fits is still planned)."""
    from qlora_trainer.engine.base import load_model_config
    from qlora_trainer.hardware import detect_hardware
    from qlora_trainer.spec import resolve, spec_from_dict
    from qlora_trainer.training.gate import fit_to_budget

    spec = spec_from_dict(config).with_values({"training.max_seq_len": seq_len})
    return fit_to_budget(resolve(spec, detect_hardware()), load_model_config(spec.model), force=True)


def ours_session(config: dict, seq_len: int):
    """Our engine, planned (ours_plan) and built from `config` exactly as `train` plans and builds it, with
    `train_step` as its step, and the run as planned."""
    from qlora_trainer.engine.build import build
    from qlora_trainer.engine.step import train_step

    run = ours_plan(config, seq_len)
    session = build(run)
    return session.model, lambda batch: train_step(session, [batch]).loss, run


def predicted_longest(run, cap_gib: float) -> int:
    """The longest length up to the run's own at which the planner predicts `run` to fit the pool --cap-gib leaves
    PyTorch (the cap less the CUDA context, no safety margin): where the search for ours starts."""
    from qlora_trainer.planner.search import longest_seq_len_within
    from qlora_trainer.planner.shapes import load_model_config, model_shape
    from qlora_trainer.spec.resolve import CUDA_CONTEXT_BYTES

    pool = cap_gib * 2**30 - CUDA_CONTEXT_BYTES
    shape = model_shape(load_model_config(run.spec.model.path))
    return longest_seq_len_within(shape, run, lambda peak: peak <= pool) or SEQ_STEP


def longest_trainable(trains: Callable[[int], bool], start: int, limit: int, first: Optional[int] = None) -> int:
    """The longest multiple of SEQ_STEP up to `limit` for which `trains(length)` holds (0: none), trains being
    monotone. Without `first`: doubling from `start`, then bisection. From `first` (a prediction): steps of SEQ_STEP
    up (or down), doubled while the answer stays the same, then bisection, so a prediction within a few steps costs
    a few probes (ours compiles its layers again for every length probed)."""
    if first is None:
        good, bad, length = 0, None, start
        while length <= limit:
            if not trains(length):
                bad = length
                break
            good, length = length, 2 * length
    else:
        first = min(max(first // SEQ_STEP * SEQ_STEP, SEQ_STEP), limit)
        step = SEQ_STEP
        if trains(first):
            good, bad = first, None
            while bad is None and good < limit:
                length = min(good + step, limit)
                good, bad, step = (length, None, 2 * step) if trains(length) else (good, length, step)
        else:
            good, bad = 0, first
            while not good and bad > SEQ_STEP:
                length = max(bad - step, SEQ_STEP)
                good, bad, step = (length, bad, step) if trains(length) else (0, length, 2 * step)
    from qlora_trainer.planner.search import longest_multiple

    return longest_multiple(trains, SEQ_STEP, bad - SEQ_STEP if bad else limit, good)  # bisection in between


def worker(stack: str, args: argparse.Namespace, config: dict, batches_path: Path) -> dict:
    """One stack's measurement, in its own process."""
    if stack == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    import torch

    from qlora_trainer.hardware import apply_memory_cap

    apply_memory_cap(args.cap_gib)  # every stack: its pool gets the cap less the context
    ours = stack in OURS or stack in ENGINE
    model_dir = config["model"]["path"]
    run = None
    if ours and args.mode != "speed":  # these modes step on random unpacked rows: plan for those (attention included)
        config = {**config, "data": {**config["data"], "packing": False}}
    if args.predict_only:  # ours: where its longest-sequence search starts (no model loaded)
        return {"stack": stack,
                "predicted_longest_seq_len": predicted_longest(ours_plan(config, args.max_seq_len), args.cap_gib)}
    if stack == "ours-engine-bnb-dequant":  # as before 2026-12-06's nf4_in_graph.py, for its speed only
        from qlora_trainer.engine import nf4_in_graph

        nf4_in_graph._in_graph = lambda packed, quant_state: False
    if ours:
        model, step, run = ours_session(config, args.seq_len)
        if stack == "ours-engine-with-data":
            from qlora_trainer.data.prepare import prepare_data
            from qlora_trainer.engine.base import load_tokenizer
            from qlora_trainer.spec import spec_from_dict

            spec = spec_from_dict(config)
            record_data = prepare_data(spec.data, load_tokenizer(spec.model), spec.training.max_seq_len,  # noqa: F841
                                       spec.training.seed)
    else:
        model, loss_fn = {"plain": build_plain, "unsloth": build_unsloth}[stack](model_dir, args.seq_len, args.rank,
                                                                                  ADAPTED[args.targets])
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
        step = lambda batch: peer_step(model, loss_fn, optimizer, batch)  # noqa: E731
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    record = {"stack": stack, "mode": args.mode, "device": torch.cuda.get_device_name(0),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def random_batch(seq_len: int) -> dict:
        tokens = torch.randint(0, vocab, (1, seq_len), generator=generator)
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}

    def on_gpu(batch: dict) -> dict:
        return {k: v.cuda() for k, v in batch.items()}

    if args.mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        batches = [on_gpu(random_batch(args.seq_len)) for _ in range(8)]
        for batch in batches[:3]:
            step(batch)
        torch.cuda.synchronize()
        started = time.perf_counter()  # the steps' own time, without the profiler's overhead
        for batch in batches[3:6]:
            step(batch)
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - started) / 3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for batch in batches[6:]:
                step(batch)
            torch.cuda.synchronize()
        averages = profiler.key_averages()
        table = (averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60) + "\n"
                 + averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))
        return record | {"seq_len": args.seq_len, "step_s_unprofiled": step_s,
                         "tokens_per_second_unprofiled": args.seq_len / step_s, "profile": table}
    if args.mode == "snapshot":
        from memory_peak import peak_composition

        batches = [on_gpu(random_batch(args.seq_len)) for _ in range(args.warm_up_steps + 1)]
        for batch in batches[:-1]:
            step(batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        try:  # a step that runs out of memory is traced up to the allocation that failed
            step(batches[-1])
            torch.cuda.synchronize()
            out_of_memory = None
        except torch.cuda.OutOfMemoryError as error:
            out_of_memory = str(error).split(". GPU")[0]
        events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        return record | {"seq_len": args.seq_len, "warm_up_steps": args.warm_up_steps,
                         **({"out_of_memory": out_of_memory} if out_of_memory else {}),
                         "allocated_before_step_bytes": before,
                         "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                         "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "trace_events": len(events),
                         **peak_composition(events)}
    if args.mode == "speed":  # peers and ours-engine*: ours itself runs as `qlora-trainer train`
        torch.cuda.reset_peak_memory_stats()
        speeds, losses = [], []
        for batch in torch.load(batches_path):
            if stack == "ours-engine-contaminated":  # packing as it was before 2026-11-25, for its speed only
                batch = {name: tensor for name, tensor in batch.items() if name != "position_ids"}
            tokens = int(batch["attention_mask"].sum())
            torch.cuda.synchronize()
            started = time.perf_counter()
            losses.append(step(on_gpu(batch)))
            torch.cuda.synchronize()
            speeds.append(tokens / (time.perf_counter() - started))
        return record | {"seq_len": args.seq_len, "tokens_per_second": statistics.median(speeds[2:] or speeds),
                         "first_step_s": args.seq_len / speeds[0],
                         "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                         "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "losses": losses,
                         "step_speeds": [round(speed) for speed in speeds]}

    # mode probe: a run's first step at the length (it makes the optimizer's state), then its second (which holds it)
    started = time.perf_counter()
    after_build = torch.cuda.memory_allocated()  # what loading and building left behind, garbage included
    gc.collect()
    after_collect = torch.cuda.memory_allocated()
    failed_step, step_peaks = None, []
    for index in (1, 2):
        torch.cuda.reset_peak_memory_stats()  # each step's own peak: does a first step hold more than a second?
        try:
            step(on_gpu(random_batch(args.seq_len)))
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            failed_step = index
        step_peaks.append({"allocated_bytes": torch.cuda.max_memory_allocated(),
                           "reserved_bytes": torch.cuda.max_memory_reserved()})
        if failed_step:
            break
    result = record | {"probe": args.seq_len, "trains": failed_step is None,
                       **({"failed_step": failed_step} if failed_step else {}),
                       "peak_reserved_bytes": max(peak["reserved_bytes"] for peak in step_peaks),
                       "step_peaks": step_peaks, "allocated_after_build_bytes": after_build,
                       "allocated_after_collect_bytes": after_collect,
                       "seconds": round(time.perf_counter() - started, 1)}
    if run is not None:
        from qlora_trainer.planner.search import describe

        result["plan"] = describe(run)
    return result


class CallEnded(Exception):
    """The caller ended this script (SIGTERM, as `timeout` sends) while a stack ran: its row still gets written."""


def end_stacks_on_sigterm() -> None:
    """SIGTERM raises CallEnded, so that the running stack's worker is stopped and its row (with the probes its log
    holds) written, as when the stack's own --timeout-s ends it, rather than the call ending with no row."""
    def ended(signum, frame):
        raise CallEnded()

    signal.signal(signal.SIGTERM, ended)


def stopped_row(stack: str, args: argparse.Namespace, stop: Exception, seconds: float) -> dict:
    """The row of a stack whose process was stopped: by its own --timeout-s, or by the call's end (CallEnded)."""
    if isinstance(stop, CallEnded):
        return {"stack": stack, "mode": args.mode, "error": f"the call was ended (SIGTERM) after {seconds:.0f} s",
                "ended": True}
    return {"stack": stack, "mode": args.mode, "error": f"timed out after {args.timeout_s} s"}


def run_ours_command(stack: str, config: dict, args: argparse.Namespace, tree: Optional[Path] = None) -> dict:
    """`qlora-trainer train` for one of our stacks, with its speed, peaks and losses from metrics.jsonl."""
    from measure_training import predicted, run_train_command

    started = time.perf_counter()
    try:
        record = run_train_command(config, args.timeout_s, tree)
    except (subprocess.TimeoutExpired, CallEnded) as stop:  # either kills `train` (subprocess.run does)
        return stopped_row(stack, args, stop, time.perf_counter() - started)
    record.pop("ran_config", None)
    return {"stack": stack, "mode": "speed", "seq_len": args.seq_len, "via": "qlora-trainer train"} | record | {
        k: v for k, v in predicted(config).items()
        if k in ("predicted_peak_bytes", "predicted_peak_allocated_bytes", "fused_optimizer")}


def worker_log(args: argparse.Namespace, stack: str, tree: Optional[Path] = None) -> Optional[Path]:
    """Where a stack's worker writes its stderr (its longest-sequence probes as they end, its errors): beside --out,
    so that what a call ended by its own time limit had measured is still there; None without --out."""
    if args.out is None:
        return None
    return args.out.with_name(f"{args.out.stem}.{stack}{'@' + tree.name if tree else ''}.log")


def run_stack(stack: str, args: argparse.Namespace, config: dict, batches_path: Path,
              tree: Optional[Path] = None) -> dict:
    """One stack in its own process (a longest-sequence search: one per length probed); with `tree` (another
    checkout, e.g. a branch's files), that checkout's `qlora-trainer train` or its own copy of this script as the
    worker, so its code is what runs."""
    if stack in OURS and args.mode == "speed":
        return run_ours_command(stack, config, args, tree)
    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = worker_log(args, stack, tree) or Path(tmp) / "stderr.txt"
        stderr_path.write_text("")
        if args.mode == "longest":
            return search_longest(stack, args, config, batches_path, tree, stderr_path)
        started = time.perf_counter()
        try:
            return run_worker(stack, args, config, batches_path, tree, stderr_path, args.timeout_s)
        except (subprocess.TimeoutExpired, CallEnded) as stop:
            return stopped_row(stack, args, stop, time.perf_counter() - started) | {"log": str(stderr_path)}


def search_longest(stack: str, args: argparse.Namespace, config: dict, batches_path: Path, tree: Optional[Path],
                   stderr_path: Path) -> dict:
    """The longest length (a multiple of SEQ_STEP up to --max-seq-len) at which a run of `stack` trains: every probe a
    run of its own (a worker in mode `probe`), each probe's row appended to the stack's log as it ends, all within
    the stack's --timeout-s."""
    started = time.perf_counter()
    probes: list[dict] = []

    def worker_call(mode: str, seq_len: int, **flags) -> dict:
        call_args = argparse.Namespace(**{**vars(args), "mode": mode, "seq_len": seq_len, **flags})
        left = args.timeout_s - (time.perf_counter() - started)
        if left <= 0:
            raise subprocess.TimeoutExpired("vs_reference.py --worker", args.timeout_s)
        result = run_worker(stack, call_args, config, batches_path, tree, stderr_path, left)
        if "error" in result or "skipped" in result:
            raise StackFailed(result)
        return result

    def trains(seq_len: int) -> bool:
        probe = worker_call("probe", seq_len)
        probes.append(probe)
        with open(stderr_path, "a") as log:  # each probe as it ends: a search cut short still says how far it got
            log.write(json.dumps(probe) + "\n")
        return probe["trains"]

    ours = stack in OURS or stack in ENGINE
    try:
        predicted = (worker_call("probe", args.max_seq_len, predict_only=True)["predicted_longest_seq_len"]
                     if ours and args.cap_gib else None)
        first = (args.first_probe or predicted) if ours else None
        good = longest_trainable(trains, args.seq_len, args.max_seq_len, first)
    except (subprocess.TimeoutExpired, CallEnded) as stop:
        return stopped_row(stack, args, stop, time.perf_counter() - started) | {
            **({"probes": probes} if probes else {}), "log": str(stderr_path)}
    except StackFailed as failed:
        return failed.row | {"mode": "longest", **({"probes": probes} if probes else {})}
    return {"stack": stack, "mode": "longest", **({"device": probes[0]["device"]} if probes else {}),
            "cap_gib": args.cap_gib, "longest_seq_len": good, "searched_up_to": args.max_seq_len,
            **({"predicted_longest_seq_len": predicted} if predicted else {}),
            **({"first_probe": first} if first else {}), "probes": probes}


class StackFailed(Exception):
    """A worker of a longest-sequence search ended with an error (not running out of memory, which a probe
    reports): the search stops, and its row is the worker's."""

    def __init__(self, row: dict) -> None:
        super().__init__(row.get("error", row.get("skipped")))
        self.row = row


def run_worker(stack: str, args: argparse.Namespace, config: dict, batches_path: Path, tree: Optional[Path],
               stderr_path: Path, timeout_s: float) -> dict:
    """One worker process of `stack` for `args.mode`, its stderr appended to `stderr_path`: its result, or a row
    with its error; raises subprocess.TimeoutExpired after `timeout_s`, and CallEnded on SIGTERM (either kills it)."""
    from qlora_trainer.hardware import ALLOCATOR_SETTINGS

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config))
        script = tree / "benchmarks" / Path(__file__).name if tree else __file__
        command = [sys.executable, str(script), "--worker", stack, "--worker-config", str(config_path),
                   "--batches", str(batches_path), "--mode", args.mode, "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--cap-gib", str(args.cap_gib), "--max-seq-len", str(args.max_seq_len),
                   "--warm-up-steps", str(args.warm_up_steps), "--rank", str(args.rank), "--targets", args.targets,
                   "--out", str(out), *(["--predict-only"] if getattr(args, "predict_only", False) else [])]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
        if stack in OURS or stack in ENGINE:  # the allocator settings our command line sets
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTINGS)
        if stack == "unsloth" and os.environ.get("UNSLOTH_SITE"):  # Unsloth's own packages, for its process alone
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["UNSLOTH_SITE"], env.get("PYTHONPATH")]))
        start = stderr_path.stat().st_size if stderr_path.exists() else 0
        with open(stderr_path, "a") as stderr:
            process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                     timeout=timeout_s, env=env)
        with open(stderr_path, "rb") as log:  # this worker's part of the log (bytes: progress bars are not ASCII)
            log.seek(start)
            stderr_text = log.read().decode(errors="replace")
        if process.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        if "ModuleNotFoundError" in stderr_text and stack == "unsloth":
            return {"stack": stack, "mode": args.mode, "skipped": "unsloth is not importable"}
        errors = [line for line in stderr_text.splitlines() if "Error" in line]  # the exception, not the hint
        sys.stderr.write(f"{stack} failed; the end of its stderr:\n{stderr_text[-3000:]}\n")
        return {"stack": stack, "mode": args.mode,
                "error": (errors or stderr_text.strip().splitlines() or ["?"])[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b", help="preset name or folder with config.json")
    parser.add_argument("--mode", choices=("speed", "longest", "probe", "profile", "snapshot"), default="speed")
    parser.add_argument("--stacks", default=",".join(STACKS),
                        help="comma-separated; STACK@DIR runs that stack from the checkout in DIR (e.g. a branch's "
                             "files from `git archive`), beside this checkout's stacks in the same call")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="speed, probe: the length; longest: where the peers' search starts")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cap-gib", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every stack (alpha = 2 x rank)")
    parser.add_argument("--targets", choices=tuple(ADAPTED), default="qkvo", help="the linear layers adapted")
    parser.add_argument("--max-seq-len", type=int, default=49152, help="longest: search no further")
    parser.add_argument("--first-probe", type=int, default=0,
                        help="longest: the first length ours probes (default: the planner's predicted longest)")
    parser.add_argument("--warm-up-steps", type=int, default=2,
                        help="snapshot: the steps before the one traced (0: a run's first step)")
    parser.add_argument("--timeout-s", type=int, default=300,
                        help="per stack; a stack stopped by it, or by SIGTERM to this script (e.g. from `timeout`; "
                        "the script then exits 124), still gets its row")
    parser.add_argument("--doc-words", help="MIN,MAX: synthetic documents of MIN to MAX words (default 400 each)")
    parser.add_argument("--out", type=Path, help="JSONL the results are appended to; each worker's stderr is kept "
                        "beside it (OUT.STACK.log)")
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--predict-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args, json.loads(args.worker_config.read_text()), args.batches)
        args.out.write_text(json.dumps(result))
        return
    stacks = []  # (stack, the checkout it runs from: None for this one); STACK@DIR: from the checkout in DIR
    for entry in args.stacks.split(","):
        stack, _, tree_dir = entry.partition("@")
        if stack not in STACKS:
            parser.error(f"--stacks: unknown stack {stack}; choose from {', '.join(STACKS)}")
        if tree_dir and not (Path(tree_dir) / "qlora_trainer").is_dir():
            parser.error(f"--stacks {entry}: {tree_dir} holds no checkout (no qlora_trainer folder)")
        stacks.append((stack, Path(tree_dir).resolve() if tree_dir else None))
    import torch

    from measure_training import WORK, synthetic_data
    from qlora_trainer.bench.random_model import random_checkpoint_in_subprocess

    model_dir = random_checkpoint_in_subprocess(args.model)
    data_path = synthetic_documents(*map(int, args.doc_words.split(","))) if args.doc_words else synthetic_data()
    batches_path = WORK / "vs-reference-batches.pt"
    settings = {"rank": args.rank, "targets": args.targets, "cap_gib": args.cap_gib}  # every stack of ours alike
    torch.save(token_batches(ours_config(model_dir, data_path, args.seq_len, args.steps, {}, WORK, **settings),
                             args.steps),
               batches_path)  # what `train` feeds ours, for the peers (on the CPU: this process holds no GPU)
    end_stacks_on_sigterm()
    for stack, tree in stacks:
        config = ours_config(model_dir, data_path, args.seq_len, args.steps, {**OURS, **ENGINE}.get(stack, {}),
                             WORK / f"vs-reference-{stack}{'-' + tree.name if tree else ''}", **settings)
        record = run_stack(stack, args, config, batches_path, tree) | {"model": args.model,
                                                                       **({"tree": str(tree)} if tree else {})}
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        print(record.pop("profile", ""))
        print(json.dumps({k: v for k, v in record.items() if k not in ("losses", "step_speeds")}), flush=True)
        if record.get("ended"):
            sys.exit(124)  # as `timeout` reports it; the stacks after this one never ran


if __name__ == "__main__":
    main()
