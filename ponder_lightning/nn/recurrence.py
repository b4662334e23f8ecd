"""The token recurrence every pondering model shares; its iteration step is written once.

    state = feedback.initial(embeddings); active = m^0 (every real token)
    for i in range(n_iterations):
        h = backbone(feedback.inputs(state), K/V of halted tokens kept from their last iteration)
        out = where(active, h, out)                 # readout from each token's last active pass
        if last: break
        decision = gate(h, i, active)               # soft scores s^i and the next mask m^{i+1}
        state = feedback.update(state, h, m^{i+1} * s^i)

`Recurrence.step` is the loop body. Its three execution forms differ only in which tokens they
hand it and where K/V live: training (`__call__`: every token at every iteration, halted ones
masked with `where`, K/V aligned in `KVAlignment`), prefill (`extend`: each row's active tokens
gathered, K/V in the `KVCache`) and row-wise decoding (`nn/rowwise.py`: one token per row, rows at
different iterations).

PonderLM (probability-weighted embedding feedback), LoopTransformer (hidden-state feedback) and
AdaPonderLM (PonderLM + learned gate) differ only in the feedback and the gate plugged in; the
vanilla model is the one-iteration case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ponder_lightning.nn.backbone import Backbone, KVHook, Mask, causal_mask, positions_from_valid, softmax_dtype
from ponder_lightning.nn.cache import CacheWriter, KVCache
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.nn.mixture import fused_vocab_mixture, fuses
from ponder_lightning.nn.onednn import prepacked_weights, vocab_mixture


@dataclass
class PassOutput:
    """A backbone pass's output for some tokens: before (`raw`) and after (`h`) the final norm,
    and the LM head's `logits` of `h` when the caller has them already."""

    raw: Tensor
    h: Tensor
    logits: Tensor | None = None


class Feedback:
    """How one iteration's output becomes the next iteration's input (no parameters of its own)."""

    #: True when the update reads the LM head's logits of the pass (decoding then computes them
    #: once for the tokens that go on and the tokens that are done).
    reads_logits: bool = False

    def initial(self, embeds: Tensor) -> Tensor:
        return embeds

    def inputs(self, state: Tensor, embeds: Tensor, iteration: int | Tensor) -> Tensor:
        """Backbone input; `iteration` is one int, or one per row (row-wise decoding)."""
        return state

    def update(self, backbone: Backbone, state: Tensor, out: PassOutput, weight: Tensor | None) -> Tensor:
        """Next state from the pass's output; `weight` [B, T] = m^{i+1} * s^i, or None when
        every token continues ungated."""
        return out.raw

    def extra_flops_per_token(self, backbone: Backbone) -> float:
        """FLOPs per token of one feedback computation (e.g. the pondering mixture)."""
        return 0.0


class PonderFeedback(Feedback):
    """PonderLM: E <- E + softmax(embed_out(h)) @ V, V the (scaled) input embedding table.

    The mixture is scaled like the token embeddings (`Backbone.embed_scale`).

    Args:
        top_k: mix only the k most probable tokens' embeddings (None = full vocabulary).
        start_multiplier: E starts at start_multiplier * E0 (PonderLM's multiply_pondering_steps).
    """

    def __init__(self, top_k: int | None = None, start_multiplier: float = 1.0) -> None:
        self.top_k, self.start_multiplier = top_k, start_multiplier

    def initial(self, embeds: Tensor) -> Tensor:
        return embeds * self.start_multiplier if self.start_multiplier != 1.0 else embeds

    reads_logits = True

    def mixture(self, backbone: Backbone, out: PassOutput) -> Tensor:
        table, head = backbone.embed_in.weight, backbone.embed_out.weight
        if self.top_k is None and out.logits is None and fuses(out.h, head, table):  # training
            return fused_vocab_mixture(out.h.flatten(0, -2), head, table).view(out.h.shape) * backbone.embed_scale
        logits = backbone.logits(out.h) if out.logits is None else out.logits
        logits = logits.to(softmax_dtype(logits.dtype))
        if self.top_k is None:
            mixed = vocab_mixture(logits.softmax(dim=-1).to(table.dtype), table)
        else:
            top_logits, top_ids = logits.topk(self.top_k, dim=-1)
            probs = top_logits.softmax(dim=-1).to(table.dtype)
            mixed = torch.einsum("...k,...kd->...d", probs, table[top_ids])
        return mixed * backbone.embed_scale

    def update(self, backbone: Backbone, state: Tensor, out: PassOutput, weight: Tensor | None) -> Tensor:
        mixed = self.mixture(backbone, out)
        return state + mixed if weight is None else state + weight.unsqueeze(-1).to(mixed.dtype) * mixed

    def extra_flops_per_token(self, backbone: Backbone) -> float:
        cfg = backbone.config
        mixed_rows = self.top_k or cfg.vocab_size
        return 2.0 * cfg.d_model * cfg.vocab_size + 2.0 * cfg.d_model * mixed_rows


