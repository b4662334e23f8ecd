"""PonderLM-3: PonderLM-2 (K = 3) plus a router that decides each token's latent steps up front,
trained through a differentiable attention mask and a fused readout (`nn/latent.py`)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ponder_lightning.models.ponder2 import PonderLM2
from ponder_lightning.nn.latent import LatentRecurrence, SlotRouter
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.validation import ClosedUnitInterval, NonNegativeFloat, PositiveInt, check_init_args


class PonderLM3(PonderLM2):
    """s_t = softmax(router(h_t^(0))) over k = 0..K; slot (t, k) is seen by every query with
    log w_{t,k} added (w = tail CDF of s); the output is sum_k s_{t,k} h_t^(k). At inference a
    token runs only the latent steps with w >= tau, and pruned slots never enter the KV cache.

    Args:
        latent_steps: K (paper: 3).
        router_hidden: None = Linear(d, K+1) router (default); an int = a d -> hidden -> K+1 MLP.
        tau: inference pruning threshold on w (paper: 1e-4).
        depth_penalty: lambda of the optional compute regulariser lambda * E_s[k] (0 = the
            paper's "purely self-supervised objectives"; docs/method.md says what CE alone did here).
    Every PonderLM2 argument applies (jacobi_choices, jacobi_eval, scale_embeds,
    output_init_passes, ...); their per-block defaults follow the PonderLM-2 authors' LLaMA code
    on llama-* sizes (J in {2, 3}, no per-pass factor in the output-projection init).
    """

    def __init__(
        self,
        latent_steps: PositiveInt = 3,
        router_hidden: PositiveInt | None = None,
        tau: ClosedUnitInterval = 1e-4,
        depth_penalty: NonNegativeFloat = 0.0,
        **kwargs: Any,
    ) -> None:
        check_init_args(PonderLM3, locals())
        super().__init__(latent_steps=latent_steps, **kwargs)
        self.router = SlotRouter(self.config.d_model, latent_steps, router_hidden)
        sigma = math.sqrt(2.0 / (5.0 * self.config.d_model))  # the backbone's init
        for module in self.router.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=sigma, a=-3 * sigma, b=3 * sigma)
                nn.init.zeros_(module.bias)
        self.latent = LatentRecurrence(self.backbone, latent_steps, self.router, tau)  # PonderLM-2's, now routed

    def aux_loss(self, trace: Trace) -> Tensor | None:
        """lambda * E_s[k], with E_s[k] = sum_{k>=1} w_k per token, averaged over real tokens."""
        if not self.hparams.depth_penalty:
            return None
        expected_steps = sum(trace.scores)
        return self.hparams.depth_penalty * expected_steps[trace.active[0]].mean()
