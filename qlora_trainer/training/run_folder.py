"""A run's output folder: what a run writes there (run_config.json, the data's fingerprint, metrics.jsonl, the final
adapter, beside checkpoints/), and an earlier run kept aside while `--overwrite` replaces it.

Replacing is a sequence of renames inside the folder, each one a state the next start can finish if the process
is killed: the earlier run's files go to `.tmp-moving-aside/`, which becomes `.replaced-run/` once all are in;
the new run's first checkpoint drops it; a new run that ends before that is removed and `.replaced-run/` goes
back through `.tmp-moving-back/`.
"""

import hashlib
import json
import os
import shutil
import sys
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from torch import nn

from qlora_trainer.errors import UserError
from qlora_trainer.spec import RunSpec, spec_to_dict
from qlora_trainer.training.checkpoints import (CHECKPOINTS, complete_checkpoints, fsync_dir,
                                                replace_folder_atomically)

METRICS = "metrics.jsonl"
ADAPTER = "adapter"
RUN_CONFIG = "run_config.json"
DATA_FINGERPRINT = "data_fingerprint.json"
RUN_ARTIFACTS = (METRICS, ADAPTER, RUN_CONFIG, DATA_FINGERPRINT, CHECKPOINTS)  # all a run writes; nothing else
_MOVING_ASIDE, _ASIDE, _MOVING_BACK = ".tmp-moving-aside", ".replaced-run", ".tmp-moving-back"


def output_dir_of(spec: RunSpec) -> Path:
    """The run's folder; an empty output.dir would silently mean the current directory."""
    if not spec.output.dir.strip():
        raise UserError("output.dir: empty; give the folder for the run's checkpoints, metrics and adapter")
    return Path(spec.output.dir)


def existing_artifacts(output_dir: Path) -> list[str]:
    return [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]


