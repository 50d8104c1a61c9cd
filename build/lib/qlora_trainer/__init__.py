"""qlora-trainer: fine-tune 7B-class models on one small GPU with a 4-bit base and low-rank adapters."""

__version__ = "0.1.0"
