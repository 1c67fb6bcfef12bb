import json
import logging

from heptapod_ds.monitor import MetricsSink, setup_logging
from heptapod_ds.monitor.metrics import read_metrics, resolve_wandb_mode


def test_jsonl_lines_and_resume_truncation(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = MetricsSink(str(path))
    for step in range(1, 6):
        sink.log(step, {"loss": 1.0 / step, "nan": float("nan")})
    sink.close()
    rows = read_metrics(str(path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["nan"] == "nan"  # non-finite values stay valid JSON
    with open(path, "a") as fh:
        fh.write('{"step": 6, "loss": ')  # a line cut short by a crash
    resumed = MetricsSink(str(path), resume_step=3)
    resumed.log(4, {"loss": 0.5})
    resumed.close()
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.5


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(str(tmp_path / "x.jsonl"), enabled=False)
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not (tmp_path / "x.jsonl").exists()


def test_wandb_mode_resolution(monkeypatch):
    assert resolve_wandb_mode("online") == "disabled"  # under pytest wandb never starts
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.delenv("HEPTAPOD_TESTING", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"


def test_non_zero_ranks_only_warn(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    setup_logging()
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.setenv("RANK", "0")
    setup_logging()
    assert logging.getLogger().level == logging.INFO


def test_fresh_start_in_an_old_run_directory_starts_a_fresh_file(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = MetricsSink(str(path))
    sink.log(1, {"loss": 1.0})
    sink.close()
    again = MetricsSink(str(path), resume_step=0)  # no checkpoint: training restarts at step 0
    again.log(1, {"loss": 2.0})
    again.close()
    assert [r["loss"] for r in read_metrics(str(path))] == [2.0]
