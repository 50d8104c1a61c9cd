"""What is alive at a CUDA memory peak, by the code that allocated it: the events of a CUDA caching-allocator trace
(`torch.cuda.memory._record_memory_history()`, then `torch.cuda.memory._snapshot()["device_traces"]`) replayed to
their peak of allocated bytes, and the blocks alive then grouped by the innermost frame of our code or of a library
that matters for memory (transformers, peft, bitsandbytes, Liger-Kernel, torch.compile's generated code).

benchmarks/vs_reference.py --mode snapshot records one training step this way (on the GPU machine); the planner's
breakdown (planner/memory.py) is calibrated on totals, and this says which tensors make the peak.
"""

from collections import defaultdict
from typing import Iterable

# Where a frame is worth naming: the first match from the innermost frame outwards names the allocation.
SITES = ("qlora_trainer/", "/transformers/", "/peft/", "/bitsandbytes/", "/liger_kernel/", "torchinductor",
         "/torch/_inductor/", "/torch/utils/checkpoint.py", "/torch/nn/functional.py", "/torch/optim/")


def site(frames: list[dict]) -> str:
    """`file:line:function` of the innermost frame in SITES (the innermost frame of all where none is)."""
    for frame in frames:
        if any(part in frame["filename"] for part in SITES):
            return f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']}:{frame['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']}:{frames[0]['name']}" if frames else "?"


def _replay(events: list[dict]) -> Iterable[tuple[int, int, dict]]:
    """(index, allocated bytes after it, live blocks by address) for every event: a block counts from its `alloc`
    to its `free_completed` (the allocator may reuse it from then on, as torch.cuda.memory_allocated counts)."""
    live: dict[int, dict] = {}
    allocated = 0
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            allocated += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            allocated -= live.pop(event["addr"])["size"]
        yield index, allocated, live


def peak_composition(events: list[dict], top: int = 25) -> dict:
    """The peak of allocated bytes over `events` (blocks allocated before the trace started are not seen), and the
    blocks alive at its first moment: bytes by site, largest first, the rest summed."""
    peak_index, peak = -1, 0
    for index, allocated, _ in _replay(events):
        if allocated > peak:
            peak_index, peak = index, allocated
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for index, _, live in _replay(events):
        if index == peak_index:
            for block in live.values():
                entry = by_site[site(block.get("frames", []))]
                entry[0] += 1
                entry[1] += block["size"]
            break
    ranked = sorted(by_site.items(), key=lambda item: -item[1][1])
    rest = ranked[top:]
    sites = [{"site": name, "blocks": count, "bytes": size} for name, (count, size) in ranked[:top]]
    if rest:
        sites.append({"site": f"{len(rest)} other sites", "blocks": sum(c for _, (c, _) in rest),
                      "bytes": sum(s for _, (_, s) in rest)})
    return {"traced_peak_bytes": peak, "peak_event": peak_index, "sites": sites}
