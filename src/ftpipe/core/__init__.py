"""Shared mechanisms: config, run folders, manifests, logging, executor, model references."""
