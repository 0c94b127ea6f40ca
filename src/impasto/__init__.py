"""impasto: a self-hosted image inference server that speaks the Runware task API."""

__version__ = "0.1.0"
