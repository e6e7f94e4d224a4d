"""FedIT: FedAvg of LoRA factors (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024).

Every client trains a LoRA (B starts at 0, A Gaussian and the same on every client from the run seed)
starting from the global factors; the server averages B and A separately. Since
mean(B_c) mean(A_c) != mean(B_c A_c), the global update is not the mean of the clients' updates: this is
the inexact baseline (``agg_error`` > 0 as soon as two clients differ).

Choices the paper leaves open: the rank comes from the shared budget (r = r_L, ``methods/budget.py``);
scaling alpha / r with alpha = r by default (scale 1), as FedIT's code (FederatedGPT-Shepherd ``main.py``:
``lora_r=16, lora_alpha=16``); client weights follow ``method.aggregation_weights``; unset, they are the clients'
data sizes, as FedIT's FedAvg (FederatedGPT-Shepherd ``fed_utils/model_aggregation.py``:
``normalize(local_dataset_len_dict[...], p=1)``).
"""

from __future__ import annotations

from ravan_ray.methods.base import ClientUpdate, State
from ravan_ray.methods.lora import LoRAMethod


class FedIT(LoRAMethod):
    name = "fedit"
    reference_weights = "num_samples"
    exact = False
    alpha_per_rank = 1.0

    def aggregate(self, state: State, updates: list[ClientUpdate], round_index: int) -> State:
        return self.average_factors(state, updates, self.client_weights(updates))
