"""Sampling a pipeline into uint8 images, one seed per image: ``fastpref.pairs.sampling``'s
``sample_images`` (kept importable here for the demo and the tiny builder)."""

from fastpref.pairs.sampling import guidance_kwargs, sample_images

__all__ = ["guidance_kwargs", "sample_images"]
