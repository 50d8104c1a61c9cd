"""A compiler failure on a decoder layer's graph: the recipe takes the step again with eager layers and says so.

The failure itself (a bug in inductor's partitioner, seen on an H100) cannot be produced on the CPU, so a compiler
backend that raises stands in for it; the model, the adapter, the data and the step are the real ones.
"""

import json

import qlora_trainer.engine.build as build_module
from qlora_trainer.engine.compiled_layers import compile_decoder_layers
from qlora_trainer.spec import spec_from_dict
from qlora_trainer.training.recipe import train

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a in range(6) for b in range(6)]


def _spec(model_dir, data_path, out_dir, compile_layers: str):
    return spec_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "format": "alpaca"},
        "adapter": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": {"max_steps": 3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_len": 96,
                     "save_steps": 0, "learning_rate": 5e-3, "compile_layers": compile_layers},
        "output": {"dir": str(out_dir)},
    })


def _failing_backend(graph_module, example_inputs):
    raise AssertionError("Node add_687 was invalid, but is output")


def test_a_compiler_failure_retakes_the_step_with_eager_layers(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    eager = train(_spec(tiny_llama_dir, data, tmp_path / "eager", "off"), show_progress=False)

    monkeypatch.setattr(build_module, "compile_decoder_layers",
                        lambda model: compile_decoder_layers(model, backend=_failing_backend))
    capsys.readouterr()
    fallen_back = train(_spec(tiny_llama_dir, data, tmp_path / "fallback", "on"), show_progress=False)

    out = capsys.readouterr()
    notes = [line for line in (out.out + out.err).splitlines() if "torch.compile failed" in line]
    assert len(notes) == 1 and "step 1" in notes[0] and "Node add_687" in notes[0]
    # the step taken again saw the same examples and the same eager arithmetic: the run is the eager run
    assert fallen_back.final_step == 3
    assert fallen_back.losses == eager.losses
    records = [json.loads(line) for line in (tmp_path / "fallback" / "metrics.jsonl").read_text().splitlines()]
    assert [r["compiled_layers"] for r in records] == [False, False, False]  # what ran, for whoever reads the peaks


def test_a_failure_of_dynamos_own_tracing_retakes_the_step_too(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Dynamo itself can fail while tracing a layer (torch 2.11 on an H100: "lift_tracked_freevar_to_input should not
    be called on root SubgraphTracer", an AssertionError from its tracer, not a backend failure). A tracer that
    raises it stands in for that bug; the eager retake is the eager run."""
    import torch._dynamo
    from torch._dynamo.output_graph import OutputGraph

    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    eager = train(_spec(tiny_llama_dir, data, tmp_path / "eager", "off"), show_progress=False)

    def failing_create_proxy(self, *args, **kwargs):
        raise AssertionError("lift_tracked_freevar_to_input should not be called on root SubgraphTracer")

    torch._dynamo.reset()
    monkeypatch.setattr(OutputGraph, "create_proxy", failing_create_proxy)
    monkeypatch.setattr(build_module, "compile_decoder_layers",
                        lambda model: compile_decoder_layers(model, backend="eager"))
    capsys.readouterr()
    fallen_back = train(_spec(tiny_llama_dir, data, tmp_path / "fallback", "on"), show_progress=False)

    out = capsys.readouterr()
    notes = [line for line in (out.out + out.err).splitlines() if "torch.compile failed" in line]
    assert len(notes) == 1 and "AssertionError: lift_tracked_freevar_to_input" in notes[0]
    assert fallen_back.final_step == 3 and fallen_back.losses == eager.losses


def test_an_error_that_is_not_the_compilers_is_not_hidden(tiny_llama_dir, tmp_path, monkeypatch):
    """Only what the compiler raised is retaken eagerly: an error of the step itself stops the run as before."""
    import pytest

    import qlora_trainer.training.recipe as recipe

    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    def failing_step(session, batches):
        raise AssertionError("a bug of the step")

    monkeypatch.setattr(recipe, "train_step", failing_step)
    with pytest.raises(AssertionError, match="a bug of the step"):
        train(_spec(tiny_llama_dir, data, tmp_path / "run", "on"), show_progress=False)
