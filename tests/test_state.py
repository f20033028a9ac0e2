"""Set-up shares kept on the parties' disks: a resumed or restarted run does not prefill again.
On cluster nodes (each party its own directory) after a killed party: test_faults'
test_killed_party_mid_generation_then_resume_matches."""
import json
import os
import stat

import numpy as np
import pytest

from helpers import SAME_JOB_BYTES_REL, toy_csv as make_toy
from tuning.compute_party.state import PartyStore, digest
from tuning.errors import UserError
from tuning.data_owner.trainer import TuneConfig, tune
from tuning.data_owner.rundir import RunDir

QUIET = dict(show_progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("data") / "toy.csv")[0]


def test_store_round_trip_is_private_and_keyed_by_digest(tmp_path):
    st = PartyStore(tmp_path / "p0")
    key = digest("prefill", (2, 3), b"\x00\x01")
    assert key != digest("prefill", (2, 3), b"\x00\x02") and key != digest("prefill", (23,), b"\x00\x01")
    assert not st.has(key)
    st.save(key, b"meta", [b"a", b"", b"chunk" * 1000], b"digest|prefill/cache")
    assert st.has(key) and st.load(key) == (b"digest|prefill/cache", b"meta", [b"a", b"", b"chunk" * 1000])
    assert stat.S_IMODE(os.stat(tmp_path / "p0").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "p0" / f"{key}.share").st_mode) == 0o600
    with pytest.raises(ValueError):
        st.has("../../etc/passwd")


def _cfg(csv, out, **kw):
    base = dict(model="tiny-llama", backend="sim", task=None, train=str(csv), verbalizer="positive=g,negative=b",
                shots=3, n_test=4, popsize=4, budget=2, d=16, n_tokens=2, sigma0=1.0, seed=0, out=str(out),
                prompt_depth=1, prompt_form="virtual", save_logits=True)
    base.update(kw)
    return TuneConfig.of(**base)


