"""`secptune predict` and `secptune eval`: a finished tiny run applied to texts reproduces the run's
own tuned test predictions (exactly in plaintext, within SPU's fixed-point noise under `sim`),
through the run's reveal path and audit; bad runs and inputs are refused in one line, writing nothing."""
import csv
import io
import json
import shutil

import numpy as np
import pytest

from tuning.transports.session import Session
from tuning.data_owner import predict as pr
from tuning.data_owner.scorer import length_groups
from tuning.data_owner.trainer import TuneConfig, split_examples, task_of, tune, wilson

POS = ["great fun", "wonderful", "loved it", "brilliant", "superb", "a joy", "excellent", "delight"]
NEG = ["terrible", "awful", "hated it", "boring", "dull mess", "a bore", "poor", "disaster"]


def _rows(n: int, seed: int, start: int) -> list:
    rng = np.random.default_rng(seed)
    return [(f"{POS[rng.integers(8)]} {start + i}", "positive") for i in range(n)] + \
           [(f"{NEG[rng.integers(8)]} {start + i}", "negative") for i in range(n)]


def _write_csv(path, rows, header=("text", "label")):
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return _write_csv(d / "train.csv", _rows(30, 0, 0)), _write_csv(d / "test.csv", _rows(20, 1, 100))


def _tune(data, out, **kw):
    """A tiny run with a 20-example test set (2 chunks under SPU), its test split as a labelled CSV."""
    train, test = data
    base = dict(model="tiny-llama", backend="plaintext", task=None, train=str(train), test=str(test),
                verbalizer="positive=g,negative=b", shots=4, n_test=20, popsize=6, budget=4, d=16, n_tokens=2,
                seed=0, out=str(out), save_logits=True)
    summary = tune(TuneConfig.of(**{**base, **kw}), show_progress=False, log=lambda *a: None)
    cfg = pr.load_run(out).cfg
    examples = split_examples(cfg, task_of(cfg))[2]
    return out, summary, _write_csv(out.parent / f"{out.name}_test.csv", examples), examples


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    """Plaintext, a deep (virtual, top layer) prompt, mini-batches and batch calibration: predict must
    measure the deep scale on the run's first mini-batch and calibrate over its own input, as the run did."""
    return _tune(data, tmp_path_factory.mktemp("plain") / "run", prompt_depth=1, prompt_form="virtual",
                 train_batch=4, calibrate="batch")


@pytest.fixture(scope="module")
def fit_run(data, tmp_path_factory):
    """Plaintext with a fitted head; this seed's head and verbalizer disagree on the test split."""
    run = _tune(data, tmp_path_factory.mktemp("fit") / "run", head="fit", seed=2)
    assert run[1]["tuned_test_acc"] != run[1]["tuned_words_test_acc"]  # else eval could not tell them apart
    return run


@pytest.fixture(scope="module")
def sim_run(data, tmp_path_factory):
    return _tune(data, tmp_path_factory.mktemp("sim") / "run", backend="sim", popsize=4, budget=2)


def _chunk_order(texts: list, backend: str) -> list:
    """The rows of the run's opened test logits: its test texts in the scorer's chunk order."""
    return [i for g in length_groups(texts, None if backend == "plaintext" else Session.chunk) for i in g]


