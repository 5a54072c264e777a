"""The offline arithmetic world: a seeded GSM8K stand-in, a tiny model warm-started on it, and what runs on it.

Tests, the demo and the benchmarks use it; the evaluation modules of :mod:`harness` take prompts,
samplers and judges as inputs and never import it. ``arithmetic:warm`` names the warm-started model
everywhere (:func:`harness.world.warm_start.checkpoint`).
"""

from harness.world import console  # noqa: F401  (first: it drops known library log lines before they are imported)
