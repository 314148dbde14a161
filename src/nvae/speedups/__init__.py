"""The same numbers computed faster or in less memory, applied to a plain model from outside.

``nvae.speedups.apply(model, recompute_bn=True, checkpointing=("normal_post", "up_post"))`` switches them on,
``nvae.speedups.enabled(model)`` lists them, ``nvae.speedups.remove(model)`` gives the paper's network back
(:mod:`nvae.speedups.switches`).
"""
from .switches import DEFAULT, PLAIN, Speedups, apply, enabled, remove

__all__ = ["DEFAULT", "PLAIN", "Speedups", "apply", "enabled", "remove"]
