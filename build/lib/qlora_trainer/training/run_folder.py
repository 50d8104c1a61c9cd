"""A run's output folder: refusing to write over an earlier run, run_config.json, metrics.jsonl and the final adapter."""

import json
import shutil
from pathlib import Path

from torch import nn

from qlora_trainer.errors import UserError
from qlora_trainer.spec import RunSpec, spec_to_dict
from qlora_trainer.training.checkpoints import CHECKPOINTS, replace_folder_atomically

METRICS = "metrics.jsonl"
ADAPTER = "adapter"
RUN_CONFIG = "run_config.json"
_RUN_ARTIFACTS = (METRICS, ADAPTER, RUN_CONFIG, CHECKPOINTS)


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write over an earlier run unless asked; --overwrite removes only this tool's artifacts."""
    existing = [name for name in _RUN_ARTIFACTS if (output_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise UserError(
            f"output.dir: {output_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir"
        )
    if existing and overwrite and not resume:
        for name in existing:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def write_run_config(output_dir: Path, spec: RunSpec) -> None:
    """The specification as it runs (after the planner's choices), beside the run."""
    (output_dir / RUN_CONFIG).write_text(json.dumps(spec_to_dict(spec), indent=1))


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended as the run goes."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / METRICS

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, last_step: int) -> None:
        """On resume, drop records of steps after the checkpoint, so the file reads as one run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= last_step]
        self.path.write_text("".join(line + "\n" for line in kept))


def save_final_adapter(peft_model: nn.Module, output_dir: Path) -> Path:
    """output_dir/adapter in standard PEFT format, replaced atomically."""
    final = output_dir / ADAPTER
    tmp = output_dir / f".tmp-{ADAPTER}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp)
    replace_folder_atomically(tmp, final)
    return final

