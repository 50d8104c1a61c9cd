"""The run specification: sections (`sections.py`), reading YAML and overrides (`load.py`), and resolving it for
the hardware at hand (`resolve.py`)."""

from qlora_trainer.spec.load import load_spec, spec_from_dict, spec_to_dict
from qlora_trainer.spec.resolve import Budget, ResolvedRun, resolve
from qlora_trainer.spec.sections import (AdapterConfig, DataConfig, ModelConfig, OutputConfig, QuantizationConfig,
                                         RunSpec, TrainingConfig)

__all__ = ["AdapterConfig", "Budget", "DataConfig", "ModelConfig", "OutputConfig", "QuantizationConfig",
           "ResolvedRun", "RunSpec", "TrainingConfig", "load_spec", "resolve", "spec_from_dict", "spec_to_dict"]
