"""One party's process in a SecretFlow tuning job (``secptune sf-job`` starts it).

    python -m tuning.sfjob --cluster FILE --party NAME --log-dir DIR --job JSON

Every party runs this module with the same deployment file and job; what it does depends on its role
(``tuning.transports.secretflow`` has the design):

- the **data owner** runs ``tune()`` over the ``secretflow`` back end (its progress goes to this
  process's stdout, which ``secptune sf-job`` streams) and then ends the job for everyone;
- every **other party** follows the data owner's announced operations until it ends the job.

SPU's log and Python's stderr go to ``DIR/<party>.log``. The process ends with a status record
``DIR/<party>.status.json`` (``sfcluster.write_status``) and exit code 0 (done), 2 (its own error,
or the data owner ended the job with one), 3 (another party was lost, stalled or failed: named in
the record) or 1 (a bug: traceback in the log). It never waits on a lost party: the watchdog ends
it, and it leaves through ``os._exit`` (SecretFlow's links can hang at interpreter exit).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .transports import procs, tlsgate
from .transports import secretflow as sfb
from .transports.deployment import load_deployment
from .transports.sfcluster import EXIT_ERROR, EXIT_OK, EXIT_PEER, write_status
from .errors import UserError


def _redirect(log_path: Path):
    """Python's ``print`` keeps the original stdout (streamed by the launcher); file descriptors
    1 and 2 (SPU's C++ log, Python's stderr) go to the party's log. Returns (progress, log)."""
    progress = procs.log_fds_to(log_path, keep_stdout=True)
    sys.stdout = progress
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    return progress, sys.stderr


class Party:
    """One party's run: its status record, its one-line messages and its exit."""

    def __init__(self, name: str, log_dir: Path, progress):
        self.name, self.log_dir, self.progress = name, log_dir, progress
        self._ending = threading.Lock()

    def say(self, msg: str) -> None:
        try:
            print(msg, file=self.progress, flush=True)
        except (OSError, ValueError):
            pass

    def end(self, code: int, kind: str, message: str = "", peer: str = ""):
        if not self._ending.acquire(blocking=False):  # another thread is ending this process
            threading.Event().wait()
        write_status(self.log_dir, self.name, kind, message, peer)
        print(f"[{kind}] {message}", file=sys.stderr, flush=True)
        if code != EXIT_OK and message:
            self.say(f"{self.name}: {message}")
        sys.stderr.flush()
        tlsgate.stop_all()  # its link ports close, their socket directories go
        os._exit(code)

    def fatal(self, kind: str, peer: str, message: str):
        """From the watchdog's thread: a peer is missing, lost or stalled; end now. Or ("error")
        from the link check: what answers at a peer's address is not that party over TLS."""
        self.end(EXIT_ERROR if kind == "error" else EXIT_PEER, kind, message, peer)

    def failed(self, e: BaseException):
        """An exception ended this party's part: its own error (2), another party's (3), a bug (1)."""
        err = e if isinstance(e, UserError) else sfb.job_error(e)
        if err is None:
            traceback.print_exc()
            self.end(1, "error", f"{type(e).__name__}: {sfb._first_line(e)} (a bug; traceback in the log)")
        peer = getattr(err, "peer", "")
        if peer and peer != self.name:
            self.end(EXIT_PEER, "failed", str(err).splitlines()[0], peer)
        self.end(EXIT_ERROR, "error", str(err).splitlines()[0] if str(err) else type(err).__name__)


def _on_sigint(party: Party):
    """SecretFlow signals SIGINT to itself when it cannot send to a party: record it and end."""
    def handler(signum, frame):
        from secretflow.distributed.fed.global_context import get_global_context

        ctx = get_global_context(assert_none=False)
        cause = ctx.get_last_exception() if ctx is not None else None
        err = sfb.job_error(cause) if cause is not None else None
        peer = getattr(err, "peer", "")
        msg = str(err) if err is not None else f"SecretFlow could not send to a party: {cause}"
        party.end(EXIT_PEER if peer else EXIT_ERROR, "failed" if peer else "error", msg.splitlines()[0], peer)
    return handler


