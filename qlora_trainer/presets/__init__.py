"""Model presets shipped with the package: NAME.json is the transformers config of a well-known architecture, so
`plan-memory --model NAME` and the benchmarks need no download."""

from pathlib import Path

PRESETS = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """The presets' names (qlora_trainer/presets/NAME.json)."""
    return sorted(p.stem for p in PRESETS.glob("*.json"))
