"""VideoFusion: decomposed diffusion for video generation, in JAX/Flax."""
import time as _time

# When the package's code was loaded: a source file changed after this may not be the code running,
# so no traced program is stored under its digest then (training/program_store.py).
LOADED_AT = _time.time()
