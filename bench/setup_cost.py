"""Where the secure set-up's time goes per example, chunk sizes side by side (issue 29, item 3).

    secptune bench setup [--model smollm2-135m] [--policy aby3-fast] [--layers 5,7] [--chunks 1,4,8,16,32]
                         [--examples 2] [--max-words 8] [--embed-shapes 1x16,16x32] [--no-check] [--raw FILE] [--out DIR]

The set-up of a tuning run shares each example set in chunks of texts of similar length and runs,
per chunk, the approved set-up programs (``embed`` of the one-hot texts when the embedding is
secret, then ``prefill_deep``; ``deep_scale`` once per run, on the first chunk) under SPU. Here,
for the shipped default tuning configuration (the demo's: virtual prompt in the top 4 layers,
policy ``aby3-fast``, MR texts cut to ``--max-words``), under the simulator and in ONE process
(this machine is noisy: ratios are quoted from the same run), for every chunk size: execution
wall time, process CPU time (all three parties run in this process: CPU / 3 is the compute per
party), bytes sent (party 0) and send actions (rounds), per program and per op kind (matmul
against the non-linear ops), per example.

A full 30-layer SmolLM2 in the simulator needs 10-17 GB, so the model is SmolLM2-135M's real
weights cut to ``--layers`` (two or more counts, each above the prompt depth): every figure is
fitted as ``fixed + per_layer * L`` through them and extrapolated to the model's 30 layers.
``--no-check`` leaves out the check of that extrapolation against a measured 30-layer figure:
the demo's set-up (``bench resume``'s first process: 2 + 2 + 2 examples) rebuilt at each layer
count, whose bytes and rounds are exact and extrapolated to compare with
``resume_sim_<model>.json``.

Variants, measured in the same process: the zero-shot logits in ``prefill_deep`` (``zero_shot=True``,
what the test set pays; train and dev skip them under the default ``--head words``) on the same
examples as chunk 8, and the first of them again in a chunk of 4 (chunking must leave the logits
alone); ``--embed-shapes``: the approved lookup against a flattened one; ``--long``: uncut MR texts.
Wall time is recorded but CPU time is what the tables fit: on a shared machine only it is stable.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

DEPTH, FORM, CHECK_CHUNK = 4, "virtual", 8
INIT = "text: Is this review positive or negative?"  # the demo's P0
# SPU op names (pphlo.*) grouped into kinds: where the matmuls end and the non-linear ops begin
KINDS = [("matmul", r"dot|convolution"), ("compare", r"less|greater|equal|not_equal|sign"),
         ("select", r"select"), ("exp", r"exponential"), ("reciprocal/div", r"reciprocal|divide"),
         ("rsqrt/sqrt", r"rsqrt|sqrt"), ("multiply", r"multiply|square"), ("add/sub/neg", r"add|subtract|negate"),
         ("data movement", r"reshape|broadcast|transpose|slice|concatenate|pad|convert|iota|constant|dynamic|"
                           r"gather|scatter|reverse|free|bitcast")]


def kind_of(op: str) -> str:
    """The op kind of SPU op ``op`` ('pphlo.dot' -> 'matmul'); 'other' if none matches."""
    name = op.split(".", 1)[-1].split(":")[0].strip()
    for kind, pat in KINDS:
        if re.fullmatch(rf"(?:{pat})\w*", name):
            return kind
    return "other"


class Recorder:
    """Records every secure call a session makes: which program, its execution wall and process
    CPU time (not its compile), its traffic and op table; and the data owner's sharing time (put)."""

    def __init__(self, session):
        self.s, self.calls, self.put_s = session, [], 0.0
        run, put = session.run, session.put

        def _run(program, inputs, outputs, key=None, persist=False):
            t0 = time.perf_counter()
            cost = run(program, inputs, outputs, key, persist)
            self.calls.append({"program": key if callable(program) else getattr(program, "name", program),
                               "cost": cost, "cpu_s": cost.cpu_s,  # the execution's CPU, not its compile
                               "call_s": time.perf_counter() - t0})  # with compile (first call of a shape)
            return cost

        def _put(name, value):
            t0 = time.perf_counter()
            put(name, value)
            self.put_s += time.perf_counter() - t0

        session.run, session.put = _run, _put

    def mark(self) -> tuple:
        return len(self.calls), self.put_s