class LoopFeedback(Feedback):
    """LoopTransformer: the next pass reads this pass's raw (pre-final-norm) hidden states.

    With a gate, a continuing token moves towards its new state by its score:
    state + s * (h - state), which is exactly h at s = 1.

    Args:
        input_injection: add the token embeddings to every later pass's input (h + E0).
    """

    def __init__(self, input_injection: bool = False) -> None:
        self.input_injection = input_injection

    def inputs(self, state: Tensor, embeds: Tensor, iteration: int | Tensor) -> Tensor:
        if not self.input_injection:
            return state
        if isinstance(iteration, int):
            return state + embeds if iteration > 0 else state
        later = (iteration > 0).view(-1, *(1,) * (state.dim() - 1))  # one iteration per row
        return torch.where(later, state + embeds, state)

    def update(self, backbone: Backbone, state: Tensor, out: PassOutput, weight: Tensor | None) -> Tensor:
        return out.raw if weight is None else state + weight.unsqueeze(-1).to(out.raw.dtype) * (out.raw - state)


def feedback_weight(gate: Gate, decision: GateDecision, dtype: torch.dtype) -> Tensor | None:
    """m^{i+1} * s^i, the per-token weight of the feedback update: None when no token can halt
    (the exact ungated update), the mask alone for gates without scores."""
    if not gate.can_halt:
        return None
    weight = decision.active.to(dtype)
    return weight if decision.scores is None else weight * gate.feedback_scale(decision.scores).to(dtype)


class KVAlignment:
    """KV reuse in the training-time `where` form: in every layer, a token that is not active at
    this iteration attends and is attended with the K/V of its last active iteration.

    One instance per iteration, one `AlignedLayer` per layer; each only reads the previous
    iteration's K/V and writes its own, so re-running it under activation checkpointing
    recomputes the same values.
    """

    def __init__(self, previous: KVAlignment | None, active: Tensor) -> None:
        self.previous = previous
        self.keep_new = active[:, None, :, None]
        self.layers: dict[int, AlignedLayer] = {}

    def for_layer(self, layer: int) -> AlignedLayer:
        if layer not in self.layers:
            old = None if self.previous is None else self.previous.layers[layer].kv
            self.layers[layer] = AlignedLayer(old, self.keep_new)
        return self.layers[layer]

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.for_layer(layer)(k, v)


class AlignedLayer:
    """One layer's KV alignment: tensors only, so a compiled block traces it without a layer index."""

    def __init__(self, old: tuple[Tensor, Tensor] | None, keep_new: Tensor) -> None:
        self.old, self.keep_new = old, keep_new
        self.kv: tuple[Tensor, Tensor] | None = None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.old is not None:
            k, v = torch.where(self.keep_new, k, self.old[0]), torch.where(self.keep_new, v, self.old[1])
        self.kv = (k, v)
        return k, v


