"""The training recipe (`recipe.py`) and what it needs around the engine's step: the planner's gate, checkpoints
and resume, the run folder and its metrics, signals."""
