"""A ponder_lightning model as a transformers model (`AutoModelForCausalLM` with remote code).

`python -m ponder_lightning export --format transformers` copies this file into the exported
directory as `modeling_ponder_lightning.py` and names its two classes in config.json's `auto_map`,
so that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the whole
pondering model (feedback, gates, halting) and `model.generate(...)` decodes with it.

The file is a thin wrapper: the recurrence is not copied here but imported from the installed
`ponder_lightning` package, and the model is rebuilt from the class path and init arguments saved
in config.json (exactly as `ponder_lightning.io.load.load_checkpoint` rebuilds it).
One implementation means the exported model computes what was trained, bit for bit, and a fix in
the package reaches every export. The price: loading needs `pip install ponder_lightning`.

`forward` runs the full recurrence on the whole sequence; there is no transformers KV cache
(`use_cache` is off and `past_key_values` are ignored), so `generate` recomputes the sequence at
every step. The library's own adaptive-depth decoding with per-iteration caches is
`python -m ponder_lightning generate` / `ponder_lightning.generate.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:
    import ponder_lightning
except ImportError as exc:  # transformers copies this file elsewhere; the package must be installed
    raise ImportError(
        "this model was exported by ponder_lightning and runs on its code, which is not installed: "
        "pip install ponder_lightning (then load it again with trust_remote_code=True)"
    ) from exc
try:
    from ponder_lightning.io.load import build_model
    from ponder_lightning.nn.backbone import Rotary
except ImportError as exc:  # installed, but a version whose code this file does not know
    raise ImportError(
        f"this model's modeling file does not match the installed ponder_lightning "
        f"{ponder_lightning.__version__} ({exc}): install the version in config.json's "
        "'ponder_lightning_version', or re-export the checkpoint with this one "
        "(python -m ponder_lightning export --format transformers)"
    ) from exc

MODEL_TYPE = "ponder_lightning"


class PonderLightningConfig(PretrainedConfig):
    """`class_path` and `init_args` rebuild the model; the transformers-style fields (vocab_size,
    hidden_size, ...) describe it for tools that read them (lm-eval reads max_position_embeddings)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        class_path: str | None = None,
        init_args: dict[str, Any] | None = None,
        global_step: int = 0,
        tokenizer: str | None = None,
        n_iterations: int | None = None,
        vocab_size: int | None = None,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        max_position_embeddings: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.class_path = class_path
        self.init_args = dict(init_args or {})
        self.global_step = int(global_step)
        self.tokenizer = tokenizer
        self.n_iterations = n_iterations
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


@dataclass
class PonderCausalLMOutput(CausalLMOutput):
    """`CausalLMOutput` plus `depth` [B, T]: the passes each position ran (its halting)."""

    depth: torch.LongTensor | None = None


class PonderLightningForCausalLM(PreTrainedModel, GenerationMixin):
    """The ponder_lightning model named by the config, under `self.model` (a LightningModule)."""

    config_class = PonderLightningConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_cache_class = False
    _no_split_modules: list[str] = []

    def __init__(self, config: PonderLightningConfig) -> None:
        super().__init__(config)
        if not config.class_path:
            raise ValueError(
                "config.json has no class_path: it was not written by "
                "`python -m ponder_lightning export --format transformers`"
            )
        self.model = build_model({"_class_path": config.class_path, **config.init_args}, source="config.json")
        # What the model may do depends on the step it was trained to (gate_start_step).
        self.model.on_load_checkpoint({"global_step": config.global_step})
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no transformers cache: every step runs the whole sequence

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every weight comes from the checkpoint or from the library's own init. transformers
        # builds the model on the meta device and leaves non-persistent buffers empty: the
        # rotary tables are recomputed here.
        if isinstance(module, Rotary):
            with torch.device("cpu"):
                fresh = Rotary(module.cos.shape[1], module.cos.shape[0], self.model.config.rotary_base)
            with torch.no_grad():
                module.cos.copy_(fresh.cos)
                module.sin.copy_(fresh.sin)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.backbone.embed_in

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.backbone.embed_out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,  # past_key_values, use_cache, position_ids...: positions follow attention_mask
    ) -> PonderCausalLMOutput | tuple:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(
                "ponder_lightning models take input_ids (the feedback mixes token embeddings), not inputs_embeds"
            )
        valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()  # padding on either side; positions count real tokens
        hidden, trace = self.model.hidden_states(input_ids, valid)
        logits = self.model.backbone.logits(hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if valid is not None:
                targets = targets.masked_fill(~valid[:, 1:], -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        depth = trace.depth() if hasattr(trace, "depth") else None
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return PonderCausalLMOutput(loss=loss, logits=logits, depth=depth)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole sequence at every step (no cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