def _audit(run) -> list:
    return (run / "reveals.jsonl").read_text().splitlines()


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_plaintext_predict_reproduces_the_runs_tuned_test_logits_and_is_audited(plain_run, cli, tmp_path):
    run, summary, test_csv, examples = plain_run
    saved = np.load(run / "logits" / "test_tuned.npz")
    texts = [t for t, _ in examples]
    order = _chunk_order(texts, "plaintext")
    assert order != sorted(order)  # the opened rows are not in input order: predict must put them back
    job = pr.prepare(run, test_csv)
    scores, _ = pr.score_texts(job)
    np.testing.assert_array_equal(scores[order], saved["logits"])  # identical, not close
    before = _audit(run)
    code, out, err = cli("predict", "--run", run, "--input", test_csv, "--out", tmp_path / "p.csv")
    assert code == 0 and out == "", err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["text"] for r in rows] == texts
    want = _softmax(saved["logits"].astype(np.float64))
    got = np.array([[float(r["p_positive"]), float(r["p_negative"])] for r in rows])
    np.testing.assert_allclose(got[order], want, atol=1e-6)
    assert [r["predicted"] for r in rows] == [("positive", "negative")[int(i)] for i in scores.argmax(-1)]
    after = _audit(run)  # the run's audit, grown by this command's one reveal (one chunk in plaintext)
    assert after[: len(before)] == before and len(after) == len(before) + 1
    rec = json.loads(after[-1])
    assert (rec["what"], rec["to"], rec["shape"]) == ("verbalizer_logits", "data_owner", [1, len(texts), 2])


def test_every_input_format_gives_the_same_predictions(plain_run, cli, tmp_path):
    """CSV to stdout, plain text to JSONL, JSONL, a CSV whose texts are its first column, and the
    texts in another order: the same prediction for each text."""
    run, _, test_csv, examples = plain_run
    texts = [t for t, _ in examples]
    code, out, err = cli("predict", "--run", run, "--input", test_csv)
    assert code == 0, err
    ref = {r["text"]: (r["predicted"], r["p_positive"]) for r in csv.DictReader(io.StringIO(out))}
    assert len(ref) == len(texts) and len({p for p, _ in ref.values()}) == 2
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    shuffled = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    _write_csv(tmp_path / "first.csv", [(t, "x") for t in shuffled], header=("review", "source"))
    for inp, out_file in (("in.txt", "a.jsonl"), ("in.jsonl", "b.csv"), ("first.csv", "c.jsonl")):
        code, _, err = cli("predict", "--run", run, "--input", tmp_path / inp, "--out", tmp_path / out_file)
        assert code == 0, err
        if out_file.endswith(".jsonl"):
            rows = [json.loads(ln) for ln in (tmp_path / out_file).read_text().splitlines()]
            got = {r["text"]: (r["predicted"], r["probabilities"]["positive"]) for r in rows}
        else:
            rows = csv.DictReader((tmp_path / out_file).open())
            got = {r["text"]: (r["predicted"], float(r["p_positive"])) for r in rows}
        assert list(got) == (shuffled if inp == "first.csv" else texts)
        for t, (label, p) in got.items():
            assert label == ref[t][0] and abs(p - float(ref[t][1])) < 2e-6, (inp, t)


def test_eval_equals_the_runs_tuned_test_accuracy(plain_run, fit_run, cli):
    """The run's own test split: eval's accuracy is the summary's tuned_test_acc, the fitted head's
    where the run fitted one (not its verbalizer's), with its Wilson interval and confusion matrix."""
    for run, summary, test_csv, examples in (plain_run, fit_run):
        code, out, err = cli("eval", "--run", run, "--input", test_csv, "--json")
        assert code == 0, err
        ev = json.loads(out)
        assert ev["accuracy"] == summary["tuned_test_acc"] and ev["n"] == len(examples) == summary["n_test"]
        assert ev["ci95"] == wilson(ev["correct"], ev["n"]) == summary["test_significance"]["tuned_ci95"]
        conf = np.array(ev["confusion"])
        assert ev["labels"] == ["positive", "negative"] and conf.sum() == ev["n"]
        assert np.trace(conf) == ev["correct"] and conf.sum(1).tolist() == [10, 10]  # rows: the true labels
        saved = np.load(run / "logits" / "test_tuned.npz")  # the reported predictions, kept for bench job
        assert (saved["predictions"] == saved["labels"]).mean() == summary["tuned_test_acc"]
    code, out, _ = cli("eval", "--run", fit_run[0], "--input", fit_run[2])
    assert code == 0 and out.startswith(f"accuracy {fit_run[1]['tuned_test_acc']:.3f} (")
    assert "confusion matrix" in out and len(out.strip().splitlines()) == 5


