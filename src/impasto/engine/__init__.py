"""Scheduling of generation jobs onto backends: lanes per model, batching, progress."""
