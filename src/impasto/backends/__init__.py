"""What turns jobs into images: the Backend protocol, the model registry, and the diffusers,
tiny and provider backends. The only package that imports torch or diffusers."""
