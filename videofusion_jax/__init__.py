"""VideoFusion: decomposed diffusion for video generation, in JAX/Flax."""
