"""The stages: one module each, run(cfg, resume, force, callbacks) -> StageResult (core/stage.py), listed once in
registry.py (STAGES). A stage imports no other stage: what they share is in lib/."""