@dataclass
class Trace:
    """What the recurrence did: `active[i]` = m^i (bool [B, T]) for every iteration,
    `scores[i]` = s^i for every decision (None for gates without scores)."""

    active: list[Tensor] = field(default_factory=list)
    scores: list[Tensor | None] = field(default_factory=list)

    def depth(self) -> Tensor:
        """Iterations each token ran, [B, T] (0 for padding)."""
        return torch.stack(self.active).sum(0)

    def detach(self) -> Trace:
        return Trace([a.detach() for a in self.active], [None if s is None else s.detach() for s in self.scores])

    def active_fractions(self) -> Tensor:
        """Fraction of the real tokens that ran each iteration, [n_iterations] (the first is 1)."""
        counts = torch.stack([a.sum() for a in self.active]).float()
        return counts / counts[0].clamp(min=1)


@dataclass
class Iteration:
    """What one iteration step did for the tokens it was given: `h` the readout (after the final
    norm); after every iteration but the last, `go` the tokens that run the next one, `scores`
    the gate's s^i and `state` their next state (see `Recurrence.step`); `logits` of every token
    when the step computed them for the feedback and the caller asked to keep them."""

    h: Tensor
    go: Tensor | None = None
    scores: Tensor | None = None
    state: Tensor | None = None
    logits: Tensor | None = None


