"""`bench forward --policy A,B`: the policies run side by side on the same input under SPU's
simulator, each against plaintext, with the cost of each relative to the first."""
import json

import pytest


def test_policies_side_by_side(tmp_path, mini_home):  # the shipped MR sentences stand in for the data
    from bench.forward_real import main

    main(["--model", "tiny-llama", "--policy", "aby3,aby3-rfa", "--words", "4", "--out", str(tmp_path)])
    d = json.loads((tmp_path / "forward_real_aby3_vs_aby3-rfa.json").read_text())
    first, second = d["rows"]
    assert (first["policy"], second["policy"]) == ("aby3", "aby3-rfa")
    assert first["seq_len"] == second["seq_len"]  # the same input
    assert second["first/this MB"] == pytest.approx(first["MB sent (busiest party)"] / second["MB sent (busiest party)"],
                                                    rel=0.02)
    for r in d["rows"]:
        assert r["argmax agree"] == 1.0 and r["MB sent (busiest party)"] > 0
    assert set(d["runs"]) == {"aby3", "aby3-rfa"} and (tmp_path / "forward_real_aby3_vs_aby3-rfa.png").exists()


def test_unknown_policy_fails_before_any_work(tmp_path):
    from bench.forward_real import main
    from tuning.policy import PolicyError

    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        main(["--model", "tiny-llama", "--policy", "aby3,nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_repeated_policy_is_refused(tmp_path, capsys):
    from bench.forward_real import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--policy", "aby3,aby3", "--out", str(tmp_path)])
    assert "--policy lists 'aby3' twice" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
