"""The laboratory, above the library: ablation studies (`study`), the gate study's rankings and
probes (`gate_study`, `controls`), and the command line that adds them (`cli`).

It imports the library and nothing in the library imports it (tests/test_layering.py): a model,
a gate or an entry point never depends on an experiment. `python -m ponder_lightning` runs this
layer's `cli.main`, so every command, the library's and the laboratory's, is one command line.
"""