def data_fingerprint(examples: list[dict[str, list[int]]]) -> str:
    """sha256 of the training examples in order: the data file, format, masking, tokenizer and split all in one."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            digest.update(key.encode())
            digest.update(array("q", example[key]).tobytes())
    return digest.hexdigest()


def write_run_record(output_dir: Path, spec: RunSpec, train_sha256: str, world_size: int = 1) -> None:
    """The specification as it runs (after the planner's choices), the fingerprint of its training examples and the
    number of processes that share each step (examples per step = micro-batch x accumulation x world size), beside
    the run: what a resume is checked against."""
    (output_dir / RUN_CONFIG).write_text(json.dumps(spec_to_dict(spec), indent=1))
    (output_dir / DATA_FINGERPRINT).write_text(json.dumps({"train_sha256": train_sha256, "world_size": world_size}))


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"output.dir: cannot read {path} ({err}); restore it, or pass --overwrite to start over") \
            from None
    if not isinstance(raw, dict):
        raise UserError(f"output.dir: {path} is not a mapping; restore it, or pass --overwrite to start over")
    return raw


def read_run_config(output_dir: Path) -> Optional[dict]:
    """The saved run_config.json as a plain mapping, None when there is none."""
    return _read_json(output_dir / RUN_CONFIG)


def read_world_size(output_dir: Path) -> int:
    """The number of processes the run trained with (1 for a run written before it was kept)."""
    saved = _read_json(output_dir / DATA_FINGERPRINT)
    return int(saved.get("world_size", 1)) if saved else 1


def read_data_fingerprint(output_dir: Path) -> Optional[str]:
    """The saved training examples' sha256, None for a run written before fingerprints were kept."""
    saved = _read_json(output_dir / DATA_FINGERPRINT)
    return saved.get("train_sha256") if saved else None


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


def save_final_adapter(peft_model: nn.Module, output_dir: Path, prompt_format: Optional[dict] = None,
                       adapter_state: Optional[dict] = None) -> Path:
    """output_dir/adapter in standard PEFT format, replaced atomically, with the prompt format the run trained on
    beside the weights (qlora_trainer_prompt.json, which `generate` writes its prompts in): `prompt_format` as
    export/generate.py's `prompt_format` makes it, or by default made from the run's run_config.json.
    `adapter_state`: the weights where the model does not hold them whole (FSDP)."""
    final = output_dir / ADAPTER
    tmp = output_dir / f".tmp-{ADAPTER}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp, state_dict=adapter_state)
    _save_prompt_format(tmp, output_dir, prompt_format)
    replace_folder_atomically(tmp, final)
    return final


def _save_prompt_format(adapter_dir: Path, output_dir: Path, prompt_format: Optional[dict]) -> None:
    """qlora_trainer_prompt.json in adapter_dir. Nothing here may cost the run its adapter: where the format cannot
    be made, a warning says so and the adapter is saved without it (generate then sends prompts as given)."""
    from qlora_trainer.export.generate import PROMPT_FILE, prompt_format as make_prompt_format  # only needed here

    try:
        if prompt_format is None:
            from qlora_trainer.engine.base import load_tokenizer
            from qlora_trainer.spec import spec_from_dict

            saved = read_run_config(output_dir)
            if saved is None:
                return
            spec = spec_from_dict(saved)
            prompt_format = make_prompt_format(spec.data, load_tokenizer(spec.model))
        (adapter_dir / PROMPT_FILE).write_text(json.dumps(prompt_format, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    except Exception as err:  # noqa: BLE001 (any failure: the adapter is worth more than its prompt file)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"warning: {PROMPT_FILE} not written beside the adapter ({reason}); generate will send its prompts "
              "as given, so write them in the training format yourself", file=sys.stderr)


# --- replacing an earlier run (--overwrite) ---------------------------------------------------------------------

def _move_artifacts(source: Path, target: Path) -> None:
    for name in RUN_ARTIFACTS:
        if (source / name).exists():
            os.replace(source / name, target / name)


def _remove_artifacts(folder: Path) -> None:
    for name in existing_artifacts(folder):
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _put_back(output_dir: Path) -> None:
    """Remove the new run's files and move the earlier run back from `.replaced-run/`."""
    _remove_artifacts(output_dir)
    os.replace(output_dir / _ASIDE, output_dir / _MOVING_BACK)
    _finish_moving_back(output_dir)


def _finish_moving_back(output_dir: Path) -> None:
    _move_artifacts(output_dir / _MOVING_BACK, output_dir)
    (output_dir / _MOVING_BACK).rmdir()
    fsync_dir(output_dir)


def recover_interrupted_replacement(output_dir: Path) -> None:
    """Finish a replacement whose process was killed: the earlier run back in place, or dropped where the new
    run had already written a checkpoint. Runs under the folder's lock, before anything else looks at it."""
    if (output_dir / _MOVING_ASIDE).is_dir():  # killed while moving: nothing new was written yet
        _move_artifacts(output_dir / _MOVING_ASIDE, output_dir)
        (output_dir / _MOVING_ASIDE).rmdir()
    elif (output_dir / _MOVING_BACK).is_dir():
        _finish_moving_back(output_dir)
    elif (output_dir / _ASIDE).is_dir():
        if complete_checkpoints(output_dir):
            shutil.rmtree(output_dir / _ASIDE)
            return
        _put_back(output_dir)
    else:
        return
    print(f"note: output.dir: the earlier run in {output_dir} is back in place: the run that was replacing it "
          "stopped before its first checkpoint", file=sys.stderr)


@contextmanager
def earlier_run_kept(output_dir: Path, replace: bool) -> Iterator[Callable[[], None]]:
    """With `replace`, the earlier run's files are moved aside for the block, which gets a function to call after
    each checkpoint write: the first call deletes the earlier run. If the block ends in any way before that, the
    new run's files are removed and the earlier run is put back, byte for byte."""
    if not (replace and existing_artifacts(output_dir)):
        yield lambda: None
        return
    (output_dir / _MOVING_ASIDE).mkdir()
    _move_artifacts(output_dir, output_dir / _MOVING_ASIDE)
    os.replace(output_dir / _MOVING_ASIDE, output_dir / _ASIDE)
    fsync_dir(output_dir)

    def drop_earlier_run() -> None:
        if (output_dir / _ASIDE).exists():
            shutil.rmtree(output_dir / _ASIDE)

    try:
        yield drop_earlier_run
        drop_earlier_run()  # the new run finished
    except BaseException:
        if (output_dir / _ASIDE).exists():
            _put_back(output_dir)
            print(f"note: output.dir: the earlier run in {output_dir} is kept: the new run stopped before its first "
                  "checkpoint", file=sys.stderr)
        raise
