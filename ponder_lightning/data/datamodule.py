"""``PileDataModule``: packed language-modelling batches from Pile-format text or token shards."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cached_property
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from ponder_lightning.data.megatron import is_megatron, load_megatron
from ponder_lightning.data.packing import PackedBlocks, split_documents
from ponder_lightning.data.sampling import EvalBatchSampler, TrainBatchSampler
from ponder_lightning.data.shards import TokenStream, load_token_shards
from ponder_lightning.data.sources import check_disjoint, embedded_corpus, resolve_sources
from ponder_lightning.data.tokenized import cached_token_stream
from ponder_lightning.data.tokenizer import Tokenizer, load_tokenizer
from ponder_lightning.errors import UserError
from ponder_lightning.validation import HalfOpenUnitInterval, NonNegativeInt, PositiveInt, check_init_args


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is part of the checkpoint: Lightning saves `state_dict()` (its
    `TrainBatchSampler`'s next global batch) and calls `load_state_dict` on resume, so it knows the
    loader continues mid-epoch exactly (and does not warn that it is not resumable)."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class PileDataModule(L.LightningDataModule):
    """Pythia-style packed token blocks, reproducible across restarts and world sizes.

    Every document is tokenised, followed by EOS and concatenated into one stream per split;
    batches are ``LongTensor[batch_size // world_size, seq_len + 1]`` of consecutive tokens (the
    model shifts inputs and targets). Tokenising happens once, in ``prepare_data`` (or ``setup``
    if that is all that runs), into an on-disk cache.

    Training batch ``g`` is a pure function of (seed, g, rank), and the train loader starts at
    the trainer's micro-batch count (``global_step * accumulate_grad_batches``), so a run resumed
    from a checkpoint sees exactly the batches an uninterrupted run would have seen.

    The module shards batches across ranks itself: build the Trainer with
    ``use_distributed_sampler=False`` (otherwise Lightning would try to replace the sampler in
    distributed runs; this module raises a ``UserError`` instead of letting that happen).
    ``overfit_batches`` is not supported for the same reason.

    Args:
        data_files: Pile-format ``*.jsonl`` / ``*.jsonl.zst`` files (records with a text field),
            plain ``*.txt`` files (one document each), directories or globs of them, or a Hugging
            Face dataset name (online only). None uses the CPython documentation corpus shipped
            with the package.
        val_files: Separate validation files in the same forms. Without them the last
            ``val_fraction`` of the documents are held out.
        tokens: Pre-tokenised data instead of ``data_files``: a directory written by
            ``prepare`` / ``write_token_shards`` (``meta.json`` + ``*.bin`` shards) or one shard
            of it, or Megatron ``.bin``/``.idx`` data such as Pythia's pre-tokenised Pile (a path
            prefix, the ``.idx`` or ``.bin`` file, or their directory). It must have been made
            with the same tokenizer.
        tokenizer: ``neox`` (Pythia's GPT-NeoX-20B tokenizer, bundled), ``bytes`` (UTF-8
            bytes), a local ``tokenizer.json`` or Hugging Face tokenizer directory, or a hub name
            (online only).
        seq_len: Tokens per training sequence; each block holds ``seq_len + 1`` tokens.
        batch_size: Global batch per micro-step across all ranks; each rank loads
            ``batch_size // world_size`` sequences, so the world size must divide it.
        val_fraction: Fraction of documents held out for validation when ``val_files`` is unset.
        val_batches: Global validation batches per evaluation (fewer if there is not enough
            validation data).
        seed: Seed of the training order.
        cache_dir: Token cache directory (default: ``$PONDER_CACHE`` or
            ``~/.cache/ponder_lightning``).
        num_workers: DataLoader worker processes (0 reads blocks in the main process, which is
            usually fast enough because blocks are slices of memory-mapped files).
        text_field: Record field holding the document text in JSON lines files.
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        tokens: str | None = None,
        tokenizer: str = "neox",
        seq_len: PositiveInt = 256,
        batch_size: PositiveInt = 8,
        val_fraction: HalfOpenUnitInterval = 0.05,
        val_batches: NonNegativeInt = 8,
        seed: NonNegativeInt = 1234,
        cache_dir: str | None = None,
        num_workers: NonNegativeInt = 0,
        text_field: str = "text",
    ) -> None:
        check_init_args(PileDataModule, locals())
        super().__init__()
        if data_files is not None and tokens is not None:
            raise UserError(
                "data.data_files and data.tokens are both set: pass text files or pre-tokenised data, not both"
            )
        for name, files in (("data_files", data_files), ("val_files", val_files)):
            if isinstance(files, list) and not files:
                raise UserError(f"data.{name} is an empty list: pass at least one file, or leave it unset")
        self.save_hyperparameters()
        self.data_files, self.val_files, self.tokens = data_files, val_files, tokens
        self.tokenizer_spec, self.text_field, self.cache_dir = tokenizer, text_field, cache_dir
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.val_fraction, self.val_batches, self.num_workers = val_fraction, val_batches, num_workers
        self.train_dataset: PackedBlocks | None = None
        self.val_dataset: PackedBlocks | None = None

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any], **overrides: Any) -> PileDataModule:
        """The data module a checkpoint or export recorded (`load_checkpoint(...).data`, whose
        other entries, e.g. `global_step`, are not arguments), with `overrides`: how `evaluate`
        and a study validate on the blocks a run held out."""
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**({k: v for k, v in recorded.items() if k in accepted} | overrides))

    @cached_property
    def tokenizer_obj(self) -> Tokenizer:
        """The configured tokenizer (loaded on first use)."""
        return load_tokenizer(self.tokenizer_spec)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can emit; the model pads its embedding table beyond this."""
        return self.tokenizer_obj.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer_obj.eos_id

    def prepare_data(self) -> None:
        """Tokenise into the cache (Lightning calls this on one process per node)."""
        self._streams()

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached streams and check there is enough data for one step."""
        if self.train_dataset is not None:
            return
        train, val = self._streams()
        need = self.seq_len + 1
        if len(train) < need:
            raise UserError(
                f"training data ({self._describe_train()}) has {len(train)} tokens but seq_len={self.seq_len} needs at "
                f"least {need}: add data, or lower data.seq_len or data.val_fraction"
            )
        self.train_dataset, self.val_dataset = PackedBlocks(train, self.seq_len), PackedBlocks(val, self.seq_len)
        if len(self.train_dataset) < self.batch_size:
            raise UserError(
                f"training data ({self._describe_train()}) gives {len(self.train_dataset)} blocks of {need} tokens, "
                f"fewer than one global batch (data.batch_size={self.batch_size}): add data, or lower data.seq_len "
                "or data.batch_size"
            )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank_and_world()
        sampler = TrainBatchSampler(
            len(self.train_dataset), self.batch_size, rank, world, self.seed, self._start_batch()
        )
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        """The first ``val_batches`` global batches of validation blocks, in order."""
        self.setup("validate")
        rank, world = self._rank_and_world()
        num_batches = min(self.val_batches, len(self.val_dataset) // self.batch_size)
        if num_batches == 0 and (self.val_fraction > 0 or self.val_files is not None):
            rank_zero_warn(
                f"validation data gives {len(self.val_dataset)} blocks of {self.seq_len + 1} tokens, fewer "
                f"than one global batch (data.batch_size={self.batch_size}), so nothing is validated: raise "
                "data.val_fraction, pass larger data.val_files, or lower data.seq_len or data.batch_size"
            )
        return self._loader(self.val_dataset, EvalBatchSampler(num_batches, self.batch_size, rank, world))

    def _loader(self, dataset: PackedBlocks, sampler: TrainBatchSampler | EvalBatchSampler) -> DataLoader:
        return (ResumableDataLoader if isinstance(sampler, TrainBatchSampler) else DataLoader)(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _streams(self) -> tuple[TokenStream, TokenStream]:
        """(train, val) token streams, tokenising into the cache when needed."""
        tok = self.tokenizer_obj
        val_sources = resolve_sources(self.val_files) if self.val_files is not None else None
        if self.tokens is not None:
            stream, num_docs = (load_megatron if is_megatron(self.tokens) else load_token_shards)(self.tokens, tok)
        else:
            sources = resolve_sources(self.data_files) if self.data_files is not None else embedded_corpus()
            if val_sources is not None:
                check_disjoint(sources, val_sources)
            stream, num_docs = cached_token_stream(sources, tok, self.text_field, self.cache_dir, log=rank_zero_info)
        if val_sources is not None:
            val, _ = cached_token_stream(val_sources, tok, self.text_field, self.cache_dir, log=rank_zero_info)
            return stream, val
        return split_documents(stream, num_docs, self.val_fraction, tok.eos_id)

    def _describe_train(self) -> str:
        if self.tokens is not None:
            return f"data.tokens={self.tokens}"
        return f"data.data_files={self.data_files}" if self.data_files is not None else "the embedded corpus"

    def _rank_and_world(self) -> tuple[int, int]:
        """Rank and world size from the attached trainer (0/1 when used on its own)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False) and getattr(connector, "is_distributed", False):
            raise UserError(
                "Trainer(use_distributed_sampler=True) would replace PileDataModule's sampler, which already shards "
                "batches by rank: create the Trainer with use_distributed_sampler=False"
            )
        if self.batch_size % trainer.world_size:
            raise UserError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by the world size "
                f"{trainer.world_size} (devices x nodes): use a multiple of {trainer.world_size}"
            )
        return trainer.global_rank, trainer.world_size

    def _start_batch(self) -> int | Callable[[], int]:
        """Where training resumes: the trainer's micro-batch count, read when each epoch starts."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return lambda: trainer.global_step * trainer.accumulate_grad_batches
