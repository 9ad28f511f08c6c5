"""The click application (installed as bnfold.cli)."""
