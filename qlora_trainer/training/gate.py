"""Before any weight is loaded: the planner fills the choices left open (`training.plan: auto`) and a run predicted
not to fit its budget is refused, unless forced. The same prediction and fits rule as `plan-memory`."""

from transformers import PretrainedConfig

from qlora_trainer.errors import UserError
from qlora_trainer.planner.memory import estimate_memory
from qlora_trainer.planner.search import search_plan
from qlora_trainer.planner.shapes import model_shape
from qlora_trainer.spec import ResolvedRun

GIB = 2**30


def fit_to_budget(run: ResolvedRun, model_config: PretrainedConfig, force: bool) -> ResolvedRun:
    """`run`, planned where asked; a UserError when its predicted peak does not fit (unless `force`)."""
    if run.budget is None:  # the CPU: no budget to plan for
        return run
    shape = model_shape(model_config)
    if run.spec.training.plan == "auto":
        run = search_plan(shape, run).run
    peak = estimate_memory(shape, run).predicted_peak_bytes
    budget = run.budget
    print(f"planner: predicted peak {peak / GIB:.2f} GiB of {budget.budget_bytes / GIB:.2f} GiB on {budget.device_name}")
    if not budget.fits(peak) and not force:
        advice = search_plan(shape, run).advice
        raise UserError(f"training: predicted peak {peak / GIB:.2f} GiB does not fit {budget.device_name} "
                        f"({budget.budget_bytes / GIB:.2f} GiB); planner: {advice}; --force trains anyway")
    return run
