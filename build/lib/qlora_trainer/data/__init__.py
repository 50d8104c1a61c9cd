"""Training data: examples from files or data sets (`prepare.py`) and the micro-batches a step takes (`batches.py`)."""
