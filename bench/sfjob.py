"""The same tuning job through SecretFlow (`secptune sf-job local`) and through the cluster back end.

    secptune bench sfjob --policy aby3 [--tag T] -- <tune arguments>
    secptune bench sfjob --policy aby3 -- --task mr --model smollm2-135m --shots 1 --n-test 2 \\
        --max-words 6 --popsize 2 --budget 1 --prompt-depth 2 --init "text:It was" --seed 0

Both runs are separate commands, one after the other (never at once: each holds the weights'
shares on every compute party), with the same tune arguments, ``--save-logits`` and fresh local
ports. Reported side by side:

- wall time of the whole command (start-up, sharing the weights, compiling, set-up, the
  generations, the final evaluation) and of its parts as the data owner logs and measures them;
- MPC traffic from SPU's profile (bytes and send actions of the busiest compute party, per
  part: the SPU programs are the same on both, so these should agree up to ABY3's own variation);
- the bytes every party *received* outside the MPC protocol: the cluster nodes' gRPC requests
  (weight shares, the data owner's shares, executables) or SecretFlow's cross-silo messages
  (the same, plus the descriptors), recorded by ``SECPTUNE_RECORD_DIR``;
- parity: whether the search took the same path (every generation's candidates equal) and the
  largest difference between the two back ends' opened logits.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, record: Path | None, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SECPTUNE_RECORD_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if record is not None:
        env["SECPTUNE_RECORD_DIR"] = str(record)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if p.returncode != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({p.returncode}):\n{tail}")
    setup = re.search(r"set-up \([^)]*\): ([\d.]+)s", text)
    received = {f.stem: f.stat().st_size for f in sorted(record.glob("*.bin"))} if record else {}
    if record:
        shutil.rmtree(record, ignore_errors=True)
    return {"wall_s": round(wall, 1), "setup_wall_s": float(setup.group(1)) if setup else None,
            "received_bytes": received}


def _parts(summary: dict) -> dict:
    m = summary["mpc"]
    gen = m["per_generation_median"]
    return {"setup": m["setup"], "zero_shot_eval": m["zero_shot_eval"], "final_eval": m["final_eval"],
            "generation (median)": {"seconds": gen["mpc_s"], "bytes": gen["mpc_bytes"], "rounds": gen["mpc_rounds"]},
            "generations (total)": m["generations_total"]}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="secptune bench sfjob", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the result files")
    ap.add_argument("--record", action="store_true",
                    help="also count the bytes every party receives outside MPC (written to disk meanwhile: "
                         "slows a real model's runs down)")
    ap.add_argument("--work", help="where the two runs go (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if any(a.startswith(("--out", "--backend", "--policy", "--resume")) for a in tune_args):
        from tuning.errors import UserError

        raise UserError("bench sfjob: give the tune arguments without --out, --backend, --policy or --resume")

    from tuning.data_owner.rundir import RunDir
    from tuning.policy import load_policy

    work = Path(args.work or tempfile.mkdtemp(prefix="secptune-bench-sfjob-"))
    work.mkdir(parents=True, exist_ok=True)
    load_policy(args.policy)  # a bad policy is refused before anything runs
    cli = [sys.executable, "-m", "tuning.cli"]
    runs = {}
    # 1. the cluster back end: `secptune tune`, its nodes on free local ports
    runs["cluster"] = _run(cli + ["tune", "--backend", "cluster", "--policy", args.policy, *tune_args, "--save-logits",
                                  "--out", str(work / "cluster")], work / "rec-cluster" if args.record else None,
                              work / "cluster.log")
    print(f"cluster: {runs['cluster']['wall_s']}s", flush=True)
    # 2. SecretFlow: `secptune sf-job local`, one process per party on free local ports
    runs["secretflow"] = _run(cli + ["sf-job", "local", "--policy", args.policy, "--log-dir", str(work / "sf-logs"),
                                     "--", *tune_args, "--save-logits", "--out", str(work / "sf")],
                              work / "rec-sf" if args.record else None, work / "sf.log")
    print(f"secretflow: {runs['secretflow']['wall_s']}s", flush=True)

    dirs = {"secretflow": RunDir(work / "sf"), "cluster": RunDir(work / "cluster")}
    summaries = {k: dirs[k].read_summary() for k in runs}
    same_path, max_err, argmax = True, 0.0, []
    gens = dirs["secretflow"].generation_logits()
    for f in gens:
        a, b = np.load(f), np.load(dirs["cluster"].logits_dir / f.name)
        same_path &= bool(np.array_equal(a["Z"], b["Z"]))
        for k in ("train_logits", "dev_logits"):
            max_err = max(max_err, float(np.abs(a[k] - b[k]).max()))
            argmax.append(float((a[k].argmax(-1) == b[k].argmax(-1)).mean()))
    s_sf, s_cl = summaries["secretflow"], summaries["cluster"]
    rows = [{"what": "whole command (wall)", "cluster": f"{runs['cluster']['wall_s']:.0f}s",
             "secretflow": f"{runs['secretflow']['wall_s']:.0f}s",
             "ratio": f"{runs['secretflow']['wall_s'] / runs['cluster']['wall_s']:.2f}x"}]
    if runs["cluster"]["setup_wall_s"] and runs["secretflow"]["setup_wall_s"]:
        rows.append({"what": "set-up as the data owner logs it (weights, head, prefix caches)",
                     "cluster": f"{runs['cluster']['setup_wall_s']:.0f}s",
                     "secretflow": f"{runs['secretflow']['setup_wall_s']:.0f}s",
                     "ratio": f"{runs['secretflow']['setup_wall_s'] / runs['cluster']['setup_wall_s']:.2f}x"})
    p_sf, p_cl = _parts(s_sf), _parts(s_cl)
    for part in p_sf:
        for unit, fmt in (("seconds", lambda v: f"{v:.1f}s"), ("bytes", lambda v: f"{v / 1e6:.1f} MB")):
            a, b = p_sf[part].get(unit), p_cl[part].get(unit)
            if a is None or b is None:
                continue
            rows.append({"what": f"MPC {part}, {'time' if unit == 'seconds' else 'bytes (busiest party)'}",
                         "cluster": fmt(b), "secretflow": fmt(a), "ratio": f"{a / b:.3f}x" if b else ""})
    rec_sf, rec_cl = runs["secretflow"]["received_bytes"], runs["cluster"]["received_bytes"]
    size = lambda v: f"{v / 1e6:.1f} MB" if v >= 1e5 else f"{v / 1e3:.1f} kB"  # noqa: E731
    for party in sorted(set(rec_sf) | set(rec_cl)):
        a, b = rec_sf.get(party), rec_cl.get(party)
        rows.append({"what": f"received outside MPC by {party} (all messages, pickled)",
                     "cluster": size(b) if b is not None else "(the driver: not recorded)",
                     "secretflow": size(a) if a is not None else "", "ratio": f"{a / b:.3f}x" if a and b else ""})
    parity = {"generations": len(gens), "same_search_path": same_path, "max_logit_diff": round(max_err, 5),
              "argmax_agreement": round(float(np.mean(argmax)), 4) if argmax else None,
              "zero_shot_test_acc": [s_sf["zero_shot_test_acc"], s_cl["zero_shot_test_acc"]],
              "tuned_test_acc": [s_sf["tuned_test_acc"], s_cl["tuned_test_acc"]]}
    model = s_sf["model"].replace("/", "_")
    name = f"sfjob_{Path(model).name}_{args.policy}{args.tag}"
    table = (f"# The same job through SecretFlow and through the cluster back end ({s_sf['policy']}, "
             f"{s_sf['protocol']}, {s_sf['model']})\n\n"
             f"tune arguments: `{' '.join(tune_args)}`; {s_sf['generations']} generation(s), "
             f"{s_sf['n_train']} train / {s_sf['n_dev']} dev / {s_sf['n_test']} test examples, "
             + (f"the prompt in the top {s_sf['prompt_depth']} of {s_sf['layers']} layers"
                if s_sf["prompt_depth"] < s_sf["layers"] else f"the prompt at the input of {s_sf['layers']} layers")
             + ". Separate runs on this machine (2 cores, shared "
             "with other jobs: wall times are noisy; bytes are exact). The whole command's wall time includes "
             "each back end's start-up (SecretFlow: ~6-7 s per process to `sf.init`, all parties at once on 2 "
             "cores) and sharing the weights.\n\n"
             + markdown_table(rows, ["what", "cluster", "secretflow", "ratio"])
             + f"\nParity: same search path {same_path}; largest opened-logit difference {max_err:.4g} over "
               f"{len(gens)} generation(s) (argmax agreement {parity['argmax_agreement']}); zero-shot / tuned test "
               f"accuracy secretflow {s_sf['zero_shot_test_acc']:.3f} / {s_sf['tuned_test_acc']:.3f}, cluster "
               f"{s_cl['zero_shot_test_acc']:.3f} / {s_cl['tuned_test_acc']:.3f}.\n")
    save(name, {"policy": args.policy, "tune_args": tune_args, "runs": runs, "parity": parity,
                "mpc": {"secretflow": p_sf, "cluster": p_cl},
                "summaries": {k: {kk: v for kk, v in s.items() if kk != "projection"} for k, s in summaries.items()}},
         table, Path(args.out))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
