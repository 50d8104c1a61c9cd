"""qlora-trainer: fine-tune 7B-class models on one small GPU with a 4-bit base and low-rank adapters."""

import logging

__version__ = "0.1.0"

# bitsandbytes 0.50, imported on a CPU with AVX512-BF16, tries to fetch a faster CPU kernel from a model hub and
# logs a warning that names trust_remote_code when it cannot; its own CPU kernel then runs, and this project never
# downloads code, so the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
