"""The data owner's forward-only tuning loop.

Who runs it: the data owner only, in plaintext. It holds the labels, the search state, the
subspace A and every loss; the compute parties see none of them. ``trainer.run_generation`` is
one generation top to bottom (ask, score through the secure scorer, open the logits, loss,
tell); ``scorer`` is its handle on the secure programs, ``subspace`` and ``search`` its plaintext
parts.
"""
