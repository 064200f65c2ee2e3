"""Data stages: reading, validating and normalising datasets (`preprocess-sft`)."""
