"""A finished run applied to new texts: ``secptune predict`` and ``secptune eval``.

The run is rebuilt from its own directory (``RunDir``), as ``tune`` built it: the config gives
the task, model, policy, back end and placement; the subspace (from the seed) and ``best_z.npy``
give the delta its final test evaluation scored; a ``--head fit`` run's ``head.npz`` reads the
opened word logits. The texts are scored through the run's back end and policy as its test set was: only the
logits are opened, only to the data owner, and each reveal is appended to the run's
``reveals.jsonl``. Everything that can be refused (the run, the input, the labels, --out) is
checked before anything is shared, opened or written.

    job = prepare("runs/mr", "new.csv")      # checks only
    rows = apply(job)                        # [{"text", "predicted", "probabilities"}, ...]
    write_rows(rows, job.labels, "out.jsonl")
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from .tasks import clean_text, read_records, read_text, truncate_words
from ..errors import UserError
from ..policy import load_policy
from . import head as fitted
from .config import TuneConfig, load_run_config
from .report import cost_sum, wilson
from .rundir import RunDir
from .trainer import open_scorer, split_examples, task_of

TABLES = (".csv", ".tsv", ".jsonl", ".json")  # anything else is read as plain text, one text a line
OUTPUTS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
BLOCK = 256  # texts the parties hold at once (at least the run's own test set, which it held whole)


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    dir: RunDir
    cfg: TuneConfig
    z: np.ndarray  # [d] the kept prompt's search vector (best_z.npy)
    head: fitted.Head | None  # --head fit: the head the run fitted at that prompt
    word_groups: np.ndarray | None  # the class of each word the head reads (-1: probe word)

    @property
    def path(self) -> Path:
        return self.dir.path


@dataclasses.dataclass(frozen=True)
class Job:
    run: FinishedRun
    task: object  # assets.tasks.Task, rebuilt from the run's config
    train: list  # the run's k-shot training examples (a deep prompt's scale and a head's pool read them)
    texts: list  # the input texts, as the task holds texts (whitespace collapsed, truncated)
    raw: list  # the input texts as read
    truth: list | None  # eval: the input's labels

    @property
    def labels(self) -> list:
        return list(self.task.labels)


# ---------------------------------------------------------------------------------------- the run
def load_run(path) -> FinishedRun:
    """A finished run's config, kept z and (--head fit) head; one line if it is not one."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise UserError(f"--run {path}: no such run directory")
    cfg = load_run_config(run.path, "--run")
    if not run.is_finished():
        raise UserError(f"--run {path}: the run is unfinished (no {run.best_z_path.name}); finish it first with "
                        f"`secptune tune --resume {path}`")
    if cfg.backend == "secretflow":  # its parties exist only inside `secptune sf-job`
        raise UserError(f"--run {path} ran on the secretflow back end (sf-job); predict and eval run the "
                        "plaintext, sim and cluster back ends")
    z = run.read_best_z()
    if z.shape != (cfg.d,) or not np.isfinite(z).all():
        raise UserError(f"{run.best_z_path} is not a finite vector of the run's dimension d={cfg.d}")
    if cfg.head != "fit":
        return FinishedRun(run, cfg, z, None, None)
    if not run.head_path.is_file():
        raise UserError(f"--run {path}: a --head fit run without {run.head_path.name} (unfinished or damaged)")
    return FinishedRun(run, cfg, z, *run.read_head())


def run_task(run: FinishedRun) -> tuple:
    """The run's task and k-shot training examples, rebuilt from its config and its data."""
    try:
        task = task_of(run.cfg)
        return task, split_examples(run.cfg, task)[0]
    except UserError as e:
        raise UserError(f"--run {run.path}: its task's data rebuilds its scorer, and {e}") from None


# -------------------------------------------------------------------------------------- the input
def _text_column(path: Path, columns: list, text_column: str, label_column: str | None, explicit: bool) -> str:
    """The column holding the texts: the one named, or (a CSV, not named explicitly) the first
    column that is not the label column."""
    if text_column in columns:
        return text_column
    rest = [c for c in columns if c != label_column]
    if not explicit and path.suffix.lower() in (".csv", ".tsv") and rest:
        return rest[0]
    raise UserError(f"text column {text_column!r} not found in {path} (columns: {', '.join(columns) or 'none'})")


def _field(path: Path, n: int, record: dict, column: str, what: str) -> str:
    """Record ``n``'s non-empty ``column`` as a string (a label may be an integer)."""
    value = record.get(column)
    if isinstance(value, int) and not isinstance(value, bool) and what == "label":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"record {n} of {path} has no {what} (column {column!r})")
    return value


