"""GPU catalogue lookup, --vram budgets and detection (the GPU itself is the one thing mocked here)."""

from types import SimpleNamespace

import pynvml
import pytest
import torch

from qlora_trainer.errors import UserError
from qlora_trainer.hardware import GIB, GPU_CATALOGUE, budget_gpu, detect_gpu, lookup_gpu


def test_catalogue_has_the_common_cards_with_bf16_from_compute_capability():
    required = {"T4", "L4", "A10G", "A100-40GB", "A100-80GB", "H100-80GB", "RTX3090", "RTX4090"}
    assert required <= set(GPU_CATALOGUE)
    for spec in GPU_CATALOGUE.values():
        assert 0 < spec.usable_bytes <= spec.total_bytes
        assert spec.supports_bf16 == (spec.compute_capability >= (8, 0))
    assert not GPU_CATALOGUE["T4"].supports_bf16 and GPU_CATALOGUE["L4"].supports_bf16
    assert 14 * GIB < GPU_CATALOGUE["T4"].usable_bytes < 15 * GIB


@pytest.mark.parametrize("name, expected", [("t4", "T4"), ("rtx 3090", "RTX3090"), ("4090", "RTX4090"),
                                            ("a100_80gb", "A100-80GB"), ("H100", "H100-80GB")])
def test_lookup_ignores_case_spaces_and_dashes(name, expected):
    assert lookup_gpu(name).name == expected


def test_unknown_gpu_is_a_user_error_listing_the_catalogue():
    with pytest.raises(UserError, match="--gpu B200: unknown GPU; choose one of T4, .*A100-40GB") as err:
        lookup_gpu("B200")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("vram", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_vram_is_a_user_error(vram):
    with pytest.raises(UserError, match="--vram"):
        budget_gpu(vram)


def test_vram_budget_is_that_many_gib():
    assert budget_gpu(15.5).usable_bytes == int(15.5 * GIB)


def test_detect_gpu_reads_torch_when_cuda_is_there(monkeypatch):
    props = SimpleNamespace(name="NVIDIA L4", total_memory=23_580_000_000, major=8, minor=9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    spec = detect_gpu()
    assert (spec.name, spec.usable_bytes, spec.supports_bf16, spec.compute_capability) == (
        "NVIDIA L4", 23_580_000_000, True, (8, 9))


def test_detect_gpu_is_none_without_cuda_or_driver(monkeypatch):
    def no_driver():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert detect_gpu() is None
