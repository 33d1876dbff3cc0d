"""Helpers for tests, the demo and the benchmarks; not used by the integration itself.

* ``tiny_models`` -- random-initialised VLMs of every supported family and their inputs, built in
  code (no downloads); real-size shapes go through the same builders.
* ``reference`` -- the by-hand masked-attention model of a pruned prompt, given its kept tokens,
  and each method's kept set recomputed from the prompt's own layer states (the vision stage:
  its vision encoder's states, mapped to tokens with the model's own merge code).
* ``syncs`` -- counts host synchronisations on any device (CPU included) and says whose code
  caused them.
"""
