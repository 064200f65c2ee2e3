"""Stages that bring a model into a project: `import-gguf` (ingest/import_gguf.py)."""
