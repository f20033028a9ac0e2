"""The run's config: its groups refuse a bad value in one line naming the option, before anything
runs; every setting is a tune option whose default is the config's; the defaults are the demo's;
and an old run's flat config.json resumes with the values it ran with."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from tuning.data_owner.config import (BACKENDS, CHANGED_DEFAULTS, GROUP_OF, GROUPS, PROMPT_FORMS, TuneConfig, flag,
                                      from_stored, given, placed, run_id)
from tuning.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--model", "tiny-llama", "--backend", "plaintext", "--verbalizer", "positive=g,negative=b", "--shots", "4",
       "--n-test", "8", "--popsize", "6", "--d", "16", "--n-tokens", "2", "--seed", "0"]


def _tune_parser():
    from tuning.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return sub.choices["tune"]


def test_every_setting_is_a_tune_option_whose_default_is_the_configs():
    parser = _tune_parser()
    options = {a.dest: a for a in parser._actions}
    for name in GROUP_OF:
        assert name in options and flag(name) in options[name].option_strings, name
    cfg = TuneConfig.of(**given(vars(parser.parse_args([]))))
    assert cfg == TuneConfig.of() and cfg.flat() == {n: TuneConfig.default(n) if n != "policy" else "aby3-fast"
                                                     for n in GROUP_OF}
    # an option given is the setting; --train replaces the default task
    args = parser.parse_args(["--train", "x.csv", "--prompt-depth", "all", "--sigma0", "0.5", "--save-logits"])
    assert given(vars(args)) == {"train": "x.csv", "task": None, "prompt_depth": "all", "sigma0": 0.5,
                                 "save_logits": True}
    assert TuneConfig.of(**given(vars(args))).prompt_depth is None  # all: every layer, stored as None
    # the choices the config states are those the programs and the back ends know
    from spu_models import forward
    from tuning import transports

    assert set(PROMPT_FORMS) == set(forward.PROMPT_FORMS) and set(BACKENDS) == set(transports.BACKENDS)


@pytest.mark.parametrize("argv, option", [
    (["--shots", "0"], "--shots"),                                      # data
    (["--task", "mr"], "--task"),                                       # data: both --task and --train
    (["--prompt-form", "deep"], "--prompt-form"),                       # prompt
    (["--mode", "prefix", "--prompt-depth", "1"], "--mode cached"),     # prompt
    (["--init", "text:  "], "--init"),                                  # prompt
    (["--popsize", "1"], "--popsize"),                                  # search
    (["--strategy", "spsa", "--popsize", "5"], "--popsize"),            # search
    (["--dev-eval", "some"], "--dev-eval"),                             # search
    (["--calibrate", "always"], "--calibrate"),                         # readout
    (["--objective", "refit"], "--head fit"),                           # readout
    (["--backend", "gpu"], "--backend"),                                # run
    (["--seed", "-1"], "--seed"),                                       # run
])
def test_each_group_refuses_a_bad_value_in_one_line_before_anything_runs(argv, option, cli, tmp_path, monkeypatch):
    import tuning.data_owner.trainer as trainer

    monkeypatch.setattr(trainer, "open_backend", lambda *a, **k: pytest.fail("a back end was opened"))
    out = tmp_path / "run"
    code, stdout, err = cli("tune", *TOY, "--train", tmp_path / "toy.csv", "--budget", "1", "--out", out, *argv)
    assert code == 2 and stdout == "" and len(err) == 1 and err[0].startswith("secptune: error:"), err
    assert option in err[0], err
    assert not out.exists()


def test_the_defaults_are_the_demos_configuration():
    """What the demo runs beyond its size, task and P0 is the default: all of it in the private
    job (part 1); in the plaintext job on BBC (part 2) all but its mini-batch (8 per class)."""
    makefile = (ROOT / "Makefile").read_text()
    cfg = placed(TuneConfig.of(), n_layers=30)  # SmolLM2-135M's
    for var, names in (("DEMO_SPU_ARGS", ("policy", "prompt_depth", "prompt_form", "train_batch", "dev_eval")),
                       ("DEMO_FULL_ARGS", ("policy", "prompt_depth", "prompt_form", "dev_eval"))):
        demo = makefile.split(f"{var} ?=")[1].split("\nDEMO_")[0].split("\ndemo:")[0]
        given_by_demo = given(vars(_tune_parser().parse_args(shlex.split(demo.replace("\\\n", " ")))))
        for name in names:
            assert getattr(cfg, name) == given_by_demo[name], (var, name)
    # --prompt-depth K alone picks the form measured best
    assert TuneConfig.of(prompt_depth=4).prompt_form == "virtual"
    # auto: every layer of a model with no more than 4, and under the prefix placement; a depth given stays
    assert placed(TuneConfig.of(model="tiny-llama"), n_layers=2).prompt_depth is None
    assert placed(TuneConfig.of(mode="prefix"), n_layers=30).prompt_depth is None
    assert placed(TuneConfig.of(prompt_depth=2), n_layers=2).prompt_depth == 2
    # the cheap SiLU only where its agreement was measured
    assert TuneConfig.of().policy == "aby3-fast" and TuneConfig.of(model="tiny-llama").policy == "aby3"


def test_every_stored_run_config_loads_with_the_values_it_ran_with():
    """bench/results' run directories, written by every version since config.json existed: each
    loads; one written before a default changed runs with the old default, not the new."""
    paths = sorted((ROOT / "bench" / "results").rglob("config.json"))
    assert len(paths) >= 26
    old = 0
    for p in paths:
        stored = json.loads(p.read_text())
        cfg = from_stored(stored)
        for name, (was, _) in CHANGED_DEFAULTS.items():
            assert getattr(cfg, name) == stored.get(name, was), (p, name)
        old += "prompt_form" not in stored
    assert old >= 26  # before the deep prompts: the input placement, every training example, dev for all


def test_an_old_flat_config_resumes_with_its_old_values(tmp_path, cli):
    """A run as a version before the deep prompts left it (config.json without the later fields,
    checkpoint under that file's id) resumes exactly as it ran: input placement, kv, every training
    example per generation, every candidate on dev; the uninterrupted run with those values
    explicit is the reference."""
    from helpers import toy_csv

    from tuning.data_owner.rundir import RunDir, save_npz

    csv, _ = toy_csv(tmp_path / "toy.csv")
    old = ["--policy", "aby3", "--prompt-depth", "all", "--prompt-form", "kv", "--train-batch", "0",
           "--dev-eval", "all"]
    assert cli("tune", *TOY, "--train", csv, *old, "--budget", "3", "--out", tmp_path / "ref", "--json")[0] == 0
    run = RunDir(tmp_path / "old")
    assert cli("tune", *TOY, "--train", csv, *old, "--budget", "2", "--out", run.path, "--json")[0] == 0
    later = ("prompt_depth", "prompt_form", "train_batch", "dev_eval", "calibrate", "combine", "label_words", "head",
             "probe_words", "select", "objective")
    stored = {k: v for k, v in run.read_config().items() if k not in later}
    run.write_config(stored)
    with np.load(run.checkpoint_path) as f:
        ckpt = {k: f[k] for k in f.files}
    save_npz(run.checkpoint_path, **{**ckpt, "run": run_id(stored)})  # the id that version gave it
    code, _, err = cli("tune", "--resume", run.path, "--budget", "3", "--json")
    assert code == 0, err
    metrics = [[(m["loss_best"], m["dev_acc_of_best_loss"]) for m in map(json.loads, (d / "metrics.jsonl").open())]
               for d in (tmp_path / "ref", run.path)]
    assert metrics[0] == metrics[1]
    again = run.read_config()  # written back whole, with the values it ran with
    assert (again["prompt_depth"], again["prompt_form"], again["train_batch"], again["dev_eval"]) == \
        (None, "kv", 0, "all")


def test_construction_by_name_and_flat_reading():
    cfg = TuneConfig.of(model="tiny-llama", shots=4, head="fit", objective="refit")
    assert (cfg.data.shots, cfg.shots, cfg.readout.objective, cfg.run.model) == (4, 4, "refit", "tiny-llama")
    assert cfg.replace(shots=8).shots == 8 and cfg.shots == 4
    assert set(cfg.flat()) == set(GROUP_OF) and len(GROUP_OF) == sum(len(k.__dataclass_fields__)
                                                                   for k in GROUPS.values())
    with pytest.raises(TypeError, match="no setting shot"):
        TuneConfig.of(shot=4)
    with pytest.raises(UserError, match="--budget"):
        cfg.replace(budget=0)
    with pytest.raises(AttributeError):
        cfg.shots = 3  # frozen
