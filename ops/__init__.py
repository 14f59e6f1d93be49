"""Pure math of Warped Diffusion: GP noise, flow algebra, noise warping, guided EDM sampling, metrics.

No I/O, no Prefect, no MLflow; randomness is always passed in.
"""
