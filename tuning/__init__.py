"""Plaintext side: tasks and data, subspace, search, parties and back ends, trainer, CLI."""
