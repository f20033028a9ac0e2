"""How values move between parties: the only code that secret-shares or reconstructs.

Who runs it: the data owner's process drives a session (``session.Session``, the contract every
back end keeps); under ``cluster`` each compute party and the model owner run ``node`` in their
own process, and ``rpc`` is the client half of those links.

Back ends that run ``spu_models.forward`` and the tuning programs for the data owner:

    backend = make_backend("sim", bundle, policy)   # the model owner shares the weights once
    logits = backend.forward(batch)                 # data owner's batch in, opened logits out
    backend.costs[-1]                               # CallCost of that call (None in plaintext)
    backend.close()

- ``plaintext``: the same function under ``jax.jit``.
- ``sim``: SPU's protocols in one process, one runtime per party over in-memory links.
- ``cluster``: one OS process per party, SPU runtimes over brpc links (``tuning.transports.cluster``).
- ``secretflow``: the job as a SecretFlow application, one process per party, SecretFlow's PYU and
  SPU devices (``tuning.transports.secretflow``; inside ``secptune sf-job`` only).

``open_backend`` also gives the data owner's view of the model: under ``cluster`` that is the
tokenizer and the model owner's public config, never the weights.
"""
from __future__ import annotations

from ..model_owner.models import ModelBundle, load_model, load_tokenizer, with_policy
from ..errors import UserError

BACKENDS = ("plaintext", "sim", "cluster", "secretflow")


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
    if name == "secretflow":
        from .secretflow import SecretFlowBackend

        return SecretFlowBackend(bundle, policy, **kw)
    raise UserError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")


def open_backend(name: str, model: str, policy, **kw):
    """``(backend, bundle)``: a back end for ``model`` under ``policy``, and the model as the data
    owner's process sees it.

    ``plaintext`` and ``sim`` run every party in this process, so the bundle holds the weights.
    ``cluster`` keeps them at the model owner's node: this process loads only the tokenizer
    (``models.load_tokenizer``), takes the config the model owner publishes, and its bundle has
    ``params=None``. Everything the data owner may learn of the weights it asks the back end for
    (``embedding_stats()``; ``embedding_table()`` under ``embedding: data_owner``)."""
    if name in ("cluster", "secretflow"):  # the weights stay with the model owner
        tok = load_tokenizer(model)
        backend = make_backend(name, ModelBundle(model, None, None, tok), policy, **kw)
        return backend, ModelBundle(model, backend.config, None, tok, backend.execution)
    bundle = with_policy(load_model(model), policy)
    return make_backend(name, bundle, policy, **kw), bundle
