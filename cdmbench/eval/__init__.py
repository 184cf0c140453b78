"""Evaluation: generation harness, metrics and result files."""
