"""The tuning job as a SecretFlow application: one OS process per party (`secptune sf-job`).

Here every party of the policy runs on this machine, on free local ports: the data owner (the
MR examples, the search, the losses), the model owner (SmolLM2's weights) and the compute parties
(SPU's runtimes). Only the data owner's progress is printed; each party's log is in the printed
log directory. Prerequisite: `secptune prepare` (or `make demo`).

    python examples/secretflow_job.py                                  # SmolLM2, ABY3, 1 generation
    python examples/secretflow_job.py --model tiny-llama --policy semi2k --budget 2   # a quick check

On three hosts, every party runs the same command on its own host instead, e.g. with the deployment
deployments/aby3-3hosts.yaml (put your addresses in, every party's certificate and this host's
keys: docs/multi-host.md, "On three hosts"):

    secptune sf-job --cluster aby3-3hosts.yaml --party p0 -- --task mr --model smollm2-135m ...

SmolLM2 settings are small (1 example per class, texts cut to 6 words, 2 candidates) and the prompt
enters only the top 2 layers (`--prompt-depth 2`), so that the 30-layer prefill runs once per
example: set-up takes ~10-20 minutes under ABY3 on 2 cores, a generation a few minutes.
"""
import argparse
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--policy", default="aby3")
ap.add_argument("--budget", type=int, default=1)
ap.add_argument("--out", default="runs/example-sf-job")
args = ap.parse_args()

tune_args = ["--task", "mr", "--model", args.model, "--shots", "1", "--n-test", "2", "--max-words", "6",
             "--popsize", "2", "--budget", str(args.budget), "--prompt-depth", "2", "--seed", "0", "--out", args.out]
sys.exit(subprocess.call([sys.executable, "-m", "tuning.cli", "sf-job", "local", "--policy", args.policy, "--",
                          *tune_args]))
