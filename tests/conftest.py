import os

# Keep JAX on CPU and quiet in tests; the SPU simulator shares the same process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