def summarize(calls: list, n_examples: int) -> dict:
    """Per-example totals of ``calls`` and their split by program and by op kind."""
    def tot(cs):
        return {"wall_s": sum(c["cost"].wall_s for c in cs), "cpu_s": sum(c["cpu_s"] for c in cs),
                "bytes": sum(c["cost"].send_bytes for c in cs), "rounds": sum(c["cost"].rounds for c in cs),
                "compile_s": sum(max(c.get("call_s", 0.0) - c["cost"].wall_s, 0.0) for c in cs), "calls": len(cs)}

    out = {"n": n_examples, **tot(calls), "programs": {}, "kinds": {}, "ops": {}}
    for p in dict.fromkeys(c["program"] for c in calls):
        out["programs"][p] = tot([c for c in calls if c["program"] == p])
    for c in calls:
        for op, o in c["cost"].ops.items():
            for table, key in ((out["ops"], op), (out["kinds"], kind_of(op))):
                e = table.setdefault(key, {"count": 0, "seconds": 0.0, "send_bytes": 0})
                e["count"] += o["count"]
                e["seconds"] += o["seconds"]
                e["send_bytes"] += o["send_bytes"]
    return out


def per_example(s: dict) -> dict:
    n = s["n"]
    return {"wall s": s["wall_s"] / n, "cpu s": s["cpu_s"] / n, "MB": s["bytes"] / n / 1e6, "rounds": s["rounds"] / n}


def _jsonable(o):
    from tuning.transports.cost import CallCost

    if isinstance(o, CallCost):
        return o.to_json()
    raise TypeError(type(o))


