"""Command-line entry point: argument parsing only; each subcommand calls one function elsewhere, imported when it
runs, so `--help` answers without loading torch."""

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Union

from qlora_trainer import __version__
from qlora_trainer.bench.methods import METHODS
from qlora_trainer.errors import UserError
from qlora_trainer.hardware import GPU_CATALOGUE, configure_allocator
from qlora_trainer.planner import LONGEST_SEQ_LEN
from qlora_trainer.presets import preset_names
from qlora_trainer.quiet import quiet_third_party

DESCRIPTION = ("Fine-tune a language model on one small GPU: a frozen 4-bit base with LoRA, LoHa or LoKr adapters. "
               "plan-memory says before you start whether and how a run fits your GPU.")


def _train(args: argparse.Namespace) -> int:
    from qlora_trainer.spec import load_spec

    overrides = list(args.set)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    spec = load_spec(Path(args.config), overrides, args.output_dir)
    from qlora_trainer.training.recipe import Interrupted, summary, train  # heavy imports once the spec is valid

    try:
        result = train(spec, resume=args.resume, show_progress=not args.no_progress, force=args.force)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    if result.is_main:  # several processes: rank 0 alone speaks for the run
        print("\n".join(summary(result).lines()))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from qlora_trainer.export.merge import merge

    out = merge(args.model, Path(args.adapter), Path(args.out), args.quant, args.overwrite)
    print(f"merged model written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from qlora_trainer.export.gguf import export_gguf  # a one-line UserError where the gguf extra is missing

    out = export_gguf(args.model, Path(args.adapter), Path(args.out), args.type, args.quant, args.overwrite)
    print(f"{args.type} GGUF written to {out}")
    return 0


def _file(text: str) -> str:
    """A file argument; an empty one is refused, since Path("") would quietly mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a file name such as model.gguf")
    return text


def _folder(text: str) -> str:
    """A folder argument; an empty one is refused, since Path("") would quietly mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a folder")
    return text


def _parse_adapter(text: str) -> tuple[str, Path]:
    """[NAME=]PATH; without a name, the folder's own name (its parent's for a folder named adapter)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = name
        folder = Path(os.path.abspath(path))  # so that "." and "../x/" name their folders
        name = folder.parent.name if folder.name == "adapter" else folder.name
    if not path.strip():
        raise UserError(f"--adapter {text!r}: no adapter folder given; use [NAME=]PATH")
    if not name or "." in name:  # torch refuses such module names when peft loads the adapter
        raise UserError(f"--adapter {text}: adapter name {name!r} is empty or holds a '.'; "
                        "use NAME=PATH with a name such as lora-v2")
    return name, Path(path)


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt and not args.chat:
        raise UserError("the following arguments are required: --prompt (or --chat, to type prompts on stdin)")
    adapters = [_parse_adapter(a) for a in args.adapter]
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter: names must be unique, got {', '.join(names)}; use NAME=PATH")
    if args.chat and args.prompt:
        raise UserError("--chat: reads its messages from stdin, one per line; drop --prompt")
    if args.chat and len(adapters) > 1:
        raise UserError(f"--chat: talks to one adapter, got {len(adapters)} ({', '.join(names)}); give one --adapter")
    if args.chat and args.with_base:
        raise UserError("--chat: talks to one model, the adapter or (without --adapter) the base; drop --with-base")
    from qlora_trainer.export.generate import chat, generate, stdin_messages

    one_continuation = len(adapters) + args.with_base <= 1 and len(args.prompt) <= 1
    stream = args.stream if args.stream is not None else (one_continuation and sys.stdout.isatty())
    options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw,
                   input_text=args.input, stream=stream)
    if args.chat:
        for reply in chat(args.model, adapters[0] if adapters else None, stdin_messages(), args.max_new_tokens,
                          args.quant, **options):
            if not reply.streamed:
                print(reply.text, flush=True)
        return 0
    for generation in generate(args.model, adapters, args.prompt, args.max_new_tokens, args.quant, args.with_base,
                               **options):
        if not generation.streamed:
            print(f"[{generation.adapter}] {generation.text}", flush=True)
    return 0


def _plan_memory(args: argparse.Namespace) -> int:
    from qlora_trainer.planner.report import run_plan_memory

    return run_plan_memory(args)


def _bench(args: argparse.Namespace) -> int:
    from qlora_trainer.bench.run import run_bench_command

    return run_bench_command(args)


def seq_len_argument(text: str) -> Union[int, str]:
    """plan-memory's --seq-len: a number of tokens, or `longest`."""
    if text == LONGEST_SEQ_LEN:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of tokens or {LONGEST_SEQ_LEN}") from None


def add_plan_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model",
                        help=f"model folder (config.json is enough) or preset: {', '.join(preset_names())} "
                             "(default: --config's model.path)")
    parser.add_argument("--config", metavar="FILE",
                        help="a run config (YAML, as `train` reads it): its keys are kept, the flags below override "
                             "them; planned where it says training.plan: auto, else estimated as written")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu", help=f"a catalogue GPU: {', '.join(GPU_CATALOGUE)} (default: the GPU here)")
    budget.add_argument("--vram", type=float, metavar="GIB", help="the GPU's memory in GiB, for any card")
    parser.add_argument("--seq-len", type=seq_len_argument,
                        help="tokens per sequence (default 2048, or the config's), or `longest`: the longest "
                             "sequence that fits, in steps of 1,024, up to the model's max_position_embeddings")
    parser.add_argument("--batch-size", type=int,
                        help="effective batch: sequences per optimizer step, kept through accumulation (default 16, "
                             "or the config's micro-batch x accumulation)")
    parser.add_argument("--micro-batch-size", type=int, help="fix the micro-batch (default: chosen)")
    parser.add_argument("--rank", type=int, help="fix the adapter rank (default: chosen)")
    parser.add_argument("--alpha", type=float, help="fix lora_alpha (default 2 x rank)")
    parser.add_argument("--targets", help="fix the targets: attn | mlp | all-linear | q_proj,v_proj,... "
                                          "(default: chosen)")
    parser.add_argument("--grad-ckpt", choices=("on", "off", "auto"), default="auto",
                        help="gradient checkpointing (default auto: chosen)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"),
                        help="fix the optimizer (default: chosen)")
    parser.add_argument("--quant", choices=("nf4", "fp4", "int8", "none"),
                        help="how the base is stored (default nf4, or the config's)")
    parser.add_argument("--adapter", choices=("lora", "loha", "lokr"),
                        help="adapter type (default lora, or the config's)")
    parser.add_argument("--adapter-dtype", choices=("float32", "bfloat16"),
                        help="(default float32, or the config's)")
    parser.add_argument("--gpus", metavar="N|auto",
                        help="plan a run on N cards of the --gpu/--vram kind (torchrun): each GPU's memory and the "
                             "host RAM; auto: the fewest cards, 1 to 8, that fit (default: one GPU)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"),
                        help="with --gpus: ddp (every GPU holds the whole 4-bit model) or fsdp (sharded across GPUs); "
                             "default: ddp when the model fits one GPU, else fsdp, else fsdp with CPU offload")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="with --strategy fsdp: sharded parameters, gradients and optimizer states in host RAM")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or preset name (qlora_trainer/presets)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the architecture with random weights (no download; memory and speed are the same)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch")
    parser.add_argument("--methods", default="full,full-8bit,lora,qlora", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="adapter targets: attn | mlp | all-linear")
    parser.add_argument("--steps", type=int, default=6, help="steps per method (two warm-up, the rest timed)")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="emulate a smaller card (e.g. 15 for a T4)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and vram.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"qlora-trainer {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own warnings, logs and progress bars (off by default)")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan-memory", help="predict peak VRAM and pick a plan that fits a GPU (no GPU needed)")
    add_plan_memory_arguments(plan)
    plan.set_defaults(func=_plan_memory)

    bench = sub.add_parser("bench", help="measure full fine-tuning vs LoRA vs QLoRA and write a VRAM report")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="train an adapter on a 4-bit base")
    train.add_argument("--config", required=True, help="run config (YAML)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. training.learning_rate=2e-4 (repeatable)")
    train.add_argument("--output-dir", help="sets output.dir")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train.add_argument("--force", action="store_true", help="train even when the planner predicts it will not fit")
    train.set_defaults(func=_train)

    merge = sub.add_parser("merge", help="merge an adapter into a dequantized 16-bit copy of the base")
    merge.add_argument("--model", required=True, type=_folder, help="base model folder")
    merge.add_argument("--adapter", required=True, type=_folder, help="adapter folder (output_dir/adapter)")
    merge.add_argument("--out", required=True, type=_folder, help="folder for the merged model")
    merge.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4",
                       help="how the base was quantized in training (default nf4)")
    merge.add_argument("--overwrite", action="store_true", help="replace an earlier merge in --out")
    merge.set_defaults(func=_merge)

    export = sub.add_parser("export", help="merge an adapter into its base and write one GGUF file (llama.cpp, Ollama)")
    export.add_argument("--format", required=True, choices=["gguf"], help="output format: gguf (llama.cpp, Ollama)")
    export.add_argument("--model", required=True, type=_folder, help="base model folder (Llama, Mistral or Qwen2)")
    export.add_argument("--adapter", required=True, type=_folder, help="adapter folder (output_dir/adapter)")
    export.add_argument("--out", required=True, type=_file, help="the GGUF file to write, e.g. model.gguf")
    export.add_argument("--type", choices=["f16", "q8_0"], default="f16",
                        help="weights as f16, or as llama.cpp's 8-bit q8_0 blocks (about half the size; default f16)")
    export.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4",
                        help="how the base was quantized in training (default nf4)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="generate with the base and one or more adapters",
                         description="Generate with the base and one or more adapters. Each adapter that train "
                                     "wrote gets every prompt in the format it was trained on (qlora_trainer_prompt"
                                     ".json beside its weights): an alpaca adapter the prompt as the instruction in "
                                     "its prompt template, a chat or sharegpt adapter the prompt as one user turn "
                                     "after its system prompt, through its chat template. Other adapters, "
                                     "text-format ones and --raw get the prompt as given.")
    gen.add_argument("--model", required=True, type=_folder, help="base model folder")
    gen.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                     help="adapter folder; repeat to compare adapters on one loaded base, each with its own prompt "
                          "format")
    gen.add_argument("--prompt", action="append", default=[],
                     help="the instruction (alpaca adapters) or user message (chat and sharegpt adapters); the "
                          "whole prompt text for other adapters and with --raw (repeatable)")
    gen.add_argument("--input", metavar="TEXT",
                     help="alpaca adapters only: the text for the template's {input} (its Input section)")
    gen.add_argument("--raw", action="store_true", help="send each prompt exactly as given, without the adapters' "
                                                        "training format")
    gen.add_argument("--chat", action="store_true",
                     help="talk to one adapter (or the base): read messages from stdin, one per line, until an "
                          "empty line or end of input, and print each reply. A chat or sharegpt adapter keeps the "
                          "conversation; an alpaca adapter takes each line as a fresh instruction")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy, always the likeliest token; above 0: sample at this temperature")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="when sampling, draw from the likeliest tokens whose probabilities add up to P, 0 < P <= 1 "
                          "(default 1: all)")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed for sampling, set afresh for each continuation: the same seed gives the same text "
                          "(default 0)")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                     help="print the text as it is generated (default: when stdout is a terminal and there is one "
                          "continuation: one prompt, one adapter or the base)")
    gen.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4")
    gen.add_argument("--with-base", action="store_true",
                     help="also generate with the adapters disabled; the base gets the first adapter's prompt format")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_allocator()
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_third_party()
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started (training turns it into a checkpoint and exit 130)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`plan-memory ... | head`): nothing more to tell it, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail too
        return 1


def entry() -> None:
    """The process's entry point (`qlora-trainer`, `python -m qlora_trainer`): main()'s exit code. A process of a
    several-process run (torchrun, accelerate launch) leaves without running destructors, once its files are written
    and its output flushed: freeing its process group at exit can deadlock (engine/distributed.py `_HELD`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(main())
    try:
        code = main()
    except SystemExit as stop:  # a rank that takes rank 0's refusal leaves with its exit code
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # a programming error: its traceback, as Python would print it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
