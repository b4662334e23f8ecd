"""Latent-thought slots (PonderLM-2, PonderLM-3): K latent slots after every token.

A sequence of T tokens becomes T*(K+1) slots `x_1 z_1^1 .. z_1^K x_2 ..`, held as [B, T, K+1, d]
and flattened for the backbone, so interleaving is a reshape. The input of latent slot (t, k) is
the output (after the final norm) of slot (t, k-1); every slot of token t takes rotary position t;
slot (t, K)'s output predicts token t+1 (with PonderLM-3's router: the s-weighted sum of the
slots' outputs, and log w of each slot added to every query's attention logit for it).

The model is sequential: a latent depends on every earlier slot. Decoding runs it so: the slot
step (`LatentRowDecoder.step`) runs every given row's next slot in one single-slot pass on the
KV cache (each row at its own token and slot, see `nn/rowwise.py`), and prefill (`extend`) is the
same step run over the prompt's tokens in order. Training runs the Jacobi form (`__call__`):
build-up passes over the first 1..K slots of every token grow the latents, J passes over all K+1
slots update every latent in parallel from the previous pass, and a final pass reads out. Each
full-width pass makes at least one more latent (in sequence order) exact, and a token's router
output is exact when its first latent is, so with J >= T*K the training form equals decoding
exactly; the default J (2-3) is the paper's approximation.

Why the Jacobi form is a second step: it updates every latent of the sequence in parallel from
the previous pass, which the sequential slot step cannot express. Why not `nn.recurrence.Recurrence`:
its passes share one sequence shape and one attention mask, here the width grows during build-up
and PonderLM-3's mask changes every pass. Shared with it: the backbone and its K/V hook,
`causal_mask`, rotary positions, the `KVCache` and `Trace`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ponder_lightning.nn.backbone import Backbone, CausalKeyBias, causal_mask, positions_from_valid, softmax_dtype
from ponder_lightning.nn.cache import CacheWriter, KVCache
from ponder_lightning.nn.onednn import prepacked_weights
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.nn.rowwise import RowDecoder, RowStep


def tail_weights(probs: Tensor) -> Tensor:
    """w_k = sum_{j>=k} s_j over the last dim (the slot-k visibility of PonderLM-3); w_0 = 1."""
    tail = probs.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([torch.ones_like(tail[..., :1]), tail[..., 1:]], dim=-1)


def log_weights(w: Tensor) -> Tensor:
    """log w, exactly -inf where w == 0 (the slot is invisible), with a finite gradient everywhere."""
    positive = w > 0
    return torch.where(positive, w, torch.ones_like(w)).log().masked_fill(~positive, float("-inf"))


def slot_positions(positions: Tensor, width: int) -> Tensor:
    """Rotary positions of the slots: every slot of a token at the token's position."""
    return positions.repeat_interleave(width, dim=-1)


def slot_mask(
    valid: Tensor | None, width: int, bias: Tensor | None, dtype: torch.dtype
) -> Tensor | CausalKeyBias | None:
    """Attention mask over the flattened [T*width] slots: causal in slot order, padding keys
    hidden, `bias` [B, T, width] (log w) added to every query's logit for that key slot.
    None when plain causal attention suffices; without padding the bias goes as `CausalKeyBias`
    (no [T*width]^2 mask, flash attention on GPUs)."""
    if bias is None:
        return None if valid is None else causal_mask(valid.repeat_interleave(width, dim=1))
    if valid is None:
        return CausalKeyBias(bias.flatten(1))
    allowed = causal_mask(valid.repeat_interleave(width, dim=1))
    return torch.where(allowed, bias.flatten(1)[:, None, None, :].to(dtype), float("-inf"))


class SlotRouter(nn.Module):
    """PonderLM-3's router: s_t = softmax(router(h_t^(0))) over k = 0..K latent steps, read from
    the token slot's output. `hidden`: None = Linear(d, K+1) (the default), else a two-layer MLP
    d -> hidden -> K+1 with GELU."""

    def __init__(self, d_model: int, latent_steps: int, hidden: int | None = None) -> None:
        super().__init__()
        out = latent_steps + 1
        self.net = (
            nn.Linear(d_model, out)
            if hidden is None
            else nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, out))
        )

    def forward(self, h0: Tensor) -> Tensor:
        logits = self.net(h0)
        return logits.to(softmax_dtype(logits.dtype)).softmax(-1)

    def extra_flops_per_token(self) -> float:
        return 2.0 * sum(p.numel() for p in self.parameters() if p.dim() == 2)


