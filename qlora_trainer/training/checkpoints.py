"""Checkpoints: atomic writes (temp folder, checksums, rename), verified resume, keeping the newest K."""

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from qlora_trainer.engine.distributed import load_sharded

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    examples_done: int  # data position: training examples consumed since the start
    tokens_seen: int  # label-bearing input tokens consumed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Checksum every file under `folder`; the manifest is written last, so its presence marks completeness."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    checksums = {str(p.relative_to(folder)): _sha256(p) for p in files}
    manifest = folder / MANIFEST
    with open(manifest, "w") as handle:
        json.dump({"sha256": checksums}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def verify_manifest(folder: Path) -> Optional[str]:
    """None when every file matches its checksum, else why not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        checksums = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if _sha256(path) != expected:
            return f"checksum mismatch in {name}"
    return None


def replace_folder_atomically(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` folder to `final`; an old `final` is dropped only after the new one is in place."""
    old = final.with_name(_TMP_PREFIX + "old-" + final.name)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain lists (so it loads with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: TrainerState, model: nn.Module, optimizer, scheduler,
                    keep_last: int, scaler: Optional[torch.amp.GradScaler] = None,
                    adapter_state: Optional[dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[dict] = None) -> Path:
    """Write step-N atomically and prune all but the newest `keep_last` complete checkpoints. `adapter_state` and
    `optimizer_state`: the adapter's weights and the optimizer's state where the model and the optimizer do not hold
    them whole (FSDP: engine/distributed.py `adapter_state`, `optimizer_state`)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:07d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
    torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if scaler is not None:  # fp16: the loss scale, so a resumed run scales as the unbroken one would
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
    write_manifest(tmp)
    replace_folder_atomically(tmp, final)
    for stale in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """step-N folders with a manifest, oldest first (checksums are checked only when one is loaded)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


@dataclass(frozen=True)
class CheckpointScan:
    """What a run's checkpoints folder holds, read without changing anything in it."""

    newest_valid: Optional[Path]  # the newest checkpoint whose files all match their checksums
    broken: tuple[tuple[Path, str], ...]  # checkpoints newer than newest_valid (all, when it is None), with why
    unfinished: tuple[Path, ...]  # temp folders of writes that never finished: never renamed, never used


def scan_checkpoints(run_dir: Path) -> CheckpointScan:
    """Verify checkpoints newest first, down to the first whose checksums all match; nothing is removed."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return CheckpointScan(None, (), ())
    unfinished = tuple(sorted(root.glob(f"{_TMP_PREFIX}*")))
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)),
        key=lambda p: int(p.name[len(_PREFIX):]),
        reverse=True,
    )
    broken = []
    for folder in candidates:
        problem = verify_manifest(folder)
        if problem is None:
            return CheckpointScan(folder, tuple(broken), unfinished)
        broken.append((folder, problem))
    return CheckpointScan(None, tuple(broken), unfinished)


def discard_unusable(scan: CheckpointScan) -> None:
    """Warn about each broken checkpoint passed over, and remove (with a warning) the temp folders of unfinished
    writes."""
    for unfinished in scan.unfinished:
        warnings.warn(f"checkpoint {unfinished} ignored and removed: its write did not finish", stacklevel=3)
        shutil.rmtree(unfinished, ignore_errors=True)
    for folder, problem in scan.broken:
        warnings.warn(f"checkpoint {folder} ignored: {problem}", stacklevel=3)


def latest_valid_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint whose files all match their checksums; broken ones are skipped with a warning, and
    temp folders of unfinished writes are removed with one."""
    scan = scan_checkpoints(run_dir)
    discard_unusable(scan)
    return scan.newest_valid


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler,
                    scaler: Optional[torch.amp.GradScaler] = None,
                    sharded: Optional[nn.Module] = None) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from a verified checkpoint. `sharded`: under FSDP, the
    wrapped module whose shards take the whole adapter and optimizer state the checkpoint holds (every rank calls
    this: engine/distributed.py `load_sharded`)."""
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    if sharded is not None:
        unexpected = load_sharded(sharded, model, optimizer, weights, optimizer_state)
    else:
        unexpected = getattr(set_peft_model_state_dict(model, weights), "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} holds weights this adapter lacks: {unexpected[:3]}")
    if sharded is None:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text()))
