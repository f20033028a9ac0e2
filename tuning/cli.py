"""``secptune``: the command-line entry point.

Every user error ends in one line ``secptune: error: ...`` and exit code 2; nothing is left
half-written (asset writes go through temp files and atomic renames).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _cmd_prepare(args):
    from .assets import log, secptune_home
    from .datasets import prepare_datasets
    from .models import prepare_smollm2

    home = secptune_home()
    log(f"asset cache: {home}")
    steps = ["model", "data"] if args.only is None else [args.only]
    if "model" in steps:
        prepare_smollm2(home)
    if "data" in steps:
        tables = prepare_datasets(home)
        log("data: " + ", ".join(sorted(tables)))
    log("prepared")


def _cmd_generate(args):
    from .generate import greedy
    from .models import load_model

    bundle = load_model(args.model)
    text = greedy(bundle, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "continuation": text}))
    else:
        print(args.prompt + text)


def _cmd_tasks(args):
    from .tasks import TASKS, load_task

    if args.name is None:
        for name in TASKS:
            print(name)
        return
    task = load_task(args.name)
    print(task.describe())
    print(f"train {len(task.train)}  test {len(task.test)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secptune", description="Privacy-preserving forward-only prompt tuning on SPU")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="fetch and convert the real model and data sets into $SECPTUNE_HOME")
    s.add_argument("--only", choices=["model", "data"], help="prepare only this part")
    s.set_defaults(fn=_cmd_prepare)

    s = sub.add_parser("generate", help="greedy continuation (checkpoint sanity check)")
    s.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, an HF directory or a .gguf")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("tasks", help="list tasks, or show one task's template, verbalizer and sizes")
    s.add_argument("name", nargs="?")
    s.set_defaults(fn=_cmd_tasks)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from spu_models.loading import CheckpointError

    from .assets import AssetError

    try:
        args.fn(args)
    except (AssetError, CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        msg = str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__
        print(f"secptune: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secptune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