def read_inputs(path, text_column: str, label_column: str | None = None,
                explicit: bool = False) -> tuple[list, list | None]:
    """The texts of ``path`` (CSV/TSV with a header, JSON lines, or plain text one per non-empty
    line) and, with ``label_column`` (eval), their labels; one line for a bad or empty file."""
    path = Path(path)
    if path.suffix.lower() not in TABLES:
        if label_column:
            raise UserError(f"{path}: eval needs a labelled .csv, .tsv or .jsonl file (a {label_column!r} column)")
        texts = [ln for ln in read_text(path).splitlines() if ln.strip()]
        if not texts:
            raise UserError(f"{path} holds no texts")
        return texts, None
    records, columns = read_records(path)
    if label_column and label_column not in columns:
        raise UserError(f"label column {label_column!r} not found in {path} (columns: {', '.join(columns)})")
    col = _text_column(path, columns, text_column, label_column, explicit)
    texts = [_field(path, n, r, col, "text") for n, r in enumerate(records, 1)]
    labels = [_field(path, n, r, label_column, "label").strip() for n, r in enumerate(records, 1)] \
        if label_column else None
    return texts, labels


def check_labels(labels: list, task, path) -> None:
    """Every label of a labelled input must be one of the run's task's."""
    unknown = [l for l in dict.fromkeys(labels) if l not in task.labels]
    if unknown:
        raise UserError(f"{path}: label {unknown[0]!r} is not one of the run's labels ({', '.join(task.labels)})")


