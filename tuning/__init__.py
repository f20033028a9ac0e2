"""The plaintext side of SecP-Tuning: everything outside MPC, one package per party.

- ``tuning.data_owner``: the data owner. Its data and tasks, the encoding of its texts, the
  forward-only tuning loop (subspace, search, the secure scorer, the trainer), the heads it fits
  on opened logits, the run directory, ``predict``/``eval``.
- ``tuning.model_owner``: the model owner. Its checkpoints (``models``), the one model it serves
  and what others get of it (``owner.ModelOwner``), the programs it approves (``approval``), and
  its offline tools (``convert``: attention transfer; ``generate``).
- ``tuning.compute_party``: a compute party. SPU's runtime over the shares it holds
  (``party.ComputeParty``), its gate (``gate``), its kept set-up shares (``state``), its own
  traffic (``traffic``).
- ``tuning.transports``: how the roles' calls travel. The data owner's session contract
  (``session``) and its back ends: ``plaintext``, the in-process simulator (``sim``), gRPC
  nodes (``cluster`` the driver, ``node`` the party processes, ``rpc``, ``tls``) and SecretFlow
  (``secretflow``, ``sfcluster``); ``procs`` launches and reaps party processes.
- The shared base: ``policy`` (protocol, numerics, parties, reveal), ``programs`` (compiling and
  binding SPU programs), ``datasets`` and ``cache`` (public corpora and the asset cache),
  ``errors``. The entry points: ``cli`` (``secptune``) and ``sfjob`` (a SecretFlow party's process).

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

    from .cache import secptune_home

    jax.config.update("jax_compilation_cache_dir", str(cache_dir or secptune_home() / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
