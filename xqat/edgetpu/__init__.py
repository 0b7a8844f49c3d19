"""EdgeTPU readiness: torch-layer rules (before training) and flatbuffer rules (after export), one package."""
