"""How much of the data a run trains on: several files' examples mixed by weight (`mix`), and the optimizer steps
that make a number of passes over the train examples (`steps_for_epochs`)."""

import math
import random
from typing import TypeVar

Example = TypeVar("Example")


def mix(groups: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """The examples of several files (`groups`, none empty), each file making up its weight's share of the mix.

    The mix holds as many examples as the files together; file i contributes round(total x weight_i / sum of the
    weights): all its examples as many whole times as fit in that count, then the remainder drawn from it without
    replacement by a generator seeded with `seed` (in file order). The files follow one another in the order
    given; a single file comes back unchanged."""
    total = sum(len(group) for group in groups)
    weight_sum = sum(weights)
    rng = random.Random(seed)
    mixed: list[Example] = []
    for group, weight in zip(groups, weights):
        repeats, remainder = divmod(round(total * weight / weight_sum), len(group))
        mixed += group * repeats + [group[i] for i in sorted(rng.sample(range(len(group)), remainder))]
    return mixed


def steps_for_epochs(train_examples: int, micro_batch_size: int, gradient_accumulation_steps: int,
                     num_epochs: float) -> int:
    """Optimizer steps that show the model each train example (or packed row) `num_epochs` times:
    ceil(num_epochs x train_examples / (micro_batch_size x gradient_accumulation_steps)), at least 1. The
    micro-batch stream runs on across epochs (batches.py), so a last step that overshoots starts the next pass."""
    examples = math.ceil(round(num_epochs * train_examples, 6))  # 0.1 x 30 is 3.0000000000000004 in floats
    return max(1, -(-examples // (micro_batch_size * gradient_accumulation_steps)))
