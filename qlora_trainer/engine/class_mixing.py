"""Mixing a method into a module's class, one class per pair, so that modules keep sharing one compiled graph."""

from functools import cache


@cache
def mixed_class(mixin: type, base: type) -> type:
    """`base` with `mixin`'s methods in front, one class per pair: a compiled graph is shared by modules of a class."""
    return type(f"{mixin.__name__.lstrip('_')}{base.__name__}", (mixin, base), {})
