"""How a run starts in its output folder, decided under the folder's lock and without changing anything there:
fresh, replacing an earlier run, or resumed from a checkpoint trained under the same config and data.

Which one: `--resume` resumes; else `output.overwrite` (`--overwrite`) replaces; else `training.resume: auto`
resumes; else the folder must not hold a run. `--overwrite` comes before `resume: auto` so that a config which
always resumes can still be started over.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from qlora_trainer.errors import UserError
from qlora_trainer.spec import RunSpec
from qlora_trainer.training.checkpoints import CHECKPOINTS, CheckpointScan, scan_checkpoints
from qlora_trainer.training.resume_rules import compare_for_resume
from qlora_trainer.training.run_folder import (ADAPTER, RUN_CONFIG, data_fingerprint, existing_artifacts,
                                               read_data_fingerprint, read_run_config, read_world_size)

_START_OVER = "start over with --overwrite (without --resume) or in another --output-dir"


@dataclass(frozen=True)
class RunStart:
    mode: Literal["fresh", "replace", "resume"]
    checkpoints: CheckpointScan  # resume: what checkpoints/ holds (newest_valid None: nothing trained yet, step 0)
    train_sha256: Optional[str]  # resume: the fingerprint of the examples the run trained on, where it was kept

    def check_data(self, output_dir: Path, spec: RunSpec, examples: list[dict[str, list[int]]]) -> str:
        """The fingerprint of this run's training examples; refused on resume when they are not the run's."""
        sha256 = data_fingerprint(examples)
        if self.train_sha256 is not None and sha256 != self.train_sha256:
            files = ", ".join(source.path for source in spec.data.sources())
            raise UserError(f"data.path: the training examples differ from those the run in {output_dir} trained "
                            f"on ({files} or the tokenizer changed since); restore them to resume, or {_START_OVER}")
        return sha256


def _refuse_restart(output_dir: Path, scan: CheckpointScan) -> None:
    """Resuming with no intact checkpoint would train from step 0 over what the folder holds: refused where that
    is trained work (broken checkpoints, a finished adapter)."""
    if scan.broken:
        broken = "; ".join(f"{folder.relative_to(output_dir)}: {problem}" for folder, problem in scan.broken)
        raise UserError(f"resume: no checkpoint in {output_dir / CHECKPOINTS} is intact ({broken}), so resuming "
                        f"would restart from step 0 over them; {_START_OVER}")
    if (output_dir / ADAPTER).exists():
        raise UserError(f"resume: {output_dir} holds a trained adapter but no checkpoint to continue from, so "
                        f"resuming would retrain from step 0 and replace it; {_START_OVER}")


def _check_config(output_dir: Path, spec: RunSpec) -> None:
    saved = read_run_config(output_dir)
    if saved is None:
        raise UserError(f"resume: {output_dir} has checkpoints but no {RUN_CONFIG}, so this config cannot be checked "
                        f"against the run's; restore it to resume, or {_START_OVER}")
    differences = compare_for_resume(saved, spec)
    if differences.refused:
        raise UserError(f"resume: the config differs from the run in {output_dir} in what it trains: "
                        f"{'; '.join(differences.refused)}. Set {'it' if len(differences.refused) == 1 else 'them'} "
                        f"back to resume, or {_START_OVER}")
    if differences.allowed:
        print(f"resume: changes that do not change what is trained: {'; '.join(differences.allowed)}")


def _check_world_size(output_dir: Path, spec: RunSpec, world_size: int) -> None:
    saved = read_world_size(output_dir)
    if saved != world_size:
        per_process = spec.training.micro_batch_size * spec.training.gradient_accumulation_steps
        raise UserError(f"resume: the run in {output_dir} trained with {saved} processes (world size) and this launch "
                        f"has {world_size}, so examples per step would change {per_process * saved} -> "
                        f"{per_process * world_size}; launch {saved} processes to resume, or {_START_OVER}")


def plan_start(output_dir: Path, spec: RunSpec, resume: bool, world_size: int = 1) -> RunStart:
    """How the run starts in `output_dir` (see the module docstring) for a run of `world_size` processes; a
    UserError, with nothing changed, when the folder holds a run this one may not continue or replace."""
    existing = existing_artifacts(output_dir)
    nothing = CheckpointScan(None, (), ())
    if not (resume or spec.output.overwrite) and spec.training.resume == "auto":
        resume = True
    if not resume:
        if existing and not spec.output.overwrite:
            raise UserError(f"output.dir: {output_dir} already holds a run ({', '.join(existing)}); pass --resume "
                            "to continue it, --overwrite to replace it, or choose another --output-dir")
        return RunStart("replace" if existing else "fresh", nothing, None)
    scan = scan_checkpoints(output_dir)
    if scan.newest_valid is None:
        _refuse_restart(output_dir, scan)
        return RunStart("resume", scan, None)  # nothing trained yet: from step 0
    _check_config(output_dir, spec)
    _check_world_size(output_dir, spec, world_size)
    return RunStart("resume", scan, read_data_fingerprint(output_dir))
