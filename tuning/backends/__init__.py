"""Back ends that run ``spu_models.forward`` for the data owner, behind one interface.

    backend = make_backend("sim", bundle, policy)   # the model owner shares the weights once
    logits = backend.forward(batch)                 # data owner's batch in, opened logits out
    backend.costs[-1]                               # CallCost of that call (None in plaintext)
    backend.close()

- ``plaintext``: the same function under ``jax.jit``.
- ``sim``: SPU's protocols in one process, one runtime per party over in-memory links.
- ``cluster``: one OS process per party, SPU runtimes over brpc links (``tuning.backends.cluster``).
"""
from __future__ import annotations

BACKENDS = ("plaintext", "sim", "cluster")


def make_backend(name: str, bundle, policy, **kw):
    if name == "plaintext":
        from .plaintext import PlaintextBackend

        return PlaintextBackend(bundle, policy)
    if name == "sim":
        from .sim import SimBackend

        return SimBackend(bundle, policy)
    if name == "cluster":
        from .cluster import ClusterBackend

        return ClusterBackend(bundle, policy, **kw)
    raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
