"""`python -m qlora_trainer` runs the command line."""

from qlora_trainer.cli import entry

entry()
