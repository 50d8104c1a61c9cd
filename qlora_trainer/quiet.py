"""What third-party libraries may print. By default their deprecation and future warnings, their informational
log records and their own progress bars (loading weights, writing shards, mapping datasets) are off, so a run's
output is this tool's own lines; `qlora-trainer --verbose` leaves everything as the libraries have it.

Set before the libraries are imported (they read the environment once): call `quiet_third_party()` first.
"""

import logging
import os
import warnings

LIBRARIES = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub", "torch")


def quiet_third_party() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' and huggingface_hub's bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in LIBRARIES:  # their UserWarnings too: advice meant for their own users, not for ours
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{name}(\.|$)")
        logging.getLogger(name).setLevel(logging.ERROR)
