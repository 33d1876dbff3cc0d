"""Model integrations: ``topv.enable/apply/remove`` for Hugging Face VLMs (transformers is
imported only when they are called).

* ``transformers.py`` -- the public API: checks every argument, then installs the engine.
* ``engine.py`` -- the hook engine: capture at layer K (the vision stage: in the vision encoder),
  the scorer's call, gather, masks, positions, cache records, decode. Knows no particular model
  type or scorer.
* ``families/`` -- per model type, where a prefill's images are (pure functions of the inputs,
  callable by any serving engine) and which encoder tokens each image token is; a registry keyed
  by ``model_type``.
* ``scorers/`` -- the pruning methods (topv, fastv, random, uniform, dart) behind one interface.
* ``layout.py`` -- a layout's host-side tables (lengths, slots, masks), built once and cached.
* ``masks.py`` -- masks per attention implementation; ``records.py`` -- ``Segment``, ``PrefillInfo``.

Test and benchmark helpers (tiny models, the by-hand reference) live in ``topv.testing``.
"""
