"""Post-hoc OOD scores (LOSS_CONTRACT.md §4): higher means more OOD.

Each maps logits (B, C) to (B) and, where 4-D input is allowed, (B, C, H, W) to (B, H, W), equal to
the score of the flattened pixels. Scores leave grad mode alone and never synchronise.

================================  ===============================================================
``energy(logits, t=1.0)``         −t·lse(f / t)
``max_softmax(logits, t=1.0)``    −max_c softmax(f / t)_c
``max_logit(logits)``             −max_c f_c
``entropy(logits)``               −Σ_c p_c log p_c with p = clamp(softmax(f), 1e-7, 1)
``weighted_energy(logits, w)``    −(m + log Σ_c relu(w_c)·exp(f_c − m)), m = max_c f_c (fix g)
================================  ===============================================================
"""

from .ops import energy_score as energy
from .ops import entropy_score as entropy
from .ops import max_logit_score as max_logit
from .ops import max_softmax_score as max_softmax
from .ops import weighted_energy_score as weighted_energy

__all__ = ["energy", "max_softmax", "max_logit", "entropy", "weighted_energy"]
