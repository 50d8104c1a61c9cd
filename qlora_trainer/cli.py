"""Command-line entry point: argument parsing only; each subcommand calls one function elsewhere."""

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from qlora_trainer.errors import UserError
from qlora_trainer.hardware import configure_allocator


def _train(args: argparse.Namespace) -> int:
    from qlora_trainer.spec import load_spec

    overrides = list(args.set)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    spec = load_spec(Path(args.config), overrides, args.output_dir)
    from qlora_trainer.training.recipe import Interrupted, train  # heavy imports only once the spec is valid

    try:
        result = train(spec, resume=args.resume, show_progress=not args.no_progress, force=args.force)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    print(f"adapter written to {result.adapter_dir} after {result.final_step} steps")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from qlora_trainer.export.merge import merge

    out = merge(args.model, Path(args.adapter), Path(args.out), args.quant, args.overwrite)
    print(f"merged model written to {out}")
    return 0


def _parse_adapter(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        path = name
        name = Path(text.rstrip("/")).name
        if name == "adapter":
            name = Path(text.rstrip("/")).parent.name or "adapter"
    return name, Path(path)


def _generate(args: argparse.Namespace) -> int:
    from qlora_trainer.export.generate import generate

    adapters = [_parse_adapter(a) for a in args.adapter]
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter: names must be unique, got {', '.join(names)}; use NAME=PATH")
    for generation in generate(args.model, adapters, args.prompt, args.max_new_tokens, args.quant, args.with_base):
        print(f"[{generation.adapter}] {generation.text}")
    return 0


def _plan_memory(args: argparse.Namespace) -> int:
    from qlora_trainer.planner.report import run_plan_memory

    return run_plan_memory(args)


def _bench(args: argparse.Namespace) -> int:
    from qlora_trainer.bench.run import run_bench_command

    return run_bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    from qlora_trainer.bench.run import add_bench_arguments
    from qlora_trainer.planner.report import add_plan_memory_arguments

    parser = argparse.ArgumentParser(prog="qlora-trainer", description=__doc__)
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
    merge.add_argument("--model", required=True, help="base model folder")
    merge.add_argument("--adapter", required=True, help="adapter folder (output_dir/adapter)")
    merge.add_argument("--out", required=True, help="folder for the merged model")
    merge.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4",
                       help="how the base was quantized in training (default nf4)")
    merge.add_argument("--overwrite", action="store_true", help="replace an earlier merge in --out")
    merge.set_defaults(func=_merge)

    gen = sub.add_parser("generate", help="generate with the base and one or more adapters")
    gen.add_argument("--model", required=True, help="base model folder")
    gen.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                     help="adapter folder; repeat to compare adapters on one loaded base")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4")
    gen.add_argument("--with-base", action="store_true", help="also generate with the adapters disabled")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_allocator()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started (training turns it into a checkpoint and exit 130)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
