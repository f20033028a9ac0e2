"""The compute party: SPU's runtime over the shares it holds, and nothing in the clear.

- ``party.ComputeParty``: the resident shares, the calls the other roles make on them (the model
  owner's weights and approvals, the data owner's inputs, runs, its share of an opened output,
  drops) and their checks; every transport carries calls to it.
- ``gate.Gate``: runs only what the model owner approved, opens only what that approval marks.
- ``state.PartyStore``: set-up shares kept on this party's own disk across restarts.
- ``traffic``: its own bytes and rounds per run, read from SPU's profile log.
"""
