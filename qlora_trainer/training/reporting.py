"""What a run tells its user as it goes: the progress bar or, without it, one line per logged step; eval losses;
TensorBoard scalars where asked; and the closing summary.

metrics.jsonl (run_folder.py) stays the complete record; this module only shows it. Memory figures appear only on
a GPU (on the CPU there is no VRAM to report).
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

GIB = 2**30
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl keys shown as TensorBoard scalars, under these tags
SCALARS = {"loss": "train/loss", "eval_loss": "eval/loss", "learning_rate": "train/learning_rate",
           "grad_norm": "train/grad_norm", "tokens_per_second": "train/tokens_per_second",
           "peak_vram_bytes": "memory/peak_reserved_gib"}


def step_line(record: dict, max_steps: int) -> str:
    """One logged step as a terminal line, e.g. `step 10/60  loss 2.3412  lr 3.00e-03  grad 1.23  812 tok/s`."""
    parts = [f"step {record['step']}/{max_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['learning_rate']:.2e}", f"grad {record['grad_norm']:.3g}",
             f"{record['tokens_per_second']:,.0f} tok/s"]
    if record.get("peak_vram_bytes"):
        parts.append(f"vram {record['peak_vram_bytes'] / GIB:.2f} GiB")
    return "  ".join(parts)


class RunReporter:
    """The terminal and, if asked, TensorBoard, for the steps of one run."""

    def __init__(self, max_steps: int, start_step: int, show_progress: bool, tensorboard_dir: Optional[Path]):
        self.max_steps = max_steps
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train") if show_progress else None
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (an extra)

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, line: str) -> None:
        """A message to stderr that does not break the progress bar."""
        (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def step(self, loss: float, tokens_per_second: float, record: Optional[dict]) -> None:
        """After every step; `record` is the metrics.jsonl record when this step is logged."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
        elif record is not None and "loss" in record:
            print(step_line(record, self.max_steps), flush=True)
        if record is not None:
            self._scalars(record)

    def eval(self, step: int, loss: float) -> None:
        line = f"eval at step {step}: loss {loss:.4f}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _scalars(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, value / GIB if key == "peak_vram_bytes" else value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass(frozen=True)
class Summary:
    """The figures of the closing summary."""

    steps: int
    adapter_dir: Path
    last_loss: Optional[float]
    eval_loss: Optional[float]
    best_eval: Optional[tuple[int, float]]  # (step, loss) of the lowest eval loss of this run
    tokens_per_second: Optional[float]
    peak_reserved_bytes: Optional[int]  # GPU only

    def lines(self) -> list[str]:
        figures = [f"{self.steps} steps"]
        if self.last_loss is not None:
            figures.append(f"last loss {self.last_loss:.4f}")
        if self.eval_loss is not None:
            figures.append(f"eval loss {self.eval_loss:.4f}")
        if self.best_eval is not None and self.best_eval[1] != self.eval_loss:
            figures.append(f"best eval loss {self.best_eval[1]:.4f} at step {self.best_eval[0]}")
        if self.tokens_per_second:
            figures.append(f"{self.tokens_per_second:,.0f} tokens/s (median)")
        if self.peak_reserved_bytes:
            figures.append(f"peak VRAM {self.peak_reserved_bytes / GIB:.2f} GiB")
        return ["done: " + ", ".join(figures), f"adapter: {self.adapter_dir}"]
