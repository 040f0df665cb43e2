"""Parameter decomposition (APD, SPD) of toy models and of trained transformers' matrices (docs/decompose.md)."""
