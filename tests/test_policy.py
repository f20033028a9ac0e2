"""Policy files: the shipped ones load, and bad ones are rejected with one line naming the key."""
import pytest
import yaml

from tuning.policy import POLICY_DIR, PolicyError, available_policies, load_policy, parse_policy


def test_shipped_policies_load():
    names = available_policies()
    assert {"aby3", "semi2k", "cheetah", "aby3-puma"} <= set(names)
    for n in names:
        p = load_policy(n)
        assert p.world_size == {"ABY3": 3, "SEMI2K": 2, "CHEETAH": 2}[p.protocol]
        assert p.reveal == {"verbalizer_logits": "data_owner"}
        assert p.caps == {"verbalizer_logits": {"rows": 400, "words": 40}}, n  # the shipped tuning's, measured
        assert p.embedding == "secret", n  # the table (and a tied LM head) stays with the model owner
        assert p.runtime_config().fxp_fraction_bits == p.fxp_fraction_bits
    assert load_policy("aby3-puma").execution.approx.gelu == "poly"


def _base():
    return yaml.safe_load((POLICY_DIR / "aby3.yaml").read_text())


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(protocol="SPDZ"), "protocol 'SPDZ' is unknown"),
    (lambda d: d.update(field="FM32"), "field 'FM32' is unknown"),
    (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
    (lambda d: d.update(parties={"compute": []}), "a policy names no party"),
    (lambda d: d["runtime"].update(fxp_exp_mode="EXP_MAGIC"), "runtime.fxp_exp_mode"),
    (lambda d: d["runtime"].update(no_such_knob=1), "runtime.no_such_knob"),
    (lambda d: d["approx"].update(silu="cubic"), "silu"),
    (lambda d: d["approx"].update(swish="poly"), "approx.swish"),
    (lambda d: d.update(embedding="public"), "embedding 'public'"),
    (lambda d: d.update(attention="magic"), "attention 'magic'"),
    (lambda d: d.update(reveal={"hidden_states": "data_owner"}), "reveal.hidden_states"),
    (lambda d: d.update(reveal={"verbalizer_logits": "model_owner"}), "opened only to the data_owner"),
    (lambda d: d.update(reveal={"verbalizer_logits": "data_owner"}), "reveal.verbalizer_logits needs its cap"),
    (lambda d: d["reveal"]["verbalizer_logits"].update(rows=0), "reveal.verbalizer_logits.rows must be a positive"),
    (lambda d: d["reveal"]["verbalizer_logits"].pop("words"), "reveal.verbalizer_logits needs its cap"),
    (lambda d: d.update(timeout_s=0), "timeout_s"),
    (lambda d: d.update(attention={"kind": "rfa", "feature_map": "trig"}), "attention.feature_map trig is refused"),
])
def test_bad_policies_rejected_naming_the_key(edit, needle):
    d = _base()
    edit(d)
    with pytest.raises(PolicyError) as e:
        parse_policy(d, "x.yaml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("x.yaml")


def test_unknown_policy_name_and_bad_yaml(tmp_path):
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        load_policy("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocol: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(str(bad))


@pytest.mark.parametrize("argv", [["forward", "--policy"], ["sf-job", "--party", "p0", "--cluster"]])
def test_a_policy_or_cluster_file_that_is_not_text_is_one_line(tmp_path, capsys, argv):
    from tuning.cli import main

    csv = tmp_path / "some.csv"
    csv.write_bytes(b"text,label\n\xff\xfe binary \x00\x81\n")
    assert main([*argv, str(csv)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("secptune: error:") and "not a UTF-8 text file" in err[0], err


def test_trig_feature_map_policy_is_refused_in_one_cli_line(tmp_path, capsys):
    """The trig map can return garbage without a sign (tests/test_rfa.py); a policy asking for it
    stops at load, before any model or compilation, with one line naming the key."""
    from tuning.cli import main

    d = _base()
    d["attention"] = {"kind": "rfa", "feature_map": "trig", "features": 64, "sincos": "exact"}
    path = tmp_path / "trig.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["compile", "--model", "tiny-llama", "--policy", str(path), "--text", "hi"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"secptune: error: {path}: attention.feature_map trig"), err
