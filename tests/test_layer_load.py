"""FSDP's base, loaded a tensor at a time (engine/layer_load.py), is the model from_pretrained loads: the same
modules, the same packed 4-bit codes and quantization states, the same buffers and ties, and no random numbers drawn
(the adapter's initialisation after it must not move)."""

from pathlib import Path

import pytest
import torch

from qlora_trainer.engine.base import DTYPES, load_base
from qlora_trainer.engine.layer_load import layer_by_layer_names, skeleton, tensor_files
from qlora_trainer.engine.base import load_model_config, quantization_config
from qlora_trainer.spec import ModelConfig, QuantizationConfig
from tiny_models import save_tiny_model


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: packed codes stored as bf16 hold NaN patterns, which torch.equal never calls equal."""
    return tensor.detach().contiguous().view(torch.uint8)


def _load(folder: Path, shardable: bool, mode: str) -> torch.nn.Module:
    return load_base(ModelConfig(path=str(folder)), QuantizationConfig(mode=mode), DTYPES["bfloat16"],
                     torch.device("cpu"), "sdpa", shardable=shardable).model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_dir(request, tiny_llama_dir, tmp_path_factory) -> Path:
    """Llama (GQA), Qwen2 (q/k/v biases), GPT-2 (Conv1D weights stored transposed, tied embeddings)."""
    if request.param == "llama":
        return tiny_llama_dir
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_a_tensor_at_a_time_gives_the_model_from_pretrained_gives(model_dir, mode):
    torch.manual_seed(7)
    expected = _load_whole(model_dir, mode)
    after_whole = torch.get_rng_state()
    torch.manual_seed(7)
    loaded = _load(model_dir, shardable=True, mode=mode)
    assert torch.equal(torch.get_rng_state(), after_whole)  # nothing drawn: the adapter starts the same
    assert [type(m) for m in loaded.modules()] == [type(m) for m in expected.modules()]
    want = dict(expected.named_parameters(remove_duplicate=False))
    got = dict(loaded.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys()
    quantized = 0
    for name, param in want.items():
        assert type(got[name]) is type(param) and got[name].dtype == param.dtype, name
        assert got[name].shape == param.shape and torch.equal(_as_bytes(got[name]), _as_bytes(param)), name
        assert not got[name].requires_grad
        state = getattr(param, "quant_state", None)
        if state is not None:
            quantized += 1
            mine = got[name].quant_state
            assert torch.equal(mine.absmax, state.absmax) and mine.quant_type == state.quant_type == mode
            assert torch.equal(mine.state2.absmax, state.state2.absmax) and torch.equal(mine.offset, state.offset)
    assert quantized > 0
    assert {n: b for n, b in loaded.named_buffers()}.keys() == {n: b for n, b in expected.named_buffers()}.keys()
    for name, buffer in expected.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buffer), name
    tied = expected.get_output_embeddings().weight is expected.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    assert loaded.is_loaded_in_4bit and loaded.config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    assert not loaded.training and not expected.training


def _load_whole(folder: Path, mode: str) -> torch.nn.Module:
    """from_pretrained with the same settings (the packed codes in bf16, for FSDP)."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(QuantizationConfig(mode=mode), torch.bfloat16, shardable=True)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config,
                                                attn_implementation="sdpa")


def test_files_transformers_renames_on_loading_are_loaded_whole_and_said(tmp_path, capsys):
    """A GPT-2 saved without its LM head's prefix ("h.0..." for "transformer.h.0..."), which from_pretrained maps:
    no tensor is found under the model's own names, so the base loads the usual way, and the note says so."""
    from transformers import AutoModel

    from conftest import save_tiny_tokenizer
    from tiny_models import CONFIGS

    folder = tmp_path / "gpt2-base"
    torch.manual_seed(0)
    AutoModel.from_config(CONFIGS["gpt2"]).to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    config = quantization_config(QuantizationConfig(), torch.bfloat16, shardable=True)
    model, _ = skeleton(load_model_config(ModelConfig(path=str(folder))), config, torch.bfloat16, "sdpa", False)
    assert layer_by_layer_names(model, tensor_files(folder)) == "transformer.wte.weight"
    loaded = _load(folder, shardable=True, mode="nf4")
    assert "every GPU loads the whole 4-bit model before FSDP shards it: " in capsys.readouterr().err
    expected = _load_whole(folder, "nf4")
    for name, param in expected.named_parameters():
        assert torch.equal(_as_bytes(dict(loaded.named_parameters())[name]), _as_bytes(param)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_codes_wait_in_host_memory_and_the_states_stay_on_the_gpu(tiny_llama_dir):
    """What FSDP's fully_shard takes a layer at a time: parameters parked on the CPU, quantized on the GPU as
    from_pretrained quantizes them there, their quantization states and buffers on the GPU."""
    from transformers import AutoModelForCausalLM

    gpu = torch.device("cuda", 0)
    loaded = load_base(ModelConfig(path=str(tiny_llama_dir)), QuantizationConfig(), DTYPES["bfloat16"], gpu, "sdpa",
                       shardable=True).model
    config = quantization_config(QuantizationConfig(), torch.bfloat16, shardable=True)
    expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, quantization_config=config,
                                                    attn_implementation="sdpa", device_map={"": 0})
    got = dict(loaded.named_parameters())
    for name, param in expected.named_parameters():
        assert got[name].device.type == "cpu", name
        assert torch.equal(_as_bytes(got[name]), _as_bytes(param.cpu())), name
        if getattr(param, "quant_state", None) is not None:
            assert got[name].quant_state.absmax.device.type == "cuda"
            assert torch.equal(got[name].quant_state.absmax.cpu(), param.quant_state.absmax.cpu())
    assert all(buffer.device.type == "cuda" for buffer in loaded.buffers())
