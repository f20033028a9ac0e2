"""RunDir: every file of a run directory written whole (or not at all) and read back, by name."""
import json

import numpy as np
import pytest

from tuning.errors import UserError
from tuning.data_owner import head as fitted
from tuning.data_owner.rundir import RunDir


def test_files_round_trip_under_their_names(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_config({"model": "tiny-llama", "train": "/data/x.csv"})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny-llama"
    assert run.read_config() == {"model": "tiny-llama", "train": "/data/x.csv"}
    assert run.read_summary() is None
    run.write_summary({"tuned_test_acc": 0.75})
    assert run.read_summary() == {"tuned_test_acc": 0.75}
    assert not run.is_finished()
    run.write_best_z(np.arange(4.0))
    assert run.is_finished() and (tmp_path / "run" / "best_z.npy").is_file()
    np.testing.assert_array_equal(run.read_best_z(), np.arange(4.0))
    head = fitted.Head(np.zeros(3), np.ones(3), np.ones((3, 2)), np.zeros(2), 0.1)
    run.write_head(head, np.array([0, 1, -1]))
    got, groups = run.read_head()
    assert got.c == 0.1 and groups.tolist() == [0, 1, -1] and (tmp_path / "run" / "head.npz").is_file()
    run.save_logits(run.generation_name(2), Z=np.ones(2))
    run.save_logits(run.generation_name(1), Z=np.zeros(2))
    run.save_logits("test_tuned", logits=np.ones(2))
    assert [p.name for p in run.generation_logits()] == ["gen0001.npz", "gen0002.npz"]
    assert run.logits_path("test_tuned") == tmp_path / "run" / "logits" / "test_tuned.npz"
    assert not list((tmp_path / "run").rglob("*.tmp"))  # every temporary file renamed into place


def test_metrics_are_cut_back_to_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    for g in range(1, 4):
        run.append_metrics({"generation": g})
    with open(run.metrics_path, "a") as f:
        f.write('{"generation": 4, "loss')  # a torn line: the process died writing it
    run.keep_metrics(2)
    assert run.read_metrics() == [{"generation": 1}, {"generation": 2}]
    run.keep_metrics(0)
    assert run.metrics_path.read_text() == ""


def test_audit_records_count_by_command(tmp_path):
    run = RunDir(tmp_path)
    run.reset_audit()
    records = [{"what": "verbalizer_logits"}, {"what": "verbalizer_logits", "command": "tune"},
               {"what": "verbalizer_logits", "command": "predict"}, {"what": "verbalizer_logits", "command": "eval"}]
    run.audit_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(run.read_audit()) == 4
    assert run.read_audit("tune") == records[:2]  # a record without a command is an older tune's
    assert run.read_audit("predict") == records[2:3] and run.read_audit("eval") == records[3:]


def test_a_damaged_array_file_is_one_line(tmp_path):
    run = RunDir(tmp_path)
    run.best_z_path.write_bytes(b"not an array")
    with pytest.raises(UserError, match="best_z.npy is not a readable search vector"):
        run.read_best_z()
