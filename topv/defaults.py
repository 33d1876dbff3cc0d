"""The one home of every TopV default (``docs/algorithm.md``, "Defaults").

The typed API (:mod:`topv.api`), the op schemas (:mod:`topv.ops`), the reference
(:mod:`topv.reference`) and the model integration read these names; the C API header
(``csrc/include/topv/topv.h``) and the docs cannot import Python, so ``tests/test_defaults.py``
checks them against this module. These are our choices, not tuned on real models.
"""

from __future__ import annotations

import math

ALPHA = 1.0  # weight of the feature term (1 - cos) / 2
BETA = 1.0  # weight of the relative spatial term 1 - exp(-|p_i - q_j|^2 / 2 sigma^2)
GAMMA = 0.1  # weight of the centre term |p_i - c| / sqrt(0.5): a centre prior of strength gamma / tau
SIGMA = 0.2  # spatial length scale, in image widths
EPS = 0.1  # entropic regularisation
TAU = 0.1  # prune's source-marginal relaxation (KL weight); inf gives balanced OT
N_ITERS = 3  # Sinkhorn iterations
TOL = 0.0  # > 0: per-segment early exit on the relaxed row optimality condition
RECOVER_RATIO = 0.25  # share of each budget spent on the uniform recovery subset
LAYER = 2  # K: the decoder layer whose input (source) and post-attention-norm output (target) are scored
DART_PIVOTS = 8  # the dart baseline's image pivots per segment (DART's LLaVA-1.5 default: 4 image + 4 text)
RANDOM_SEED = 0  # the random baseline's seed
# topv.sinkhorn is a general solver: balanced by default, as POT's ot.sinkhorn.
TAU_A = math.inf
TAU_B = math.inf
# prune's cost buffer on the GPU (cuda, triton): when no max_workspace is given and the environment
# variable TOPV_COST_BUFFER_CAP_BYTES is unset, this share of the device's free memory, and at
# least the floor; a segment whose n^2 fp32 cost does not fit streams it in row slabs.
WORKSPACE_FREE_FRACTION = 0.25
WORKSPACE_FLOOR_BYTES = 192 << 20

# Keyword defaults of topv.prune / torch.ops.topv.prune beyond the layout arguments.
PRUNE = dict(alpha=ALPHA, beta=BETA, gamma=GAMMA, sigma=SIGMA, eps=EPS, tau=TAU, n_iters=N_ITERS, tol=TOL,
             recover_ratio=RECOVER_RATIO)
