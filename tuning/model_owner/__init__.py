"""The model owner: its weights and what may run on them.

- ``owner.ModelOwner``: the one model a model owner serves, its public metadata, its weights to
  secret-share, the programs it approves, and its embedding table where the policy gives it out;
  every transport carries calls to it.
- ``approval``: the known programs, their requests and approvals, and the policy's caps.
- ``models``: checkpoints and tokenizers (loading, preparing, converting formats);
  ``convert``: the attention-transfer tool (softmax to RFA); ``generate``: a plaintext sanity
  check of a checkpoint.
"""
