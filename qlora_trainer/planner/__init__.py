"""The memory planner: predict a run's peak GPU memory from shapes alone, and find a run that fits a budget.

  shapes.py  the model's parameter layout from its config (a folder, a config.json or a preset), on the meta device;
  memory.py  bytes per component at the peak of one training step: a pure function of (shapes, resolved run);
  search.py  a spec that fits: the run with the choices the user left open (keys not in `explicit_keys`) changed;
  report.py  `plan-memory`: command-line flags to a RunSpec, and the table / JSON of the result.

The planner has no run type of its own: it reads and returns `ResolvedRun`s (spec/resolve.py).
"""

# plan-memory's --seq-len value that asks for the longest sequence that fits (report.py); here, where the command line
# (cli.py) can read it without importing the planner's modules
LONGEST_SEQ_LEN = "longest"