def fit(xs: list, ys: list, at: int) -> dict:
    """Least squares ``y = fixed + per_layer * L`` through (layers, value) pairs, and its value at ``at``."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"fixed": float(a), "per_layer": float(b), "at": float(a + b * at)}


def _pool(task, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [task.train[i] for i in rng.permutation(len(task.train))[:n]]


def _scorer(session, bundle, task, p0_ids):
    from tuning.data_owner.scorer import SecureScorer

    return SecureScorer(session, bundle, task, "cached", len(p0_ids), p0_ids=p0_ids, depth=DEPTH, form=FORM)


def _share(rec, sc, name, examples, chunk, zero_shot=False) -> dict:
    """Share ``examples`` as set ``name`` in chunks of ``chunk`` (the scorer's own grouping), then
    drop it; the calls it made, summarized per example, and the chunks' padded lengths."""
    from tuning.data_owner.encode import tokenize_prompts
    from tuning.data_owner.scorer import length_groups

    groups = length_groups([t for t, _ in examples], chunk)
    i0, p0 = rec.mark()
    t0 = time.perf_counter()
    es = sc.add_examples(name, examples, groups, zero_shot=zero_shot)
    total = time.perf_counter() - t0
    lens = [int(sc.s.shapes[c["text_mask"]][1]) for c in es.chunks]
    zs = np.concatenate([sc.s.unsafe_open(c["_zs"], "bench: same logits at every chunk size")[0, :c["_size"]]
                         for c in es.chunks]) if zero_shot else None
    order = es.order
    sc.drop_examples(name)
    s = summarize(rec.calls[i0:], len(examples))
    s.update(chunks=len(groups), padded=lens, share_s=rec.put_s - p0, total_s=total,
             tokens=int(sum(map(len, tokenize_prompts(sc.bundle, [sc.head_template.replace("{text}", t)
                                                                  for t, _ in examples])))),
             padded_tokens=int(sum(L * len(g) for L, g in zip(lens, groups))))
    if zs is not None:
        s["zs"] = zs[np.argsort(order)].tolist()  # in the examples' order
    return s


def measure(base, policy, task, layers: int, chunks: list, n_examples: int, check: bool, long_task,
            agree: bool = False, embed_shapes: tuple = ()) -> dict:
    """Every measurement at one layer count, in one simulator session."""
    from bench.cache import truncated
    from tuning.transports import make_backend

    bundle = truncated(base, layers)
    session = make_backend("sim", bundle, policy)
    rec = Recorder(session)
    out = {"layers": layers, "chunks": {}, "variants": {}}
    try:
        p0_ids = list(bundle.tokenizer(INIT[len("text:"):], add_special_tokens=False)["input_ids"])
        i0, _ = rec.mark()
        sc = _scorer(session, bundle, task, p0_ids)  # the head rows, the tail's and P0's embeddings
        out["fixed_calls"] = summarize(rec.calls[i0:], 1)
        pool = _pool(task, max(chunks + [n_examples]))
        # deep_scale runs once per run, on the first chunk shared: a warm-up set of one example pays it
        out["first_set"] = _share(rec, sc, "warm", pool[:1], 1)
        for c in chunks:
            s = _share(rec, sc, f"c{c}_", pool[:max(c, n_examples)], c)
            out["chunks"][c] = s
            print(f"L={layers} chunk {c}: {s['n']} examples in {s['chunks']} chunks (padded {s['padded']}): "
                  f"{per_example(s)}; compile {s['compile_s']:.1f}s", flush=True)
        c = CHECK_CHUNK if CHECK_CHUNK in chunks else chunks[-1]
        zs = _share(rec, sc, "zs", pool[:c], c, zero_shot=True)
        out["variants"]["zero_shot"] = zs
        print(f"L={layers} chunk {c} with zero-shot logits: {per_example(zs)}", flush=True)
        if agree:  # the first examples' zero-shot logits again, alone in a smaller chunk: does chunking change them?
            q = max(1, c // 2)
            out["variants"]["zero_shot_quarter"] = _share(rec, sc, "zsq", pool[:q], q, zero_shot=True)
        if long_task is not None:
            lp = _pool(long_task, 2 * c, seed=1)
            for cc in (c // 2, c):
                s = _share(rec, sc, f"long{cc}_", lp, cc)
                out["variants"][f"long_chunk{cc}"] = s
                print(f"L={layers} uncut texts, chunk {cc}: {per_example(s)} padded {s['padded']}", flush=True)
        if embed_shapes:
            out["variants"]["embed_flat"] = embed_variants(session, rec, bundle, embed_shapes)
        if check:
            out["check"] = demo_setup(session, rec, bundle, policy)
    finally:
        session.close()
    return out


def flat_embed(config):
    """The embedding lookup with the one-hot tokens flattened to one matrix [E * Lp, V] before the
    product (the approved ``embed`` multiplies [E, Lp, V] by the table as it comes): same values."""
    from spu_models.forward import embedding_table

    def embed(params, onehot):
        E, Lp, V = onehot.shape
        return {"embeds": (onehot.reshape(E * Lp, V) @ embedding_table(config, params)).reshape(E, Lp, -1)}

    return embed


def embed_variants(session, rec, bundle, shapes: list) -> list:
    """The approved ``embed`` against :func:`flat_embed` on the same one-hot tokens [E, Lp] for
    each of ``shapes``, side by side: execution CPU and wall time, bytes, and the largest
    difference between their outputs (opened for this check only)."""
    from tuning.model_owner.approval import ProgramRef

    V, rows = bundle.config.vocab_size, []
    for E, Lp in shapes:
        ids = np.random.default_rng(E * 1000 + Lp).integers(0, V, size=(E, Lp))
        session.put("eb_onehot", np.eye(V, dtype=np.float32)[ids])
        r = {"examples": E, "padded": Lp, "tokens": E * Lp}
        for tag, prog, key in (("approved", ProgramRef("embed", DEPTH, FORM), None),
                               ("flat", flat_embed(bundle.config), f"flat_embed_{E}x{Lp}")):
            session.run(prog, {"onehot": "eb_onehot"}, {"embeds": f"eb_{tag}"}, key=key)
            c = rec.calls[-1]
            r.update({f"{tag} CPU s": round(c["cpu_s"], 2), f"{tag} wall s": round(c["cost"].wall_s, 2),
                      f"{tag} MB": round(c["cost"].send_bytes / 1e6, 3), f"{tag} rounds": c["cost"].rounds})
        a, b = (session.unsafe_open(f"eb_{t}", "bench: the flat lookup gives the same embeddings") for t in
                ("approved", "flat"))
        r["max |diff|"] = float(np.abs(a - b).max())
        r["CPU ratio"] = round(r["approved CPU s"] / max(r["flat CPU s"], 1e-9), 1)
        session.drop("eb_onehot", "eb_approved", "eb_flat")
        rows.append(r)
        print(f"embed {E}x{Lp}: {r}", flush=True)
    return rows


def demo_setup(session, rec, bundle, policy) -> dict:
    """The demo's set-up as ``tune`` runs it (bench resume's first process: the same split, chunks
    and programs), on this session's layers: totals of every set-up call, head rows included."""
    from tuning.data_owner.config import TuneConfig
    from tuning.data_owner.trainer import build_subspace, make_scorer, split_examples, task_of, train_groups

    cfg = TuneConfig.of(model="smollm2-135m", policy=policy.name, backend="sim", task="mr", shots=1, n_test=2,
                     max_words=8, popsize=4, init=INIT, prompt_depth=DEPTH, prompt_form=FORM, train_batch=16,
                     dev_eval="mean")
    task = task_of(cfg)
    train, dev, test = split_examples(cfg, task)
    i0, _ = rec.mark()
    sc = make_scorer(cfg, task, train, session, bundle, build_subspace(cfg, bundle, session.embedding_stats()))
    session.drop(sc.scale_var) if sc.scale_var in session.shapes else None  # as a fresh run: deep_scale again
    sc.add_examples("dtrain", train, train_groups(cfg, train), zero_shot=False)
    sc.add_examples("ddev", dev, zero_shot=False)
    sc.add_examples("dtest", test, zero_shot=True)
    s = summarize(rec.calls[i0:], len(train) + len(dev) + len(test))
    for name in ("dtrain", "ddev", "dtest"):
        sc.drop_examples(name)
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench setup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="aby3-fast")
    ap.add_argument("--layers", default="5,7", help="layer counts of the truncated model (each above the depth)")
    ap.add_argument("--full-layers", type=int, default=None, help="extrapolate to (default: the model's)")
    ap.add_argument("--chunks", default="1,4,8,16,32")
    ap.add_argument("--examples", type=int, default=2, help="examples for chunk sizes below it (at least 1 chunk)")
    ap.add_argument("--max-words", type=int, default=8, help="texts cut to this many words (the demo's 8)")
    ap.add_argument("--long", action="store_true", help="also uncut MR texts at chunk 8 and 16 (padding)")
    ap.add_argument("--embed-shapes", default="", help="EXL,...: also the approved lookup against a flattened one "
                                                        "on E texts of L tokens, at the first layer count")
    ap.add_argument("--no-check", action="store_true", help="leave out the demo set-up (the 30-layer check)")
    ap.add_argument("--depth", type=int, default=DEPTH)
    ap.add_argument("--raw", default=None, help="the raw measurements: written as they finish; if it exists, "
                                                "rendered without measuring again")
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the result files")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    globals()["DEPTH"] = args.depth

    from tuning.model_owner.models import TINY, load_model, with_policy
    from tuning.data_owner.tasks import load_task
    from tuning.policy import load_policy

    layer_counts = [int(x) for x in args.layers.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    if min(layer_counts) <= args.depth:
        raise SystemExit(f"--layers must each exceed the prompt depth {args.depth}")
    policy = load_policy(args.policy)
    # a tiny model (tests) is built with the most layers asked for; a real one is cut down to each
    base = with_policy(load_model(args.model), policy)
    if args.model in TINY and max(layer_counts) > base.config.num_hidden_layers:
        import dataclasses

        from spu_models.llama import init_params

        cfg = dataclasses.replace(base.config, num_hidden_layers=max(layer_counts))
        base = dataclasses.replace(base, config=cfg, params=init_params(cfg, 0))
    full = args.full_layers or base.config.num_hidden_layers
    task = load_task("mr", max_words=args.max_words)
    long_task = load_task("mr", max_words=None) if args.long else None
    raw = Path(args.raw) if args.raw else None
    if raw is not None and raw.exists():  # re-render a finished measurement
        runs = json.loads(raw.read_text())
        runs = runs["runs"] if isinstance(runs, dict) else runs  # a results JSON holds them too
    else:
        runs = []
        for j, L in enumerate(layer_counts):
            shapes = [tuple(int(v) for v in x.split("x")) for x in args.embed_shapes.split(",") if x] if j == 0 else []
            runs.append(measure(base, policy, task, L, chunks, args.examples, not args.no_check, long_task, j == 0,
                                shapes))
            if raw is not None:  # as it goes: a killed run keeps its finished layer counts
                raw.write_text(json.dumps(runs, default=_jsonable))
    payload = analyse(runs, chunks, full, args)
    name = f"setup_cost_{args.model}{args.tag}"
    save(name, payload, render(payload), args.out)
    _plot(payload, f"{args.out}/{name}.png")


# ------------------------------------------------------------------------------------------ analysis
RESUME = "resume_sim_{model}.json"  # bench resume's first process: the demo's set-up on 30 layers
METRICS = ("wall_s", "cpu_s", "bytes", "rounds")


def _ints(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def _pe(s: dict, program: str | None = None) -> dict:
    """Per-example figures of a summary (or of one program in it; zeros if it did not run)."""
    src = s if program is None else s["programs"].get(program, dict.fromkeys(METRICS, 0.0))
    return {m: src[m] / s["n"] for m in METRICS}


def _fit_all(Ls: list, rows: list, full: int) -> dict:
    """Each metric of ``rows`` (one dict per layer count) fitted over the layer counts."""
    return {m: fit(Ls, [r[m] for r in rows], full) for m in rows[0]}


def _prefill_kinds(s: dict) -> dict:
    """Op kinds of a summary's ``prefill_deep`` calls: the ``embed`` calls are one dot each, taken
    out of ``matmul`` (their seconds: their execution wall time)."""
    k = {n: dict(v) for n, v in s["kinds"].items()}
    e = s["programs"].get("embed")
    if e:
        k["matmul"]["seconds"] -= e["wall_s"]
        k["matmul"]["send_bytes"] -= e["bytes"]
    return k


def op_kinds(Ls: list, runs_c: list, full: int) -> dict:
    """Per op kind of ``prefill_deep``, per example: its share of the op time SPU profiled (party 0,
    at the largest layer count measured; profiled seconds are wall time, so a loaded machine blurs
    them) and its bytes, fitted to ``full`` layers (exact counts)."""
    ks = [_prefill_kinds(s) for s in runs_c]
    last = ks[-1]
    total = sum(max(v["seconds"], 0.0) for v in last.values())
    return {n: {"time_share": max(last.get(n, {}).get("seconds", 0.0), 0.0) / total,
                "bytes": fit(Ls, [k.get(n, {}).get("send_bytes", 0) / s["n"] for k, s in zip(ks, runs_c)], full)["at"]}
            for n in sorted({n for k in ks for n in k})}


def analyse(runs: list, chunks: list, full: int, args) -> dict:
    from tuning.transports.cost import NETWORKS

    for r in runs:
        r["chunks"] = _ints(r["chunks"])
    Ls = [r["layers"] for r in runs]
    bw, lat = NETWORKS["lan"]
    wbw, wlat = NETWORKS["wan-100mbps"]
    rows, per_layer, kinds30, fits = [], [], {}, {}
    for c in chunks:
        runs_c = [r["chunks"][c] for r in runs]
        pre = _fit_all(Ls, [_pe(s, "prefill_deep") for s in runs_c], full)
        # the embedding lookup does not depend on the layer count: its mean over the runs
        emb = {m: float(np.mean([_pe(s, "embed")[m] for s in runs_c])) for m in METRICS}
        at = {m: emb[m] + pre[m]["at"] for m in METRICS}
        fits[c] = {"prefill_deep": pre, "embed": emb}
        comm = at["bytes"] * 8 / bw + at["rounds"] * lat
        padded = runs_c[0]["padded_tokens"] / max(runs_c[0]["tokens"], 1)
        rows.append({"chunk": c, "examples": runs_c[0]["n"], "calls": runs_c[0]["chunks"],
                     "padded/real tokens": round(padded, 2),
                     **{f"L={L} CPU s": round(_pe(s)["cpu_s"], 2) for L, s in zip(Ls, runs_c)},
                     **{f"L={L} MB": round(_pe(s)["bytes"] / 1e6, 1) for L, s in zip(Ls, runs_c)},
                     f"{full}L CPU s": round(at["cpu_s"], 1),
                     "compute/party s": round(at["cpu_s"] / 3, 1), "embed share": f"{emb['cpu_s'] / at['cpu_s']:.0%}",
                     f"{full}L MB": round(at["bytes"] / 1e6, 1), f"{full}L rounds": round(at["rounds"]),
                     "LAN comm s": round(comm, 2), "LAN est s": round(at["cpu_s"] / 3 + comm, 1),
                     "WAN-100 est s": round(at["cpu_s"] / 3 + at["bytes"] * 8 / wbw + at["rounds"] * wlat)})
        per_layer.append({"chunk": c, "per layer CPU s": round(pre["cpu_s"]["per_layer"], 3),
                          "per layer MB": round(pre["bytes"]["per_layer"] / 1e6, 2),
                          "per layer rounds": round(pre["rounds"]["per_layer"], 1),
                          "fixed prefill CPU s": round(pre["cpu_s"]["fixed"], 2),
                          "fixed prefill MB": round(pre["bytes"]["fixed"] / 1e6, 2),
                          "embed CPU s": round(emb["cpu_s"], 2), "embed MB": round(emb["bytes"] / 1e6, 3)})
        # op kinds, per example, every set-up call of the chunk (embed + prefill_deep), fitted to 30
        kinds30[c] = op_kinds(Ls, runs_c, full)
    base = rows[0]
    for r in rows:
        r["time vs chunk 1"] = round(base[f"{full}L CPU s"] / r[f"{full}L CPU s"], 2)
    # variants: zero-shot logits in the prefill, paired with the same examples without them
    zs = [r["variants"]["zero_shot"] for r in runs]
    cz = zs[0]["n"] if zs[0]["chunks"] == 1 else max(c for c in chunks if c <= zs[0]["n"])
    plain = [r["chunks"][cz] for r in runs]
    variants = {"zero_shot": {"chunk": cz, "per_layers": [
        {"layers": L, **{m: {"with": _pe(a, "prefill_deep")[m], "without": _pe(b, "prefill_deep")[m]} for m in METRICS}}
        for L, a, b in zip(Ls, zs, plain)]}}
    q = runs[0]["variants"].get("zero_shot_quarter")
    if q:
        b = np.asarray(q["zs"])
        a = np.asarray(zs[0]["zs"])[: len(b)]
        variants["chunking_agreement"] = {"layers": Ls[0], "chunk_sizes": [zs[0]["n"], q["n"]], "examples": len(b),
                                          "max_abs_logit_diff": float(np.abs(a - b).max()),
                                          "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}
    if runs[0]["variants"].get("embed_flat"):
        variants["embed_flat"] = runs[0]["variants"]["embed_flat"]
    for key in [k for k in runs[0]["variants"] if k.startswith("long_chunk")]:
        variants[key] = {"layers": Ls[0], **{m: _pe(runs[0]["variants"][key])[m] for m in METRICS},
                         "padded": runs[0]["variants"][key]["padded"]}
    # neither depends on the layers below the prompt: the mean of the runs
    fixed = {name: {m: float(np.mean([x[m] for x in xs])) for m in METRICS} for name, xs in (
        ("head, tail and P0", [_pe(r["fixed_calls"]) for r in runs]),
        ("deep_scale", [_pe(r["first_set"], "deep_scale") for r in runs]))}
    check = None
    if all("check" in r for r in runs):
        tot = _fit_all(Ls, [{m: r["check"][m] for m in METRICS} for r in runs], full)
        known = RESULTS / RESUME.format(model=args.model)
        ref = json.loads(known.read_text())["first"]["setup"] if known.exists() else None
        check = {"fit": tot, "reference": ref, "reference_file": known.name}
    return {"layers": Ls, "full_layers": full, "depth": DEPTH, "form": FORM, "policy": args.policy,
            "model": args.model, "max_words": args.max_words, "rows": rows, "per_layer": per_layer, "fits": fits,
            "kinds": kinds30, "variants": variants, "fixed": fixed, "check": check, "runs": runs}


def render(p: dict) -> str:
    full, Ls = p["full_layers"], p["layers"]
    rows = p["rows"]
    best = min(rows, key=lambda r: r[f"{full}L CPU s"])
    head = (f"# Secure set-up per example against chunk size ({p['model']}, sim, {p['policy']}, "
            f"{p['form']} prompt in the top {p['depth']} layers, MR texts cut to {p['max_words']} words)\n\n"
            f"Measured on the real weights cut to {' and '.join(map(str, Ls))} layers, side by side in one process; "
            f"every `{full}L` figure is `embed` (layer-independent: the mean of the runs) plus `prefill_deep` "
            f"fitted as fixed + per_layer x L through the layer counts. CPU s: the process's CPU time "
            f"(the three simulated parties); compute/party = CPU / 3; LAN est = compute/party + bytes / 3 Gbps "
            f"+ rounds x 0.8 ms (busiest party's bytes and send actions).\n\n")
    cols = ["chunk", "examples", "calls", "padded/real tokens"] + [f"L={L} CPU s" for L in Ls] + \
           [f"L={L} MB" for L in Ls] + [f"{full}L CPU s", "compute/party s", "embed share", f"{full}L MB",
                                         f"{full}L rounds", "LAN comm s", "LAN est s", "WAN-100 est s", "time vs chunk 1"]
    out = head + "## Per example\n\n" + markdown_table(rows, cols)
    out += ("\n## Per layer (prefill_deep, per example) and the layer-independent embedding lookup\n\n"
            + markdown_table(p["per_layer"], list(p["per_layer"][0])))
    kr = []
    for n in sorted(p["kinds"][best["chunk"]], key=lambda n: -p["kinds"][best["chunk"]][n]["time_share"]):
        r = {"op kind": n}
        for c in sorted({rows[0]["chunk"], best["chunk"]}):
            k = p["kinds"][c]
            tb = sum(max(v["bytes"], 0) for v in k.values())
            r.update({f"chunk {c} time share": f"{k[n]['time_share']:.0%}",
                      f"chunk {c} {full}L MB": round(k[n]["bytes"] / 1e6, 1), f"chunk {c} bytes share":
                      f"{max(k[n]['bytes'], 0) / tb:.0%}"})
        if any(v != "0%" for key, v in r.items() if "share" in key):
            kr.append(r)
    out += (f"\n## Op kinds of prefill_deep, per example (time: share of SPU's profiled op time at L={Ls[-1]}; "
            f"bytes: fitted to {full} layers)\n\n" + markdown_table(kr, list(kr[0])))
    v = p["variants"]["zero_shot"]
    out += (f"\n## Variants\n\nZero-shot logits in `prefill_deep` (what the test set pays; train and dev skip them), "
            f"the same {v['chunk']} examples in one chunk with and without, prefill_deep per example: "
            + "; ".join(f"L={x['layers']}: CPU {x['cpu_s']['with']:.1f} / {x['cpu_s']['without']:.1f} s, "
                        f"{x['bytes']['with'] / 1e6:.1f} / {x['bytes']['without'] / 1e6:.1f} MB, "
                        f"rounds {x['rounds']['with']:.0f} / {x['rounds']['without']:.0f}" for x in v["per_layers"])
            + " (the top layers' tail pass: a cost that does not grow with the layers below).\n")
    a = p["variants"].get("chunking_agreement")
    if a:
        out += (f"\nThe same {a['examples']} examples' zero-shot logits shared in a chunk of {a['chunk_sizes'][0]} "
                f"and in one of {a['chunk_sizes'][1]}"
                f" (L={a['layers']}): max |difference| {a['max_abs_logit_diff']:.2e}, argmax agreement "
                f"{a['argmax_agree']:.2f}: the chunk size leaves the agreement with plaintext where it was.\n")
    for key in [k for k in p["variants"] if k.startswith("long_chunk")]:
        lv = p["variants"][key]
        out += (f"\nUncut MR texts, {key.replace('long_', '')} (L={lv['layers']}, padded lengths {lv['padded']}): "
                f"{lv['cpu_s']:.1f} CPU s, {lv['bytes'] / 1e6:.1f} MB, {lv['rounds']:.0f} rounds per example.\n")
    if p["variants"].get("embed_flat"):
        out += ("\nThe approved lookup against the one-hot flattened to [E x Lp, V] first (`flat_embed`), same "
                "inputs:\n\n" + markdown_table(p["variants"]["embed_flat"], list(p["variants"]["embed_flat"][0])))
    out += "\nOnce per run (not per example):\n\n"
    for name, f in p["fixed"].items():
        out += f"- {name}: {f['cpu_s']:.1f} CPU s, {f['bytes'] / 1e6:.1f} MB, {f['rounds']:.0f} rounds\n"
    ch = p["check"]
    if ch:
        f, ref = ch["fit"], ch["reference"]
        out += (f"\n## Check of the extrapolation\n\nThe demo's set-up (2 + 2 + 2 examples, as `tune` shares them) "
                f"rebuilt at {' and '.join(map(str, Ls))} layers and extrapolated: {f['bytes']['at'] / 1e6:.1f} MB, "
                f"{f['rounds']['at']:.0f} rounds, {f['cpu_s']['at']:.0f} CPU s")
        if ref:
            out += (f"; measured on {full} layers ({ch['reference_file']}): {ref['bytes'] / 1e6:.1f} MB, "
                    f"{ref['rounds']} rounds, {ref['seconds']:.0f} s wall: bytes {f['bytes']['at'] / ref['bytes']:.3f}x, "
                    f"rounds {f['rounds']['at'] / ref['rounds']:.3f}x. Wall time is not extrapolated (this run's "
                    f"machine was shared with other jobs: only CPU time is comparable); "
                    f"{ref['seconds']:.0f} s wall against {f['cpu_s']['at']:.0f} CPU s is "
                    f"{f['cpu_s']['at'] / ref['seconds']:.2f} cores busy")
        out += ".\n"
    return out


def _plot(p: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, rows = p["full_layers"], p["rows"]
    cs = [r["chunk"] for r in rows]
    x = np.arange(len(cs))
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    emb = [pl["embed CPU s"] / 3 for pl in p["per_layer"]]
    tot = [r["compute/party s"] for r in rows]
    ax[0].bar(x, emb, label="embed (one-hot lookup)")
    ax[0].bar(x, np.subtract(tot, emb), bottom=emb, label="prefill_deep")
    ax[0].bar(x, [r["LAN comm s"] for r in rows], bottom=tot, label="LAN comm (bytes + rounds)")
    ax[0].set(xticks=x, xticklabels=cs, xlabel="chunk size", ylabel=f"s per example, {full} layers",
              title="compute per party + LAN comm")
    ax[0].legend(fontsize=7)
    ax[1].plot(cs, [r[f"{full}L MB"] for r in rows], "o-", label="MB")
    ax2 = ax[1].twinx()
    ax2.plot(cs, [r[f"{full}L rounds"] for r in rows], "s--", color="C1", label="rounds")
    ax[1].set(xscale="log", xlabel="chunk size", ylabel="MB per example (party 0)", title="bytes and rounds")
    ax2.set(yscale="log", ylabel="rounds per example")
    best = min(rows, key=lambda r: r[f"{full}L CPU s"])["chunk"]
    k = p["kinds"][best]
    names = [n for n, v in sorted(k.items(), key=lambda kv: -kv[1]["time_share"])][:6]
    tb = sum(max(v["bytes"], 0) for v in k.values())
    ax[2].barh(np.arange(len(names)), [k[n]["time_share"] for n in names], 0.4, label="op time")
    ax[2].barh(np.arange(len(names)) + 0.4, [max(k[n]["bytes"], 0) / tb for n in names], 0.4, label="bytes")
    ax[2].set_yticks(np.arange(len(names)) + 0.2, names)
    ax[2].set(xlabel="share", title=f"prefill_deep op kinds, chunk {best}")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
