"""Checkpoint integrity: recorded sizes and SHA-256, verification naming each bad file, the CLI, and
resume=auto falling back past a damaged checkpoint; a save that fails on one rank fails on all."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from heptapod_ds.engine import integrity
from heptapod_ds.engine.integrity import META, CheckpointCorrupt, verify_checkpoint


def _fake_checkpoint(root, files=None):
    """A checkpoint directory with a few files and a sealed meta file recording them."""
    files = files or {"mp_rank_00_model_states.pt": os.urandom(3000), "heptapod_rank00000.pt": b"rank zero" * 50,
                      "pp_stage01/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(70000)}
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    recorded = integrity.describe_files(root, integrity.list_files(root))
    meta = integrity.seal_meta({"step": 5, "config": {"train": {"steps": 10}}, "hash": "sha256", "files": recorded})
    (root / META).write_text(json.dumps(meta, indent=1))
    return root


def test_records_match_an_independent_sha256(tmp_path):
    ck = _fake_checkpoint(tmp_path / "global_step5")
    meta = json.loads((ck / META).read_text())
    assert sorted(meta["files"]) == ["heptapod_rank00000.pt", "mp_rank_00_model_states.pt",
                                     "pp_stage01/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for rel, rec in meta["files"].items():
        data = (ck / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(ck) == [] and verify_checkpoint(ck, strict=True) == []


def test_each_kind_of_damage_is_named(tmp_path):
    ck = _fake_checkpoint(tmp_path / "global_step5")
    model, rank, optim = "mp_rank_00_model_states.pt", "heptapod_rank00000.pt", \
        "pp_stage01/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (ck / rank).unlink()
    with open(ck / optim, "r+b") as fh:
        fh.truncate(1000)
    data = bytearray((ck / model).read_bytes())
    data[1234] ^= 0x01  # one bit
    (ck / model).write_bytes(bytes(data))
    problems = verify_checkpoint(ck)
    assert [(p.kind, p.path) for p in problems] == [("missing", rank), ("altered", model), ("truncated", optim)]
    assert problems[2] == f"{optim}: truncated, 1000 of 70000 bytes"
    assert problems[1].startswith(f"{model}: altered, sha256 ")
    # sizes-only mode still sees the missing and truncated files, not the flipped bit
    assert [p.kind for p in verify_checkpoint(ck, hashes=False)] == ["missing", "truncated"]


def test_a_grown_file_an_extra_file_and_an_altered_meta(tmp_path):
    ck = _fake_checkpoint(tmp_path / "global_step5")
    with open(ck / "heptapod_rank00000.pt", "ab") as fh:
        fh.write(b"x")
    (ck / "stray.pt").write_bytes(b"?")
    assert [(p.kind, p.path) for p in verify_checkpoint(ck)] == [("grown", "heptapod_rank00000.pt")]
    assert [(p.kind, p.path) for p in verify_checkpoint(ck, strict=True)] == [
        ("grown", "heptapod_rank00000.pt"), ("unrecorded", "stray.pt")]
    text = (ck / META).read_text()
    (ck / META).write_text(text.replace('"steps": 10', '"steps": 11'))
    problems = verify_checkpoint(ck)
    assert len(problems) == 1 and problems[0].kind == "meta" and "altered" in problems[0]
    (ck / META).write_text(text[: len(text) // 2])
    assert verify_checkpoint(ck)[0].kind == "meta" and "cannot be read" in verify_checkpoint(ck)[0]
    (ck / META).unlink()
    assert "missing" in verify_checkpoint(ck)[0]


def test_a_checkpoint_from_before_checksums_loads_with_a_warning_unless_strict(tmp_path, caplog):
    old = tmp_path / "global_step3"
    old.mkdir()
    (old / META).write_text(json.dumps({"step": 3, "config": {}}))
    with caplog.at_level("WARNING"):
        assert verify_checkpoint(old) == []
    assert "without checksums" in caplog.text
    assert [p.kind for p in verify_checkpoint(old, strict=True)] == ["unverifiable"]


def test_balance_splits_by_size_and_is_deterministic():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 1}
    bins = integrity.balance(sizes, 2)
    assert bins == integrity.balance(dict(reversed(list(sizes.items()))), 2)
    assert sorted(sum(bins, [])) == sorted(sizes)
    loads = sorted(sum(sizes[r] for r in b) for b in bins)
    assert loads == [110, 111]
    assert integrity.balance({}, 3) == [[], [], []]


def test_cli_help_ok_and_damaged(tmp_path):
    run = [sys.executable, "-m", "heptapod_ds.engine.integrity"]
    r = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "--sizes-only" in r.stdout
    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck / "global_step5")
    bad = _fake_checkpoint(ck / "global_step10")
    (bad / "heptapod_rank00000.pt").unlink()
    r = subprocess.run(run + ["--no-progress", str(ck / "global_step5")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    r = subprocess.run(run + ["--no-progress", str(ck)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert f"OK      {ck / 'global_step5'}" in r.stdout
    assert f"DAMAGED {ck / 'global_step10'}" in r.stdout
    assert "heptapod_rank00000.pt: missing" in r.stdout


# ---------------------------------------------------------------------- with the engine, 2 ranks


BASE = ["train.global_batch_size=8", "optimizer.lr=0.01", "schedule.warmup_steps=2", "train.ema_decay=0.9",
        "parallel.zero_stage=3", "train.micro_batch_size=4", "checkpoint.save_every=2", "checkpoint.keep_last=3"]


def _first(rank, world_size, overrides, until_step):
    from engine_standin import run_training

    return run_training(overrides, until_step)


def _after_damage(rank, world_size, run, other, until_step):
    """In one launch: an explicit resume of the damaged checkpoint; resume=auto with a save that fails on
    rank 1 (disk full); then a clean resume=auto. Exceptions come back as strings."""
    import torch

    from engine_standin import run_training

    out = []
    for overrides, fail in [([f"run_dir={other}", f"checkpoint.resume={run}/checkpoints/global_step4"], False),
                            ([f"run_dir={run}", "checkpoint.keep_last=5"], rank == 1),
                            ([f"run_dir={run}"], False)]:
        real = torch.save

        def full_disk(obj, path, *a, **k):
            if fail and "heptapod_rank" in str(path) and "global_step4" in str(path):
                raise OSError(28, "No space left on device", str(path))
            return real(obj, path, *a, **k)
        torch.save = full_disk
        try:
            out.append(run_training(BASE + overrides, until_step))
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            out.append(f"{type(e).__name__}: {e}")
        finally:
            torch.save = real
        if len(out) == 2:  # what the failed save left behind, before the clean restart
            import os
            ck = f"{run}/checkpoints"
            listing = sorted(n for n in os.listdir(ck) if ".damaged-" not in n)
            out[-1] = (out[-1], listing, open(f"{ck}/latest").read())
    return out


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_checkpoint_and_a_failed_save_fails_everywhere(tmp_path):
    from dist_harness import run_ranks

    run = tmp_path / "run"
    first = run_ranks(_first, 2, args=(BASE + [f"run_dir={run}"], 4), timeout=600)
    ckpts = run / "checkpoints"
    meta = json.loads((ckpts / "global_step4" / META).read_text())
    on_disk = integrity.list_files(ckpts / "global_step4")
    assert sorted(meta["files"]) == on_disk and len(on_disk) >= 6  # 2 model + 2 optim shards + 2 rank files
    assert verify_checkpoint(ckpts / "global_step4", strict=True) == []

    # one flipped byte in rank 1's ZeRO shard of the newest checkpoint
    shard = next(r for r in on_disk if r.startswith("zero_pp_rank_1_") and r.endswith("optim_states.pt"))
    data = bytearray((ckpts / "global_step4" / shard).read_bytes())
    data[len(data) // 2] ^= 0x40
    (ckpts / "global_step4" / shard).write_bytes(bytes(data))

    explicit, failed, again = zip(*run_ranks(_after_damage, 2, args=(str(run), str(tmp_path / "other"), 4),
                                             timeout=900))
    # an explicit resume of it refuses, naming the file
    for out in explicit:
        assert out.startswith("CheckpointCorrupt: checkpoint") and f"{shard}: altered" in out, out
    # resume=auto moved the damaged checkpoint aside and resumed from step 2; then a save failed on rank 1
    # only (disk full): both ranks raised, nothing of step 4 is left
    damaged = [p.name for p in ckpts.iterdir() if p.name.startswith("global_step4.damaged-")]
    assert len(damaged) == 1
    for out, listing, latest in failed:
        assert listing == ["global_step2", "latest"] and latest == "global_step2", (listing, latest)
        assert isinstance(out, str) and out.startswith("CheckpointWriteError: could not save checkpoint "
                                                       "global_step4 (rank 1: OSError: [Errno 28] No space"), out
        assert "the newest complete checkpoint is " + str(ckpts / "global_step2") in out
    # a clean restart resumed from step 2 and repeated the first run's steps exactly
    for rank in range(2):
        assert again[rank]["losses"] == first[rank]["losses"]
        for name in first[rank]["params"]:
            assert (again[rank]["params"][name] == first[rank]["params"][name]).all(), name
    assert sorted(p.name for p in ckpts.iterdir() if ".damaged-" not in p.name) == [
        "global_step2", "global_step4", "latest"]
    assert verify_checkpoint(ckpts / "global_step4") == [] and verify_checkpoint(ckpts / "global_step2") == []


def test_read_meta_raises_for_a_missing_meta(tmp_path):
    with pytest.raises(CheckpointCorrupt, match="missing"):
        integrity.read_meta(tmp_path)
