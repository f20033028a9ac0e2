"""The plaintext side of SecP-Tuning: everything outside MPC, grouped by who runs it.

- ``tuning.assets``: models, tokenizers, data sets and tasks, the asset cache, and the model
  owner's offline tools (``convert``, ``generate``). Run by whoever holds the asset.
- ``tuning.backends``: how values move between parties, the only code that secret-shares or
  reconstructs: the session contract, the plaintext reference, the SPU simulator, and the
  cluster (the driver's client half ``rpc`` and the party processes ``node``).
- ``tuning.loop``: the data owner's forward-only tuning: encoding, the subspace, the search,
  the secure scorer and the trainer (``run_generation`` is one generation, top to bottom).
- ``tuning.policy``: the policies in ``policies/`` (protocol, numerics, parties, reveal).
- ``tuning.cli``: the ``secptune`` command.

Importing any of them changes nothing in the environment; :func:`configure_jax` does, and the
CLI, the tests and the example scripts call it first.
"""
from __future__ import annotations

import os

# XLA's CPU back end rewrites dots into oneDNN matmul calls and fuses a following broadcast add
# (the constant attention-mask bias) as a post-op, which oneDNN then runs with its *reference*
# kernel ("MatMul reference implementation being executed"): measured 15x slower for a plaintext
# SmolLM2 forward at 8 x 224 tokens (80 s -> 5.5 s). Plain Eigen dots are fast. SPU compiles
# through its own pipeline and is unaffected.
XLA_FLAG = "--xla_disable_hlo_passes=onednn-matmul-rewriter"


def configure_jax(cache_dir=None) -> None:
    """Set up JAX for this project; call before JAX computes anything.

    - CPU only (``JAX_PLATFORMS=cpu`` unless set), and the XLA flag above (it must be in the
      environment before JAX initialises its back end);
    - a persistent compilation cache in ``cache_dir`` (default ``$SECPTUNE_HOME/jax-cache``): a
      30-layer program takes minutes to compile on 2 cores, and the same shapes recur from run
      to run. ``cache_dir=False`` leaves it off."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAG).strip()
    if cache_dir is False:
        return
    import jax

    from .assets.cache import secptune_home

    jax.config.update("jax_compilation_cache_dir", str(cache_dir or secptune_home() / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
