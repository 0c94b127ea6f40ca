"""Utility models: upscalers, background removers, captioners and prompt enhancers, each a
models-file entry run by the utility engine (engine/utility.py), not by the image scheduler."""
