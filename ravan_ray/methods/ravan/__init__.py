"""Ravan (Raje et al., NeurIPS 2025, arXiv 2506.05568): everything the method owns, in one folder, as a PEFT tuner
keeps its config, layer and model together:

- ``method.py``: :class:`Ravan`, the federated method: its options (``method.heads``, ``init``, ``scaling``,
  ``scoring``), its rank rule, head selection, the per-head aggregation, its private terms and its columns of
  metrics.csv and client_budgets.csv;
- ``layer.py``: :class:`RavanLinear`, the frozen-bases layer (ravan_ray/adapters.py) with Ravan's base
  initialisations;
- ``scoring.py``: which heads a client trains (random, weight, gradient scores);
- ``budget.py``: each head's rank under the shared budget, the heads a compute level trains, and where more heads
  stop adding rank.
"""

from ravan_ray.methods.ravan.budget import full_rank_heads, heads_for_level, rank_from_budget
from ravan_ray.methods.ravan.layer import INITS, RavanLinear, make_bases
from ravan_ray.methods.ravan.method import Ravan, RavanOptions
from ravan_ray.methods.ravan.scoring import SCORES, head_scores, top_k

__all__ = ["INITS", "SCORES", "Ravan", "RavanLinear", "RavanOptions", "full_rank_heads", "head_scores",
           "heads_for_level", "make_bases", "rank_from_budget", "top_k"]
