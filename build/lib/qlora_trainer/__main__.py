"""`python -m qlora_trainer` runs the command line."""

import sys

from qlora_trainer.cli import main

sys.exit(main())
