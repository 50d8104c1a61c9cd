"""Using a trained adapter: merging it into its base (`merge.py`) and generating with it (`generate.py`)."""
