"""benchmarks/memory_peak.py: the peak of a caching-allocator trace and what is alive at it, on a written trace (the
GPU writes real ones)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_peak import peak_composition, site  # noqa: E402

OURS = [{"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
        {"filename": "/repo/qlora_trainer/engine/checkpointing.py", "line": 120, "name": "backward"}]
LIB = [{"filename": "/x/site-packages/torch/_tensor.py", "line": 5, "name": "backward"},
       {"filename": "/x/site-packages/liger_kernel/ops/fused_linear_cross_entropy.py", "line": 80, "name": "fwd"}]


def _event(action: str, addr: int, size: int, frames=()) -> dict:
    return {"action": action, "addr": addr, "size": size, "frames": list(frames)}


def test_the_peak_and_its_live_blocks_by_site():
    events = [
        _event("alloc", 1, 100, OURS), _event("alloc", 2, 50, LIB),
        _event("free_requested", 1, 100), _event("alloc", 3, 70, OURS),  # 1 still counts: not yet free_completed
        _event("free_completed", 1, 100), _event("alloc", 4, 10, LIB),   # 2 + 3 + 4 = 130 < 220
        _event("alloc", 5, 500, []), _event("free_completed", 5, 500),   # a block the trace saw only briefly: 630
        _event("free_completed", 99, 1000),                              # freed, allocated before the trace
    ]
    result = peak_composition(events, top=1)
    assert result["traced_peak_bytes"] == 630 and result["peak_event"] == 6
    assert result["sites"][0] == {"site": "?", "blocks": 1, "bytes": 500}
    assert result["sites"][1] == {"site": "2 other sites", "blocks": 3, "bytes": 130}
    full = peak_composition(events)["sites"]
    assert {entry["site"]: entry["bytes"] for entry in full} == {
        "?": 500, "liger_kernel/ops/fused_linear_cross_entropy.py:80:fwd": 60,
        "/repo/qlora_trainer/engine/checkpointing.py:120:backward": 70}


def test_a_site_is_the_innermost_frame_of_code_that_matters():
    assert site(OURS) == "/repo/qlora_trainer/engine/checkpointing.py:120:backward"
    assert site([{"filename": "a.py", "line": 3, "name": "f"}]) == "a.py:3:f"
