"""The sharpness-aware step, torch only: ASAM (Kwon et al., ICML 2021, Section 4) and SAM (Foret et al.).

    g     = grad L(w)
    eps   = rho * T_w^2 g / ||T_w g||_2          (p = 2)
    eps   = rho * T_w sign(g)                    (p = inf)
    g'    = grad L(w + eps)
    w     <- w exactly (copied back in place), then the base optimizer steps with g'

The modules, from the math up (none of the first five imports a policy):

- :mod:`.params`: which tensor is normalized how (the bias rule, filter-wise or element-wise);
- :mod:`.operator`: T_w itself (paper Eq. 5 plus eta I), defined once;
- :mod:`.kernels`: the ascent, a per-tensor loop and a foreach kernel that do the same arithmetic;
- :mod:`.sharded`: the same ascent on FSDP2's DTensors (norms totalled over the shards);
- :mod:`.perturb`: :class:`Perturbation`, the object every front end uses (ascent, exact restore);
- :mod:`.update`: the update's one sequence (:class:`UpdateDriver`), run by every front end through its
  :class:`UpdateAdapter`, with a cheaper-update policy;
- :mod:`.optim`: the ``torch.optim`` shells :class:`ASAM` and :class:`SAM`.

    python -c "from fairseq_asam.core import ASAM, Perturbation, UpdateDriver; print(ASAM, Perturbation, UpdateDriver)"
"""

from .kernels import perturbation
from .operator import filter_operator, normalization_operator
from .optim import ASAM, SAM
from .params import ParamSpec, resolve_params
from .perturb import Perturbation, check_hyperparameters
from .update import UpdateAdapter, UpdateDriver, UpdateResult, signal_overflow

__all__ = [
    "ASAM", "SAM", "ParamSpec", "Perturbation", "UpdateAdapter", "UpdateDriver", "UpdateResult",
    "check_hyperparameters", "filter_operator", "normalization_operator", "perturbation", "resolve_params",
    "signal_overflow",
]