class LatentRecurrence:
    """Training (Jacobi) and decoding (sequential) forms of the latent-slot model.

    A plain object like `Recurrence`: the backbone and router are registered on the LightningModule.

    Args:
        latent_steps: K latent slots per token.
        router: PonderLM-3's router; None = PonderLM-2 (read out the last slot, no attention bias).
        tau: a slot whose w is below tau is pruned at inference (and counted so in the trace).
    """

    def __init__(
        self, backbone: Backbone, latent_steps: int, router: SlotRouter | None = None, tau: float = 1e-4
    ) -> None:
        if latent_steps < 1:
            raise ValueError(f"latent_steps must be >= 1, got {latent_steps}")
        self.backbone, self.latent_steps = backbone, latent_steps
        self.router, self.tau = router, tau

    # -- training form ---------------------------------------------------------------------
    def __call__(self, tokens: Tensor, valid: Tensor | None, jacobi_passes: int) -> tuple[Tensor, Trace]:
        """Hidden states [B, T, d] that predict the next tokens, and the trace: `active[k]` = the
        tokens that run slot k at inference (all of them without a router), `scores[k-1]` = w_k."""
        out, _, trace = self.slot_outputs(tokens, valid, jacobi_passes)
        return out, trace

    def slot_outputs(self, tokens: Tensor, valid: Tensor | None, jacobi_passes: int) -> tuple[Tensor, Tensor, Trace]:
        """The training form's readout [B, T, d] and trace (see `__call__`), and every slot's output
        of the final pass [B, T, K+1, d] (after the final norm): what each latent step of a token
        would predict (a logit lens over the slots, `depth_map.pass_report`)."""
        b, t = tokens.shape
        k_max = self.latent_steps
        embeds = self.backbone.embed(tokens).unsqueeze(2)  # the token slots, [B, T, 1, d]
        positions = torch.arange(t, device=tokens.device) if valid is None else positions_from_valid(valid)
        widths = list(range(1, k_max + 1)) + [k_max + 1] * (jacobi_passes + 1)
        slots, probs = embeds, None
        for n, width in enumerate(widths):
            bias = None if probs is None else self._key_bias(probs, valid)[..., :width]
            mask = slot_mask(valid, width, bias, embeds.dtype)
            h = self.backbone(slots.flatten(1, 2), slot_positions(positions, width), mask).view(b, t, width, -1)
            if n == len(widths) - 1:
                break
            if self.router is not None:  # refined from every pass; used by the next one
                probs = self.router(h[:, :, 0])
            slots = torch.cat([embeds, h[:, :, : widths[n + 1] - 1]], dim=2)
        real = torch.ones(b, t, dtype=torch.bool, device=tokens.device) if valid is None else valid.bool()
        if probs is None:
            return h[:, :, k_max], h, Trace(active=[real] * (k_max + 1), scores=[None] * k_max)
        w = tail_weights(probs)
        out = (probs.unsqueeze(-1).to(h.dtype) * h).sum(2)
        trace = Trace(
            active=[real] + [real & (w[..., k] >= self.tau) for k in range(1, k_max + 1)],
            scores=list(w[..., 1:].unbind(-1)),
        )
        return out, h, trace

    @staticmethod
    def _key_bias(probs: Tensor, valid: Tensor | None) -> Tensor:
        """log w per slot, 0 for padding tokens (hidden anyway; keeps their own rows finite)."""
        bias = log_weights(tail_weights(probs))
        return bias if valid is None else bias.masked_fill(~valid.bool().unsqueeze(-1), 0.0)

    # -- decoding form ---------------------------------------------------------------------
    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        """One cache iteration, K+1 slots per token, and PonderLM-3's log w as the key bias."""
        slots = max_tokens * (self.latent_steps + 1)
        return KVCache(self.backbone, 1, batch, slots, key_bias=self.router is not None)

    @torch.no_grad()
    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, list[int]]:
        """Run new tokens [B, T_new] (a prompt, or one token per row) slot by slot with the row
        decoder's step: for each token, slot 0, then (with a router) only the latent slots whose
        w >= tau. Returns the hidden states that predict the next tokens [B, T_new, d], the slots
        each token ran [B, T_new] (1 + latent steps; 0 for padding) and the tokens that ran each
        slot k, [K+1]."""
        decoder = LatentRowDecoder(self, cache)
        out = torch.zeros(*tokens.shape, self.backbone.config.d_model, dtype=cache.k.dtype, device=tokens.device)
        depth = torch.zeros(tokens.shape, dtype=torch.long, device=tokens.device)
        for col in range(tokens.shape[1]):
            rows = valid[:, col].nonzero().squeeze(1)
            decoder.start(rows, tokens[rows, col])
            while rows.numel():
                step = decoder.step(rows, with_logits=False)
                done = rows[step.finished]
                out[done, col], depth[done, col] = step.hidden, step.depth
                rows = rows[~step.finished]
        return out, depth, decoder.evaluations


