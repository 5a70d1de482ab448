"""align: from (instruction, response) pairs and annotators' rankings to an aligned, gated model."""

__version__ = "0.1.0"
