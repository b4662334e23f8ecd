"""The command line with the laboratory on top: every library command (`ponder_lightning.cli`),
plus `study`, and `evaluate` with the gate study's rankings and probes after its controls.
`python -m ponder_lightning` runs `main` here."""

from __future__ import annotations

from functools import partial

from ponder_lightning import cli


def study_command(argv: list[str]) -> None:
    from ponder_lightning.research.study import study_command as run

    run(argv, fit=cli.run_lightning_cli, check=cli.check_fit_args)


def evaluate_command(argv: list[str]) -> None:
    from ponder_lightning.research.gate_study import gate_study

    cli.evaluate_command(argv, gate_study=gate_study)


COMMANDS = {**cli.COMMANDS, "evaluate": evaluate_command, "study": study_command}
DESCRIPTIONS = {
    **cli.DESCRIPTIONS,
    "evaluate": cli.DESCRIPTIONS["evaluate"] + ", and other choices of which tokens go on",
    "study": "train and evaluate a set of runs (models x seeds) and tabulate them",
}
main = partial(cli.main, commands=COMMANDS, descriptions=DESCRIPTIONS)