class LatentRowDecoder(RowDecoder):
    """Row-wise decoding of latent slots (see `nn/rowwise.py`): each pass runs every given row's
    next slot, whichever token and slot that is, so a row whose router prunes its latent steps
    starts its next token while other rows still think."""

    def __init__(self, latent: LatentRecurrence, cache: KVCache) -> None:
        super().__init__(cache, latent.latent_steps + 1)
        self.latent = latent
        b, device = cache.batch, cache.fill.device
        d, dtype = latent.backbone.config.d_model, cache.k.dtype
        self.slot_index = torch.zeros(b, dtype=torch.long, device=device)  # k of each row's next slot
        self.x = torch.zeros(b, d, dtype=dtype, device=device)
        self.out = torch.zeros(b, d, dtype=dtype, device=device)
        self.probs = torch.zeros(b, latent.latent_steps + 1, dtype=softmax_dtype(dtype), device=device)
        self.w = torch.ones(b, latent.latent_steps + 1, dtype=softmax_dtype(dtype), device=device)

    def start(self, rows: Tensor, tokens: Tensor) -> None:
        """Rows `rows` begin new tokens `tokens` [n] at their token slot."""
        self.cache.check_room(rows, self.latent.latent_steps + 1)
        self.x[rows] = self.latent.backbone.embed(tokens)
        self.out[rows] = 0.0
        self.slot_index[rows] = 0
        self.w[rows] = 1.0

    @torch.no_grad()
    @prepacked_weights()
    def step(self, rows: Tensor, with_logits: bool = True) -> RowStep:
        """One single-slot pass for `rows`: each appends its next slot to the cache (with its
        log w) and attends over its own cached slots."""
        latent, cache, k = self.latent, self.cache, self.slot_index[rows]
        slot = cache.claim(rows)
        if cache.key_bias is not None:
            cache.key_bias[rows, slot] = log_weights(self.w[rows, k]).to(cache.key_bias.dtype)
        total_len = int(slot.max()) + 1
        mask = cache.attention_mask(rows, slot.unsqueeze(1), total_len)
        writer = CacheWriter(cache, 0, rows, slot.unsqueeze(1), total_len)
        h = latent.backbone(self.x[rows].unsqueeze(1), cache.n_real[rows].unsqueeze(1), mask, kv_hook=writer)[:, 0]
        self.tally(k)
        if latent.router is None:
            self.out[rows] = h  # PonderLM-2 reads out the last slot
        else:
            first = (k == 0).nonzero().squeeze(1)
            if first.numel():
                self.probs[rows[first]] = latent.router(h[first])
                self.w[rows[first]] = tail_weights(self.probs[rows[first]])
            self.out[rows] += self.probs[rows, k].unsqueeze(1).to(h.dtype) * h
        self.x[rows] = h
        next_k = k + 1
        finished = next_k > latent.latent_steps
        if latent.router is not None:  # w is non-increasing: a pruned slot ends the token
            finished |= self.w[rows, next_k.clamp(max=latent.latent_steps)] < latent.tau
        self.slot_index[rows] = next_k
        done = rows[finished]
        cache.n_real[done] += 1
        hidden = self.out[done]
        return RowStep(
            finished=finished,
            hidden=hidden,
            depth=next_k[finished],
            logits=latent.backbone.logits(hidden) if with_logits else None,
        )
