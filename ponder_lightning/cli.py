"""Command line: LightningCLI (fit/validate/test/predict) with project defaults.

User mistakes (`UserError`) print as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ponder_lightning.callbacks import DepthMonitor, FitSummary, TokenThroughput
from ponder_lightning.data import PileDataModule
from ponder_lightning.errors import UserError
from ponder_lightning.models import CausalLMModule


class PonderCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's vocabulary follows the tokenizer (padded to a multiple of 128 by the model).
        parser.link_arguments("data.vocab_size", "model.init_args.tokenizer_vocab_size", apply_on="instantiate")


def run_lightning_cli(args: list[str] | None = None) -> PonderCLI:
    return PonderCLI(
        CausalLMModule,
        PileDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # The DataModule shards batches across ranks itself (sampling is a pure function of
        # seed, step and rank), so Lightning must not wrap its sampler.
        trainer_defaults={"use_distributed_sampler": False, "callbacks": [TokenThroughput(), DepthMonitor(), FitSummary()]},
        args=args,
    )


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind an exception, if any (jsonargparse wraps errors raised while it
    instantiates the model or data module)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def main(args: list[str] | None = None) -> None:
    try:
        run_lightning_cli(args)
    except Exception as err:
        cause = user_error_in(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
