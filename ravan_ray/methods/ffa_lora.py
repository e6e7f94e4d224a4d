"""FFA-LoRA: federated LoRA with A frozen (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024).

A is drawn once, Gaussian, from (run seed, layer name), so it is the same on every client and never
sent; only B (starting at 0) is trained, uploaded and averaged. With A shared and frozen,
mean(B_c) A = mean(B_c A): the aggregation is exact.

Choices the paper leaves open:
- budget: only B (d_out x r) trains, so r = floor(N / d_out), which is 2 r_L for the square query /
  value projections (``methods/budget.py``);
- A ~ N(0, 1/d_in) (``methods/lora.py``); scaling alpha / r with alpha = 2 r by default (scale 2): FFA-LoRA's
  own scripts were not available here, and the FederatedScope GLUE config that carries its switch
  (``federate.freeze_A`` in FedSA-LoRA's repository) uses ``r: 8, lora_alpha: 16``. The paper reports FFA-LoRA
  insensitive to alpha (the scale only rescales the effective learning rate of B);
- client weights follow ``method.aggregation_weights`` (uniform by default).
"""

from __future__ import annotations

from ravan_ray.methods.base import ClientUpdate, State
from ravan_ray.methods.budget import B_ONLY
from ravan_ray.methods.lora import LoRAMethod


class FFALoRA(LoRAMethod):
    name = "ffa_lora"
    exact = True
    shared_factors = ("lora_B",)
    trained_factors = ("lora_B",)
    alpha_per_rank = 2.0
    rank_rule = B_ONLY  # only B trains: r = floor(N / d_out)

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        return self.average_factors(state, updates, self.client_weights(updates))