def run_data_owner(job, spec: dict, party: Party) -> None:
    from .data_owner.rundir import RunDir
    from .data_owner.config import GROUP_OF
    from .data_owner.trainer import TuneConfig, tune

    resume = spec.get("resume")
    sfb.set_current_job(job)
    try:
        if resume:
            run = RunDir(resume)
            if run.config_path.exists():
                backend = run.read_config().get("backend")
                if backend != "secretflow":
                    raise UserError(f"--resume {resume}: that run used the {backend} back end; resume it with "
                                    f"`secptune tune --resume {resume}`")
            cfg = TuneConfig.of(out=resume)
        else:
            kw = {k: v for k, v in spec.get("tune", {}).items() if k in GROUP_OF}
            cfg = TuneConfig.of(**{**kw, "backend": "secretflow",
                                   "policy": spec.get("policy") or job.cluster.policy_ref})
        quiet = spec.get("json", False)
        saved = sys.stderr
        sys.stderr = party.progress  # tune's progress bar
        try:
            tune(cfg, resume=bool(resume), show_progress=not quiet, log=(lambda *a: None) if quiet else party.say,
                 budget=spec.get("budget"))
        finally:
            sys.stderr = saved
    except BaseException as e:  # noqa: BLE001  (the job ends for everybody, then this party)
        if not job.broken and not isinstance(e, KeyboardInterrupt):
            try:
                job.finish(ok=False)
                job.leave()
            except BaseException:  # noqa: BLE001
                pass
        raise
    missing = job.finish(ok=True)
    if missing:
        print(f"warning: {', '.join(missing)} did not confirm the end of the job", file=sys.stderr, flush=True)


def served_model(spec: dict) -> str:
    """The model owner's model, from its own job spec: its tune arguments' --model, or the model of
    the run it resumes (when that run's directory is on this host), or tune's default."""
    from .data_owner.config import TuneConfig
    from .data_owner.rundir import RunDir

    run = RunDir(spec.get("resume") or "-")
    if spec.get("resume") and run.config_path.exists():
        return run.read_config().get("model", TuneConfig.default("model"))
    return spec.get("tune", {}).get("model") or TuneConfig.default("model")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tuning.sfjob", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--party", required=True)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--job", default="{}", help="JSON: tune (TuneConfig fields), resume, budget, json, "
                                                "state_dir (a compute party's kept set-up shares)")
    args = ap.parse_args(argv)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    progress, log = _redirect(log_dir / f"{args.party}.log")
    faulthandler.enable(file=log)
    procs.die_with_launcher(signal.SIGKILL)
    party = Party(args.party, log_dir, progress)
    try:
        from . import configure_jax

        configure_jax()
        spec = json.loads(args.job)
        cluster = load_deployment(args.cluster).require("secretflow")
        me = cluster.party(args.party)
        print(f"party {me.name} ({me.role}) of job {cluster.job_name}, policy {cluster.policy.name}: "
              f"{', '.join(f'{k} {v}' for k, v in me.ports.items())}", file=sys.stderr, flush=True)
        if me.role == "model_owner":
            sfb.serve_model(served_model(spec), cluster.policy)
        job = sfb.SFJob(cluster, me.name, log_dir, party.fatal, state_root=spec.get("state_dir"))
        signal.signal(signal.SIGINT, _on_sigint(party))
        party.say(f"{me.name}: up ({me.role}; {cluster.policy.protocol} over {', '.join(p.name for p in cluster.compute)})")
        if me.role == "data_owner":
            run_data_owner(job, spec, party)
            ok, msg = True, "done"
        else:
            end = job.follow()
            ok = bool(end.get("ok"))
            msg = f"done ({job.ops} operations)" if ok else \
                f"the data owner ({cluster.data_owner.name}) ended the job with an error"
        job.leave()
    except BaseException as e:  # noqa: BLE001  (every end is recorded)
        party.failed(e)
    if ok:
        party.say(f"{args.party}: {msg}")
        party.end(EXIT_OK, "ok", msg)
    party.end(EXIT_ERROR, "ended", msg, cluster.data_owner.name)


if __name__ == "__main__":
    main()
