"""Training stages: one module per stage, each exposing run(config) -> Path."""
