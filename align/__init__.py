"""align: from (instruction, response) pairs and annotators' rankings to an aligned, gated model.

This package is the top floor: the entry points (cli, data_cli, pipeline, sweep, annotate, launch). The floors
below are data_schemas/, core/, lib/, eval/ and stages/ (docs/architecture.md)."""

__version__ = "0.1.0"