def check_out(out, inp) -> Path | None:
    """--out: a .csv/.tsv/.jsonl/.json file in an existing directory, not the input itself."""
    if out is None:
        return None
    out = Path(out)
    if out.suffix.lower() not in OUTPUTS:
        raise UserError(f"--out {out}: unsupported file type {out.suffix!r} (use .csv, .tsv, .jsonl or .json)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    if out.resolve() == Path(inp).resolve():
        raise UserError(f"--out {out} is the input file; choose another")
    return out


def prepare(run_dir, inp, out=None, text_column: str | None = None, label_column: str | None = None,
            labelled: bool = False) -> Job:
    """Every check, nothing run: the finished run, its task, and the input's texts (and labels)."""
    run = load_run(run_dir)
    task, train = run_task(run)
    label_col = (label_column or run.cfg.label_column) if labelled else None
    raw, truth = read_inputs(inp, text_column or run.cfg.text_column, label_col, explicit=text_column is not None)
    if truth is not None:
        check_labels(truth, task, inp)
    check_out(out, inp)
    texts = [truncate_words(clean_text(t), task.max_words) for t in raw]  # as the run's own texts were read
    return Job(run, task, train, texts, raw, truth)


# ------------------------------------------------------------------------------------ scoring
def _share_deep_scale(scorer, cfg: TuneConfig, train: list) -> None:
    """A deep prompt's offsets are in units the parties measured on the run's first training
    chunk: share that chunk as the run did (its grouping, its zero-shot flag) to measure them again."""
    from .scorer import length_groups
    from .trainer import train_groups

    groups = train_groups(cfg, train) or length_groups([t for t, _ in train], scorer.s.chunk)
    scorer.add_examples("train", train, groups[:1], zero_shot=cfg.head == "fit")
    scorer.drop_examples("train")  # the scale stays resident; the examples are not needed again


def _score_blocks(scorer, delta: np.ndarray, texts: list, block: int, progress) -> tuple:
    """Opened word logits [1, E, W] (and content-free rows) of ``texts``, shared ``block`` at a
    time, in chunk order; and that order (indices into ``texts``)."""
    words, cf, order = [], [], []
    for start in range(0, len(texts), block):
        # a placeholder label: the scorer keeps labels at the data owner, and nothing here reads them
        part = scorer.add_examples("input", [(t, scorer.task.labels[0]) for t in texts[start: start + block]],
                                   zero_shot=True)  # as the run shared its test set
        w, c = scorer.score_words("input", delta, progress=progress)
        words.append(w)
        cf.append(c)
        order.extend(start + part.order)
        scorer.drop_examples("input")
    return np.concatenate(words, 1), (None if cf[0] is None else np.concatenate(cf, 1)), np.asarray(order)


def score_texts(job: Job, progress=None) -> tuple[np.ndarray, dict]:
    """Class scores [E, R] of the job's texts, in input order, at the run's kept prompt through
    its back end (the head's log-probabilities for a --head fit run), and the MPC cost."""
    run = job.run
    scorer, subspace, cfg = open_scorer(run.cfg, job.task, job.train, load_policy(run.cfg.policy),
                                      keep_new=False)  # the run's set-up restored; the new texts are not kept
    try:
        if run.head is not None and not np.array_equal(run.word_groups, scorer.word_groups):
            raise UserError(f"--run {run.path}: its head reads {len(run.word_groups)} words, its task now gives "
                            f"{len(scorer.word_groups)} (its training data changed?)")
        scorer.check_lengths("input", [(t, None) for t in job.texts])  # before anything is opened
        if scorer.deep:
            _share_deep_scale(scorer, cfg, job.train)
        # from here on, every reveal is in the run's audit, as this command's
        scorer.s.audit_to(run.dir.audit_path, "predict" if job.truth is None else "eval")
        block = max(BLOCK, cfg.n_test)
        words, cf, order = _score_blocks(scorer, subspace.offsets(run.z[None]), job.texts, block, progress)
        scores = (fitted.apply(run.head, fitted.features(words[0])) if run.head is not None
                  else scorer.class_scores(words, cf)[0])  # as the run's final test evaluation read them
        out = np.empty_like(scores)
        out[order] = scores
        return out, cost_sum(scorer.s.costs)
    finally:
        scorer.s.close()


def probabilities(scores: np.ndarray) -> np.ndarray:
    """[E, R] class scores -> class probabilities (softmax)."""
    z = np.asarray(scores, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def apply(job: Job, show_progress: bool = True) -> tuple[list, dict]:
    """One row per input text: the text as read, the predicted label, the class probabilities
    (and the true label, for eval); and the MPC cost. A progress bar on stderr."""
    from tqdm import tqdm

    with tqdm(total=len(job.texts), unit="text", disable=not show_progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        scores, cost = score_texts(job, bar.update)
    probs, labels = probabilities(scores), job.labels
    rows = [{"text": t, "predicted": labels[int(np.argmax(s))],
             "probabilities": {l: round(float(p), 6) for l, p in zip(labels, ps)}}
            for t, s, ps in zip(job.raw, scores, probs)]
    for row, truth in zip(rows, job.truth or []):
        row["label"] = truth
    return rows, cost


# ------------------------------------------------------------------------------------- output
def _csv_text(rows: list, labels: list, delimiter: str = ",") -> str:
    buf = io.StringIO()
    extra = ["label"] if rows and "label" in rows[0] else []
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["text", "predicted", *extra, *(f"p_{l}" for l in labels)])
    for r in rows:
        w.writerow([r["text"], r["predicted"], *(r[k] for k in extra), *(r["probabilities"][l] for l in labels)])
    return buf.getvalue()


def write_rows(rows: list, labels: list, out=None) -> None:
    """CSV (columns text, predicted[, label], p_<label>...) or JSON lines, by ``out``'s extension;
    to stdout as CSV without ``out``. A file is written whole (temp file, then renamed)."""
    if out is None:
        sys.stdout.write(_csv_text(rows, labels))
        return
    out = Path(out)
    kind = OUTPUTS[out.suffix.lower()]
    text = (_csv_text(rows, labels, "\t" if out.suffix.lower() == ".tsv" else ",") if kind == "csv"
            else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def evaluation(truth: list, predicted: list, labels: list) -> dict:
    """Accuracy, its 95% Wilson interval, and the confusion matrix (rows: true, columns: predicted)."""
    n, k = len(truth), sum(t == p for t, p in zip(truth, predicted))
    confusion = [[sum(t == a and p == b for t, p in zip(truth, predicted)) for b in labels] for a in labels]
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": wilson(k, n), "labels": list(labels),
            "confusion": confusion}


def format_evaluation(ev: dict) -> str:
    """The evaluation as a few lines of text."""
    w = max(8, *(len(l) for l in ev["labels"]))
    lines = [f"accuracy {ev['accuracy']:.3f} ({ev['correct']}/{ev['n']}), 95% Wilson interval "
             f"[{ev['ci95'][0]:.3f}, {ev['ci95'][1]:.3f}]",
             "confusion matrix (rows: true label, columns: predicted):",
             " " * (w + 2) + "".join(f"{l:>{w + 1}}" for l in ev["labels"])]
    lines += [f"  {l:<{w}}" + "".join(f"{c:>{w + 1}}" for c in row) for l, row in zip(ev["labels"], ev["confusion"])]
    return "\n".join(lines)