def test_sim_resume_restores_the_setup_instead_of_prefilling_again(toy_csv, tmp_path):
    run = tmp_path / "run"
    first = tune(_cfg(toy_csv, run, budget=1), **QUIET)
    kept = sorted(p.name for p in (run / "state").iterdir() if p.is_dir())
    assert kept == ["p0", "p1", "p2"] and all(len(list((run / "state" / p).iterdir())) > 0 for p in kept)
    # the digests the parties file shares under are salted with the data owner's own secret
    salt = run / "state" / "salt"
    assert stat.S_IMODE(os.stat(salt).st_mode) == 0o600 and len(bytes.fromhex(salt.read_text())) == 32
    again = tune(TuneConfig.of(out=str(run)), resume=True, budget=2, **QUIET)
    setups = again["mpc"]["setups"] if "setups" in again["mpc"] else None
    first_b, resumed_b = first["mpc"]["setup"]["bytes"], again["mpc"]["setup"]["bytes"]
    assert first_b > 0 and resumed_b <= 0.05 * first_b, (first_b, resumed_b, setups)
    # the resumed run still reports its whole set-up: what the restored outputs cost when computed
    kept = again["mpc"]["setup"]["kept"]
    assert kept["calls"] > 0 and kept["unknown"] == kept["estimated"] == 0
    assert again["mpc"]["setup_job"]["bytes"] == pytest.approx(first["mpc"]["setup_job"]["bytes"], rel=0.01)
    assert first["mpc"]["setup_job"]["bytes"] == first_b
    assert again["generations"] == 2
    # the restored shares are the same values: the resumed run's zero-shot head and test logits
    # equal the first run's within SPU's fixed-point noise
    z0 = np.load(run / "logits" / "test_zero_shot.npz")["logits"]
    assert np.isfinite(z0).all()
    a = json.loads((run / "summary.json").read_text())
    assert a["zero_shot_test_acc"] == first["zero_shot_test_acc"]

    # the parties' own audit logs agree with the data owner's across the resume, one record each
    from tuning.audit import audit

    rows, bad = audit(run)
    assert bad == 0 and len(rows) == len(RunDir(run).read_audit()) > 0
    assert all(set(r["parties"]) == {"p0", "p1", "p2"} for r in rows)
    # a data owner whose file drops a reveal is caught by every party's log
    lines = (run / "reveals.jsonl").read_text().splitlines()
    (run / "reveals.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    rows, bad = audit(run)
    assert bad > 0 and any("p0 logged" in d for r in rows for d in r["differences"])


def test_interrupted_setup_continues_at_the_next_unfinished_chunk(toy_csv, tmp_path, monkeypatch):
    import tuning.data_owner.scorer as scorer

    run = tmp_path / "run"
    calls, real = [], scorer.SecureScorer.add_examples

    def dying(self, name, *a, **k):  # the first process dies after sharing train, before dev
        if name == "dev":
            raise KeyboardInterrupt
        calls.append(name)
        return real(self, name, *a, **k)

    monkeypatch.setattr(scorer.SecureScorer, "add_examples", dying)
    with pytest.raises(KeyboardInterrupt):
        tune(_cfg(toy_csv, run), **QUIET)
    assert calls == ["train"] and not (run / "ckpt.npz").exists()
    monkeypatch.setattr(scorer.SecureScorer, "add_examples", real)
    fresh = tune(_cfg(toy_csv, tmp_path / "fresh"), **QUIET)
    s = tune(_cfg(toy_csv, run), **QUIET)  # the same command again: train's set-up is restored
    assert 0 < s["mpc"]["setup"]["bytes"] < fresh["mpc"]["setup"]["bytes"]
    # ... and priced from the first process's ledger: the job's set-up is the uninterrupted run's,
    # within SPU's run-to-run spread of bytes; without the ledger it would miss train's set-up, ~40%
    assert s["mpc"]["setup_job"]["bytes"] == pytest.approx(fresh["mpc"]["setup"]["bytes"], rel=SAME_JOB_BYTES_REL)


def test_the_ledger_prices_kept_outputs_by_key_then_by_program(tmp_path):
    from tuning.compute_party.traffic import PartyCost
    from tuning.transports.cost import CallCost
    from tuning.transports.session import Ledger

    led = Ledger(tmp_path / "ledger.jsonl")
    led.add("k1", "prog", CallCost(2.5, {"p0": PartyCost(send_bytes=1000, send_actions=7)}))
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"key": "k2", "prog')  # a process killed mid-line
    again = Ledger(tmp_path / "ledger.jsonl")
    assert again.cost("k1", "prog") == {"seconds": 2.5, "bytes": 1000, "rounds": 7, "estimated": False}
    assert again.cost("k9", "prog")["estimated"] and again.cost("k9", "other") is None
    # a call restored before its program ran in this job is priced once a run of it is recorded
    from types import SimpleNamespace

    from tuning.transports.session import Session

    s = SimpleNamespace(_ledger=Ledger(tmp_path / "later.jsonl"), restored=[("kx", "prog2")])
    assert Session.restored_costs(s) == [None]
    s._ledger.add("ky", "prog2", CallCost(1.0, {"p0": PartyCost(send_bytes=5, send_actions=1)}))
    assert Session.restored_costs(s) == [{"seconds": 1.0, "bytes": 5, "rounds": 1, "estimated": True}]


def test_kept_sum_and_the_jobs_setup():
    from tuning.data_owner.report import job_setup, kept_sum

    kept = kept_sum([{"seconds": 1.0, "bytes": 10, "rounds": 2, "estimated": False},
                     {"seconds": 3.0, "bytes": 30, "rounds": 4, "estimated": True}, None])
    assert kept == {"calls": 3, "seconds": 4.0, "bytes": 40, "rounds": 6, "estimated": 1, "unknown": 1}
    assert job_setup({"seconds": 0.5, "bytes": 5, "rounds": 1, "kept": kept}) == {"seconds": 4.5, "bytes": 45,
                                                                                    "rounds": 7}
    assert job_setup({"seconds": 0.5, "bytes": 5, "rounds": 1}) == {"seconds": 0.5, "bytes": 5, "rounds": 1}


def test_clean_deletes_the_run_and_its_state_and_refuses_other_dirs(toy_csv, tmp_path):
    from tuning.cli import main

    run = tmp_path / "run"
    tune(_cfg(toy_csv, run, budget=1), **QUIET)
    assert main(["clean", str(tmp_path)]) == 2 and run.exists()  # not a run: nothing deleted
    assert main(["clean", str(run)]) == 0 and not run.exists()


def test_plaintext_keeps_no_state(toy_csv, tmp_path):
    from tuning.transports.plaintext import PlaintextBackend

    tune(_cfg(toy_csv, tmp_path / "run", backend="plaintext", budget=1), **QUIET)
    assert not (tmp_path / "run" / "state").exists()
    with pytest.raises(UserError):
        PlaintextBackend.keep_state(object.__new__(PlaintextBackend), tmp_path)