class Recurrence:
    """Runs `n_iterations` backbone passes with a feedback rule and a gate (see module docstring).

    A plain object, not a module: the backbone (and the gate each call is given) are registered
    on the LightningModule, so checkpoints hold each parameter once under its natural name.
    """

    def __init__(self, backbone: Backbone, feedback: Feedback, n_iterations: int) -> None:
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        self.backbone, self.feedback, self.n_iterations = backbone, feedback, n_iterations

    def step(
        self,
        gate: Gate,
        state: Tensor,
        embeds: Tensor,
        iteration: int | Tensor,
        tokens: Tensor,
        positions: Tensor | None,
        active: Tensor,
        mask: Mask,
        kv_hook: KVHook | None,
        gathered: bool = False,
        keep_logits: bool = False,
    ) -> Iteration:
        """One iteration for tokens [N, A] (state and embeds [N, A, d]): the backbone pass (K/V go
        through `kv_hook`), the readout, the gate's decision and the next state.

        `iteration`: an int, or one per row [N] when rows are at different iterations (row-wise
        decoding; the gate then runs once per distinct iteration, since its parameters are per
        iteration). `positions`: rotary positions (None = 0..A-1 in every row). `gathered`: the
        next state only for the tokens that go on, flat in `go.nonzero()` order, as the decode
        forms keep it (PonderLM's mixture reads the whole vocabulary, so halted tokens should not
        pay for it); otherwise every token's, halted ones with weight 0, as training keeps its
        shapes static. `keep_logits`: return the logits of every token when the feedback
        computed them (decoding samples the finished tokens from the same product).
        """
        h_raw = self.backbone(
            self.feedback.inputs(state, embeds, iteration), positions, mask, kv_hook=kv_hook, final_norm=False
        )
        h = self.backbone.final_layer_norm(h_raw)
        if isinstance(iteration, int) and iteration == self.n_iterations - 1:
            return Iteration(h)
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[:2])
        go, scores, weight = self.decide(gate, h, iteration, active, tokens, positions)
        if not gathered:
            return Iteration(h, go, scores, self.feedback.update(self.backbone, state, PassOutput(h_raw, h), weight))
        going = go.nonzero(as_tuple=True)
        if going[0].numel() == 0:
            return Iteration(h, go, scores)
        logits = self.backbone.logits(h) if keep_logits and self.feedback.reads_logits else None
        out = PassOutput(h_raw[going], h[going], None if logits is None else logits[going])
        state = self.feedback.update(self.backbone, state[going], out, None if weight is None else weight[going])
        return Iteration(h, go, scores, state, logits)

    def decide(
        self, gate: Gate, h: Tensor, iteration: int | Tensor, active: Tensor, tokens: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The tokens that run the next iteration, the gate's scores (one iteration only) and the
        feedback weight m^{i+1} * s^i (None when nothing can halt). Tokens at the last iteration
        never go on."""
        if isinstance(iteration, int):
            decision = gate(h, iteration, active, tokens, positions)
            return decision.active, decision.scores, feedback_weight(gate, decision, h.dtype)
        go = torch.zeros_like(active)
        weight = torch.ones(active.shape, dtype=h.dtype, device=h.device) if gate.can_halt else None
        for i in iteration.unique().tolist():
            if i == self.n_iterations - 1:
                continue
            rows = (iteration == i).nonzero().squeeze(1)
            decision = gate(h[rows], i, active[rows], tokens[rows], positions[rows])
            go[rows] = decision.active
            if weight is not None:
                weight[rows] = feedback_weight(gate, decision, h.dtype)
        return go, None, weight

    def __call__(self, tokens: Tensor, valid: Tensor | None, gate: Gate) -> tuple[Tensor, Trace]:
        """Training form: final hidden states [B, T, d] (after the final norm) and the trace of
        halting."""
        if valid is None:
            positions, mask, active = None, None, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        else:
            positions, mask, active = positions_from_valid(valid), causal_mask(valid), valid.bool()
        embeds = self.backbone.embed(tokens)
        state = self.feedback.initial(embeds)
        trace, out, alignment = Trace(), None, None
        for i in range(self.n_iterations):
            trace.active.append(active)
            if gate.can_halt:
                alignment = KVAlignment(alignment, active)
            step = self.step(gate, state, embeds, i, tokens, positions, active, mask, alignment)
            out = step.h if out is None else torch.where(active.unsqueeze(-1), step.h, out)
            if step.go is None:
                break
            trace.scores.append(step.scores)
            state, active = step.state, step.go
        return out, trace

    @torch.no_grad()
    @prepacked_weights()
    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache, gate: Gate) -> tuple[Tensor, Tensor, list[int]]:
        """Prefill form: run new tokens [B, T_new] (a prompt, or one token per row when decoding
        in lock-step) against per-iteration caches holding the prefix.

        Each iteration runs the backbone only on the tokens still active, gathered to the front of
        their row; halted tokens cost nothing there and their K/V are inherited from the previous
        iteration's cache. Results equal the training form. Returns hidden states
        [B, T_new, d], depth per token [B, T_new] (0 for padding) and the number of
        token-evaluations the backbone ran at each iteration.
        """
        slots, positions = cache.reserve(valid)
        total_len = int(cache.fill[0])
        embeds = self.backbone.embed(tokens)
        state = self.feedback.initial(embeds).clone()  # updated in place below; embeds must survive
        out = torch.zeros_like(embeds)
        active = valid.bool().clone()
        depth = torch.zeros(tokens.shape, dtype=torch.long, device=tokens.device)
        evaluations = [0] * self.n_iterations
        for i in range(self.n_iterations):
            if i > 0:
                halted_rows, halted_cols = (~active).nonzero(as_tuple=True)
                cache.inherit(i, halted_rows, slots[halted_cols])
            counts = active.sum(1)
            rows = counts.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue  # nothing left to run; later iterations only inherit K/V
            evaluations[i] = int(counts.sum())
            depth += active
            # Gather each row's active tokens to the front; padding entries repeat the row's first
            # active token, so every write they cause is identical to a real one.
            width = int(counts.max())
            order = torch.argsort((~active[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
            real = torch.arange(width, device=tokens.device) < counts[rows].unsqueeze(1)
            cols = torch.where(real, order, order[:, :1])
            pick = (rows.unsqueeze(1), cols)
            writer = CacheWriter(cache, i, rows, slots[cols], total_len)
            mask = cache.attention_mask(rows, slots[cols], total_len)
            step = self.step(
                gate, state[pick], embeds[pick], i, tokens[pick], positions[pick], real, mask, writer, gathered=True
            )
            out[pick] = step.h
            if step.go is None:
                break
            going = step.go.nonzero(as_tuple=True)
            target = (rows[going[0]], cols[going])
            if step.state is not None:
                state[target] = step.state
            active = torch.zeros_like(active)
            active[target] = True
        return out, depth, evaluations
