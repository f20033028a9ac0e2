"""The model owner: one model, fixed when it starts, and what the other parties may get of it.

Every transport carries calls to a :class:`ModelOwner` (a gRPC node, a SecretFlow party, the
simulator in-process); none takes a model path from a request, and none hands out the weights:
the compute parties get shares of them, the data owner public metadata and, only where the
policy says ``embedding: data_owner``, the embedding table.
"""
from __future__ import annotations

import jax
import numpy as np

from ..errors import Refused
from ..programs import param_names, shapes_of
from . import approval as approvals
from .models import EmbeddingStats, load_model, policy_execution


class ModelOwner:
    """``model``: the name of the one model served (loaded on first use), or an already loaded
    ``ModelBundle`` (in-process transports). ``execution``: how its programs run, if not the
    policy's for this model (a benchmark's variant, in-process only)."""

    def __init__(self, policy, model, execution=None):
        self.policy, self.execution = policy, execution
        self.served = model if isinstance(model, str) else model.name
        self._bundle = None if isinstance(model, str) else model
        self._approved: dict = {}  # Request -> (Approval, serialized executable)
        self._weights: list | None = None

    def bundle(self, name: str | None = None):
        """The served model; a request that names another is refused (and learns nothing of
        which paths exist on this host)."""
        if name is not None and name != self.served:
            raise Refused(f"the model owner serves model {self.served!r}, not {str(name)[:80]!r} "
                          "(start it with that model)")
        if self._bundle is None:
            self._bundle = load_model(self.served)
        return self._bundle

    def meta(self) -> dict:
        """What every party may know of the model: its config, the weights' shapes (what
        compiling needs) and the embedding table's statistics. Never a value."""
        b = self.bundle()
        return {"model": self.served, "config": b.config, "shapes": shapes_of(b.params),
                "stats": self.embedding_stats(), "n_leaves": len(jax.tree_util.tree_leaves(b.params))}

    def weights(self) -> list:
        """(name, float32 array) per weight, in the order the executables read them (w0, w1, ..),
        to be secret-shared to the compute parties and nowhere else."""
        if self._weights is None:
            params = self.bundle().params
            self._weights = [(n, np.asarray(leaf, np.float32))
                             for n, leaf in zip(param_names(params), jax.tree_util.tree_leaves(params))]
        return self._weights

    def approve(self, request) -> tuple:
        """(Approval, executable) of the known program ``request`` names, built from this owner's
        registry, checked against its policy's caps and compiled here; once per request."""
        if not isinstance(request, approvals.Request):
            raise Refused("not a program request")
        if request not in self._approved:
            b = self.bundle()
            execution = self.execution or policy_execution(b.config, self.policy)
            self._approved[request] = approvals.approve(b.config, execution, self.policy, shapes_of(b.params),
                                                        request)
        return self._approved[request]

    def _table(self) -> np.ndarray:
        from spu_models.forward import embedding_table

        b = self.bundle()
        return np.asarray(embedding_table(b.config, b.params), np.float32)

    def embedding_table(self) -> np.ndarray:
        """To the data owner, under this owner's policy ``embedding: data_owner`` only: the
        token-embedding table (a part of the weights; what that policy trades for speed)."""
        if self.policy.embedding != "data_owner":  # this owner's own policy decides, not the caller
            raise PermissionError(f"policy {self.policy.name!r} keeps the embedding table secret "
                                  f"(embedding: {self.policy.embedding}); the data owner does not get it")
        return self._table()

    def embedding_stats(self) -> EmbeddingStats:
        """Under every policy: the table's shape and the std of its entries (the search
        subspace's scale). Not the table."""
        return EmbeddingStats.of(self._table())
