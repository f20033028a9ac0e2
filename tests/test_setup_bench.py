"""`bench setup` on tiny-llama: the per-op table accounts for the whole call, chunks share the
rounds (fewer per example as the chunk grows), chunking leaves the logits alone, and the per-layer
fit reproduces what it was fitted to."""
import json

import pytest


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("setup")
    home = tmp_path_factory.mktemp("home") / "home"
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent / "data" / "home", home)
    old = os.environ.get("SECPTUNE_HOME")
    os.environ["SECPTUNE_HOME"] = str(home)
    try:
        from bench.setup_cost import main

        main(["--model", "tiny-llama", "--layers", "2,3", "--depth", "1", "--chunks", "1,4", "--examples", "4",
              "--no-check", "--out", str(out)])
    finally:
        if old is None:
            os.environ.pop("SECPTUNE_HOME")
        else:
            os.environ["SECPTUNE_HOME"] = old
    return json.loads((out / "setup_cost_tiny-llama.json").read_text()), out


def test_op_table_sums_to_the_call_totals(result):
    d, _ = result
    for run in d["runs"]:
        for s in run["chunks"].values():
            assert sum(k["send_bytes"] for k in s["kinds"].values()) == s["bytes"] > 0
            assert sum(k["send_bytes"] for k in s["ops"].values()) == s["bytes"]
            assert set(s["programs"]) == {"embed", "prefill_deep"}  # secret embedding: a lookup per chunk
            assert sum(p["bytes"] for p in s["programs"].values()) == s["bytes"]


def test_rounds_per_example_fall_with_the_chunk_size(result):
    d, out = result
    for run in d["runs"]:
        one, four = run["chunks"]["1"], run["chunks"]["4"]
        assert one["n"] == four["n"] == 4 and (one["chunks"], four["chunks"]) == (4, 1)
        assert four["rounds"] < one["rounds"] / 3  # one call's rounds shared by its 4 examples
    r1, r4 = d["rows"]
    assert r4["3L rounds"] < r1["3L rounds"] / 3
    assert (out / "setup_cost_tiny-llama.png").exists() and (out / "setup_cost_tiny-llama.md").exists()


def test_chunking_leaves_the_logits_alone(result):
    d, _ = result
    a = d["variants"]["chunking_agreement"]
    assert a["chunk_sizes"][0] != a["chunk_sizes"][1]
    assert a["argmax_agree"] == 1.0 and a["max_abs_logit_diff"] < 1e-2


def test_per_layer_fit_reproduces_its_points(result):
    d, _ = result
    for run in d["runs"]:
        for c, s in run["chunks"].items():
            f = d["fits"][c]["prefill_deep"]["bytes"]
            assert f["per_layer"] > 0
            assert f["fixed"] + f["per_layer"] * run["layers"] == pytest.approx(
                s["programs"]["prefill_deep"]["bytes"] / s["n"], rel=1e-6)
