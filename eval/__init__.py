"""Gates, metrics and reports; the gate table is registry.py (GATES). No stage code."""
