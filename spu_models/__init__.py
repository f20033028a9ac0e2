"""Pure JAX/Flax code that runs inside MPC: models, attention, approximations, loading, compilation.

Nothing in this package does I/O except the checkpoint loaders in ``spu_models.loading``, which
only read files they are handed.
"""