def test_sim_predict_agrees_with_the_runs_tuned_test_logits(sim_run, cli, tmp_path):
    """Under SPU's simulator: the same logits within fixed-point noise, the same argmax wherever the
    class margin exceeds it, and the run's audit grows by this command's two chunk reveals."""
    run, summary, test_csv, examples = sim_run
    saved = np.load(run / "logits" / "test_tuned.npz")["logits"]
    order = _chunk_order([t for t, _ in examples], "sim")
    before = _audit(run)
    kept = sorted((run / "state").rglob("*.share"))
    code, _, err = cli("predict", "--run", run, "--input", test_csv, "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    assert kept and sorted((run / "state").rglob("*.share")) == kept  # the run's set-up restored, nothing new kept
    rows = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    got = np.array([[r["probabilities"]["positive"], r["probabilities"]["negative"]] for r in rows])[order]
    want = _softmax(saved.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=5e-3)  # logits within ~2e-2: probabilities near 0.5 within 5e-3
    clear = np.abs(np.diff(saved, axis=-1)).squeeze(-1) > 0.04
    assert clear.sum() >= 10  # most rows: the test is about them
    assert (got.argmax(-1) == saved.argmax(-1))[clear].all()
    after = _audit(run)
    assert after[: len(before)] == before and len(after) == len(before) + 2
    assert [json.loads(a)["shape"] for a in after[len(before):]] == [[1, 10, 2], [1, 10, 2]]


def _unfinished(run, tmp_path):
    d = tmp_path / "unfinished"
    shutil.copytree(run, d)
    (d / "best_z.npy").unlink()
    return d


@pytest.mark.parametrize("case, cmd, message", [
    ("no run", "predict", "no such run directory"),
    ("unfinished", "predict", "the run is unfinished (no best_z.npy)"),
    ("empty csv", "predict", "is empty (no data rows)"),
    ("blank txt", "predict", "holds no texts"),
    ("no text field", "predict", "has no text (column 'text')"),
    ("named column", "predict", "text column 'body' not found"),
    ("unknown label", "eval", "label 'neutral' is not one of the run's labels (positive, negative)"),
    ("no label column", "eval", "label column 'label' not found"),
    ("not utf-8", "predict", "is not UTF-8: byte 0xff on line 2"),
    ("bad out", "predict", "unsupported file type '.xlsx'"),
])
def test_bad_runs_and_inputs_are_one_line_and_write_nothing(plain_run, cli, tmp_path, case, cmd, message):
    run, _, test_csv, _ = plain_run
    inp, extra = test_csv, []
    if case == "no run":
        run = tmp_path / "nope"
    elif case == "unfinished":
        run = _unfinished(run, tmp_path)
    elif case == "empty csv":
        inp = _write_csv(tmp_path / "e.csv", [])
    elif case == "blank txt":
        (inp := tmp_path / "e.txt").write_text("\n  \n")
    elif case == "no text field":
        (inp := tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "a film"}\n')
    elif case == "named column":
        extra = ["--text-column", "body"]
    elif case == "unknown label":
        inp = _write_csv(tmp_path / "l.csv", [("a fine film", "positive"), ("meh", "neutral")])
    elif case == "no label column":
        inp = _write_csv(tmp_path / "l.csv", [("a fine film",)], header=("text",))
    elif case == "not utf-8":
        (inp := tmp_path / "b.csv").write_bytes(b"text\ncaf\xff film\n")
    out = tmp_path / ("o.xlsx" if case == "bad out" else "o.csv")
    listing = sorted(p.name for p in run.iterdir()) if run.exists() else None
    audit = (run / "reveals.jsonl").read_bytes() if run.exists() else None
    code, stdout, err = cli(cmd, "--run", run, "--input", inp, "--out", out, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("secptune: error:"), err
    assert message in err[0], err
    assert not out.exists() and stdout == ""
    if listing is not None:
        assert sorted(p.name for p in run.iterdir()) == listing and (run / "reveals.jsonl").read_bytes() == audit


def _as_older_version(run, **stored):
    """Rewrite a run as an older version left it: config.json holding ``stored`` as given, and its
    checkpoint under the id of those settings."""
    from tuning.data_owner.config import run_id
    from tuning.data_owner.rundir import RunDir, save_npz

    d = RunDir(run)
    cfg = {**d.read_config(), **stored}
    d.write_config(cfg)
    with np.load(d.checkpoint_path) as f:
        ckpt = {k: f[k] for k in f.files}
    save_npz(d.checkpoint_path, **{**ckpt, "run": run_id(TuneConfig.of(**cfg))})


def test_a_run_is_usable_from_any_directory(data, tmp_path, monkeypatch, cli):
    """--train / --test given relative are stored absolute, so predict (and the benches) rebuild the
    run from another directory; an older run's relative paths are read against the current
    directory, one line naming them when they are not there, and a resume there stores them absolute."""
    import os

    train, test = data
    monkeypatch.chdir(train.parent)
    run = tmp_path / "rel"
    tune(TuneConfig.of(model="tiny-llama", backend="plaintext", task=None, train=train.name, test=test.name,
                       verbalizer="positive=g,negative=b", shots=4, n_test=6, popsize=4, budget=1, d=8, n_tokens=2,
                       out=str(run)), show_progress=False, log=lambda *a: None)
    stored = json.loads((run / "config.json").read_text())
    assert all(os.path.isabs(stored[k]) and os.path.samefile(stored[k], p) for k, p in (("train", train),
                                                                                       ("test", test)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    inp = _write_csv(elsewhere / "in.csv", [("a joy 1",)], header=("text",))
    code, out, err = cli("predict", "--run", run, "--input", inp)
    assert code == 0 and len(out.splitlines()) == 2, err
    _as_older_version(run, train=train.name, test=test.name)
    code, out, err = cli("predict", "--run", run, "--input", inp)
    assert code == 2 and len(err) == 1 and out == "", err
    assert f"names --train {train.name}, relative to the directory the run was tuned from" in err[0], err
    code, _, err = cli("tune", "--resume", run, "--budget", "2")
    assert code == 2 and "relative to the directory the run was tuned from" in err[0], err
    monkeypatch.chdir(train.parent)
    code, out, err = cli("predict", "--run", run, "--input", inp)
    assert code == 0 and len(out.splitlines()) == 2, err
    code, _, err = cli("tune", "--resume", run, "--budget", "2", "--json")  # the checkpoint is the stored run's
    assert code == 0, err
    assert os.path.isabs(json.loads((run / "config.json").read_text())["train"])
    monkeypatch.chdir(elsewhere)
    assert cli("predict", "--run", run, "--input", inp)[0] == 0


def test_tunes_summary_counts_its_own_reveals_not_those_of_predict_and_eval(data, tmp_path, cli):
    """Every record of a run's audit names the command that opened it; a resumed tune's summary
    counts tune's reveals over all its sessions, not predict's and eval's in between (their
    reveals have the shape of the run's own test evaluation, so they used to be counted as tune's)."""
    from collections import Counter

    from tuning.data_owner.rundir import RunDir

    run, first, test_csv, _ = _tune(data, tmp_path / "run", popsize=4, budget=2, save_logits=False)
    assert cli("predict", "--run", run, "--input", test_csv)[0] == 0
    assert cli("eval", "--run", run, "--input", test_csv)[0] == 0
    s = tune(TuneConfig.of(out=str(run)), resume=True, budget=3, show_progress=False, log=lambda *a: None)
    by = Counter(r["command"] for r in RunDir(run).read_audit())
    assert by["predict"] == by["eval"] == 1 and set(by) == {"tune", "predict", "eval"}
    total = lambda reveals: sum(r["count"] for r in reveals)  # noqa: E731
    assert total(s["reveals"]) == by["tune"] > total(first["reveals"]) == by["tune"] - total(s["reveals_this_session"])
