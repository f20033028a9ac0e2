"""The secure forward in SPU's simulator agrees with the plaintext back end, for every protocol."""
import dataclasses

import numpy as np
import pytest

from tuning.data_owner.encode import make_batch
from tuning.model_owner.models import load_model, with_policy
from tuning.transports import make_backend
from tuning.compute_party.traffic import PartyCost, parse_profile
from tuning.transports.cost import NETWORKS, CallCost
from tuning.programs import compile_forward, op_census
from tuning.policy import load_policy

PROMPTS = ["good film", "awful"]
WORDS = [" positive", " negative"]


@pytest.fixture(scope="module")
def models():
    return {m: load_model(m) for m in ("tiny-llama", "tiny-bert")}


SIM_CASES = [(m, p, e) for m in ("tiny-llama", "tiny-bert")
             for p, e in (("aby3", "data_owner"), ("semi2k", "data_owner"), ("cheetah", "data_owner"),
                          ("aby3", "secret"), ("aby3-puma", "data_owner"))]
# cheetah's one-time OT set-up makes it the slowest case: the encoder under it is soak
SIM_CASES = [pytest.param(*c, marks=pytest.mark.soak) if c[:2] == ("tiny-bert", "cheetah") else c for c in SIM_CASES]


@pytest.mark.parametrize("model,policy,embedding", SIM_CASES,
                         ids=["-".join(c.values if hasattr(c, "values") else c) for c in SIM_CASES])
def test_sim_matches_plaintext(models, model, policy, embedding):
    pol = dataclasses.replace(load_policy(policy), embedding=embedding)
    bundle = with_policy(models[model], pol)
    batch = make_batch(bundle, PROMPTS, WORDS, embedding)
    want = make_backend("plaintext", bundle, pol).forward(batch)
    sim = make_backend("sim", bundle, pol)
    got = sim.forward(batch)
    again = sim.forward(batch)  # weights stay resident across calls
    assert np.abs(got - want).max() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(again - got).max() < 1e-2
    cost = sim.costs[-1]
    assert cost.send_bytes > 0 and cost.rounds > 0 and cost.wall_s > 0
    assert "pphlo.dot" in cost.ops or "pphlo.dot_general" in cost.ops


def test_census_counts_what_the_model_does(models):
    bundle = models["tiny-llama"]
    batch = make_batch(bundle, PROMPTS, WORDS)
    unrolled = dataclasses.replace(bundle.execution, scan_layers=False)  # the census counts every layer
    census = op_census(compile_forward(bundle.config, unrolled, "data_owner", bundle.params, batch).code.decode())
    scanned = op_census(compile_forward(bundle.config, bundle.execution, "data_owner", bundle.params, batch).code.decode())
    assert scanned["total_ops"] < census["total_ops"]  # one layer body in the program that runs
    layers = bundle.config.num_hidden_layers
    assert census["exp"] >= 2 * layers  # softmax + SiLU's sigmoid per layer
    assert census["rsqrt"] == 2 * (2 * layers + 1)  # 2 RMSNorms per layer + the final one; 2 rsqrt each
    assert census["dot"] > 0


def test_policy_approximations_reach_the_compiled_program(models):
    """aby3-puma swaps SPU's exp for polynomial SiLU and a limit exp: no exponential op is left."""
    counts = {}
    for name in ("aby3", "aby3-puma"):
        pol = load_policy(name)
        bundle = with_policy(models["tiny-llama"], pol)
        batch = make_batch(bundle, PROMPTS, WORDS)
        counts[name] = op_census(compile_forward(bundle.config, bundle.execution, "data_owner", bundle.params, batch).code.decode())
    assert counts["aby3"]["exp"] > 0 and counts["aby3-puma"]["exp"] == 0


def test_profile_parser_and_network_model():
    log = ("[api.cc:223] - pphlo.dot, executed 15 times, duration 0.5s, send bytes 1000 recv bytes 900, "
           "send actions 4, recv actions 5\n"
           "[api.cc:233] Link details: total send bytes 2000000, recv bytes 1900000, send actions 100, recv actions 99\n")
    links, ops = parse_profile(log)
    assert links == [PartyCost(2000000, 1900000, 100, 99)]
    assert ops["pphlo.dot"] == {"count": 15, "seconds": 0.5, "send_bytes": 1000}
    c = CallCost(1.0, {"p0": links[0]})
    bw, lat = NETWORKS["wan-100mbps"]
    assert c.estimate("wan-100mbps") == pytest.approx(1.0 + 2e6 * 8 / bw + 100 * lat)


def test_fixed_point_safe_norm_and_silu_under_spu():
    """Massive activations (|x| ~ 2e4, as in SmolLM2) overflow a naive x*x and exp(-x) in FM64."""
    import jax
    import spu.utils.simulation as spsim

    from spu_models.approx import silu
    from spu_models.llama import rms_normalize

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    x[1, 3] = 22000.0  # one massive channel, as in SmolLM2's residual stream
    x[2] *= 0.1  # a small-variance row keeps full precision
    sim = spsim.Simulator(3, load_policy("aby3").runtime_config(profile=False))

    def f(v):
        return rms_normalize(v, 1e-5, jax.lax.rsqrt), silu(v * 0.01 - 60.0)

    got_norm, got_silu = spsim.sim_jax(sim, f)(x)
    want_norm, want_silu = f(x)
    err = np.abs(got_norm - np.asarray(want_norm)).max(-1)
    assert err[[0, 2, 3]].max() < 1e-2
    # massive row: limited by the resolution of 1/sqrt(mean(x^2)) ~ 3.6e-4 here, i.e. 95 steps of
    # 2^-18 (~1%); a naive x*x is 100% off
    step = 2.0 ** -18 * np.sqrt(np.mean(x[1].astype(np.float64) ** 2))
    assert err[1] < 1.5 * step * np.abs(want_norm[1]).max()
    want_silu = np.asarray(want_silu)
    assert (np.abs(got_silu - want_silu) < 1e-3 * np.maximum(1.0, np.abs(want_silu))).all()


def test_cli_forward_json_is_clean_despite_spu_logging():
    """SPU's C++ runtime logs on stdout; the CLI keeps its results stream clean."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tuning.cli", "forward", "--model", "tiny-llama", "--backend",
                           "sim", "--policy", "semi2k", "--text", "good", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cost"]["send_bytes"] > 0 and len(out["logits"][0]) == 2
    # and SPU's benign start-up notices (entropy-source fallback, thread pool) stay out of stderr too
    assert "entropy source" not in proc.stderr and "thread pool" not in proc.stderr, proc.stderr


def test_echo_log_forwards_all_but_the_benign_notices(capsys):
    from tuning.compute_party.traffic import echo_log

    echo_log("[warning] [openssl_factory.cc:83] Yacl has been configured to use Yacl's entropy source, but unable "
             "to find one.\n[info] [thread_pool.cc:30] Create a fixed thread pool with size 1\n\n"
             "[error] link p1 lost\n")
    assert capsys.readouterr().err == "[error] link p1 lost\n"
