"""Job entrypoints, one per stage: ``python -m rayjobs.<stage> --config ... --output-dir ...``."""
