"""Plaintext side: tasks and data, subspace, search, parties and back ends, trainer, CLI."""
import os as _os

# XLA's CPU back end rewrites dots into oneDNN matmul calls and fuses a following broadcast add
# (the constant attention-mask bias) as a post-op, which oneDNN then runs with its *reference*
# kernel ("MatMul reference implementation being executed"): measured 15x slower for a plaintext
# SmolLM2 forward at 8 x 224 tokens (80 s -> 5.5 s). Plain Eigen dots are fast. This must be set
# before JAX initialises its back end; SPU compiles through its own pipeline and is unaffected.
_FLAG = "--xla_disable_hlo_passes=onednn-matmul-rewriter"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
