"""tools/sample_fid.py: bad inputs fail before sampling; 2 ranks == 1 rank bit for bit (samples) and
to 1e-12 (statistics); batch size 3 == 8; SIGTERM mid-way then resume gives the same samples.npz."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dist_harness import run_script

TOOL = "tools/sample_fid.py"


def _make_release(out, kind="discrete", **extra):
    from heptapod_ds.checkpoint.names import to_canonical
    from heptapod_ds.checkpoint.release import write_release
    from heptapod_ds.model import build_model
    from model_helpers import randomize_zero_params, tiny_cfg

    cfg = tiny_cfg(kind, "next", **extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_zero_params(model)
    out.mkdir(parents=True)
    write_release(out, {to_canonical(n): p.detach() for n, p in model.named_parameters()}, cfg,
                  {"kind": "test"}, "ema", "fp32")
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv, free_port

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    env = LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    parallel_state.initialize(tensor=1, pipeline=1, seed=0, launch=env)
    try:
        return _make_release(tmp_path_factory.mktemp("rel") / "tiny")
    finally:
        parallel_state.destroy()


def _args(release, out, *extra, n=12):
    return [TOOL, "--ckpt", str(release), "--num-samples", str(n), "--out", str(out), "--shard-size", "4",
            "--batch-size", "3", "--digits-metrics", "off", "--no-progress", *extra]


def _ok(procs):
    for p in procs:
        assert p.returncode == 0, p.stdout[-3000:]
    return procs


def _arr(out):
    with np.load(out / "samples.npz") as z:
        return z["arr_0"]


@pytest.fixture(scope="module")
def one_rank(release, tmp_path_factory, repo_root_module):
    """The reference run: 12 images, 1 rank, shards of 4, batches of 3, the bundled extractor."""
    out = tmp_path_factory.mktemp("one") / "run"
    _ok(run_script(_args(release, out), world_size=1, cwd=str(repo_root_module), timeout=900))
    return out


@pytest.fixture(scope="module")
def repo_root_module():
    # not `from conftest import REPO`: with several conftest.py files that name is whichever loaded first
    return pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_batch_size_does_not_matter(release, one_rank, tmp_path, repo_root):
    one, two, b8 = one_rank, tmp_path / "two", tmp_path / "b8"
    _ok(run_script(_args(release, two), world_size=2, cwd=str(repo_root), timeout=900))
    arr = _arr(one)
    assert arr.dtype == np.uint8 and arr.shape == (12, 8, 8, 3)
    assert (one / "samples.npz").read_bytes() == (two / "samples.npz").read_bytes()
    s1, s2 = np.load(one / "samples_stats.npz"), np.load(two / "samples_stats.npz")
    for key in ("mu", "sigma"):
        scale = np.abs(s1[key]).max()
        assert np.abs(s1[key] - s2[key]).max() <= 1e-12 * scale, key
    r1, r2 = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r1["extractor"].startswith("bundled")
    assert (one / "grid.png").stat().st_size > 0
    args = _args(release, b8, "--inception", "none")
    args[args.index("--batch-size") + 1] = "8"
    _ok(run_script(args, world_size=1, cwd=str(repo_root), timeout=900))
    assert np.array_equal(_arr(b8), arr)
    assert len(np.unique(arr.reshape(12, -1), axis=0)) == 12   # images differ from each other


@pytest.mark.slow
def test_sigterm_then_resume_gives_identical_file(release, one_rank, tmp_path, repo_root):
    cut = tmp_path / "cut"
    # a plain `python` start: no launcher variables (the fixtures' own world left some in os.environ)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, *_args(release, cut, "--inception", "none")], cwd=str(repo_root),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        done = os.listdir(cut / "shards") if (cut / "shards").is_dir() else []
        if [f for f in done if f.endswith(".npz") and ".tmp" not in f]:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert not (cut / "samples.npz").exists()
    shards = sorted(f for f in os.listdir(cut / "shards") if ".tmp" not in f)
    assert 1 <= len(shards) < 3, shards
    # a damaged shard (e.g. a copy cut short) is found and drawn again
    (cut / "shards" / "shard_000000.npz").write_bytes(b"truncated")
    out = _ok(run_script(_args(release, cut, "--inception", "none"), world_size=1, cwd=str(repo_root),
                         timeout=900))[0].stdout
    assert "shard 0" in out and "drawing it again" in out
    assert (cut / "samples.npz").read_bytes() == (one_rank / "samples.npz").read_bytes()


def _run_inprocess(**kw):
    from heptapod_ds.sampling.fid_run import FidSettings, run

    return run(FidSettings(**kw))


def test_bad_inputs_fail_before_sampling(release, tmp_path, single_rank):
    bad_ref = tmp_path / "bad_ref.npz"
    np.savez(bad_ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    out = tmp_path / "o1"
    with pytest.raises(ValueError, match="lack mu and sigma"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(out), ref_stats=str(bad_ref), inception="bundled")
    assert not (out / "shards").exists() or not os.listdir(out / "shards")
    with pytest.raises(ValueError, match="5 samples cannot cover 10 classes"):
        _run_inprocess(ckpt=str(release), num_samples=5, out=str(tmp_path / "o2"), inception="none")
    # a release whose model decodes through kl16 weights that are not on this machine
    kl = _edit_release(release, tmp_path / "kl16_release", lambda c: c["tokenizer"].update(
        name="kl16", ckpt="/nowhere/kl16.ckpt", image_size=256, stride=16, channels=16, scale_factor=0.2325))
    with pytest.raises(FileNotFoundError, match="kl16 tokenizer.*--tokenizer-ckpt"):
        _run_inprocess(ckpt=str(kl), num_samples=10, out=str(tmp_path / "o3"), inception="none")
    assert not (tmp_path / "o3").exists()
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        _run_inprocess(ckpt=str(tmp_path / "nothing"), num_samples=10, out=str(tmp_path / "o4"), inception="none")


def test_release_of_a_run_with_training_only_files_loads(release, tmp_path):
    """A run started from a release, with an in-training FID: those files stay on the training machine."""
    from heptapod_ds.sampling.source import load_sampling_source

    def edit(c):
        c["eval"].update(fid_every=5, fid_ref="/train-machine/ref.npz")
        c["checkpoint"]["from_release"] = "/train-machine/release"
    src = load_sampling_source(str(_edit_release(release, tmp_path / "r", edit)))
    assert src.cfg.eval.fid_every == 0 and src.kind == "release" and src.state


def _edit_release(release, out, edit):
    """A copy of ``release`` with ``edit(config dict)`` applied and release.json's hashes updated."""
    import shutil

    from heptapod_ds.checkpoint.release import sha256_file

    out.mkdir()
    cfg_json = json.loads((release / "config.json").read_text())
    edit(cfg_json["config"])
    for f in ("model.safetensors", "release.json"):
        shutil.copy(release / f, out / f)
    (out / "config.json").write_text(json.dumps(cfg_json))
    rel = json.loads((out / "release.json").read_text())
    rel["files"]["config.json"] = {"size": (out / "config.json").stat().st_size,
                                   "sha256": sha256_file(out / "config.json")}
    (out / "release.json").write_text(json.dumps(rel))
    return out


# ---------------------------------------------------------------------------- the ADM evaluator's five numbers

def _ref_tool(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ref_stats_tool", os.path.join(repo_root, "tools", "ref_stats.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ref_batch(tmp_path_factory, repo_root_module):
    """An ADM-layout reference batch of 10 random 8x8 images, all kept (so its statistics are those of
    its arr_0), written by tools/ref_stats.py --keep-images."""
    d = tmp_path_factory.mktemp("refbatch")
    images = np.random.default_rng(5).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(d / "imgs.npz", arr_0=images)
    assert _ref_tool(repo_root_module).main(["--images", str(d / "imgs.npz"), "--out", str(d / "ref.npz"),
                                             "--keep-images", "10", "--no-progress"]) == 0
    with np.load(d / "ref.npz") as z:
        assert np.array_equal(z["arr_0"], images) and z["mu_s"].shape == (2023,) and z["sigma"].shape == (2048, 2048)
    return d / "ref.npz"


def _direct_frechet(a, b):
    """Float64 Fréchet distance of two feature sets through the nuclear norm of A^T B (no d x d sqrt)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    trace_sqrt = np.linalg.svd(ca @ cb.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False).sum()
    d = a.mean(0) - b.mean(0)
    return d @ d + (ca ** 2).sum() / (len(a) - 1) + (cb ** 2).sum() / (len(b) - 1) - 2 * trace_sqrt


def _brute_pr(ref, smp, k=3):
    def d2(u, v):
        return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d2(ref, ref), 1)[:, k], np.sort(d2(smp, smp), 1)[:, k]
    cross = d2(smp, ref)
    return float((cross <= r_ref[None]).any(1).mean()), float((cross.T <= r_smp[None]).any(1).mean())


@pytest.mark.slow
def test_five_numbers_one_rank_equal_two_ranks_and_direct_computation(release, ref_batch, tmp_path, repo_root):
    from heptapod_ds.evaluation.extractors import build_extractor

    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--ref-stats", str(ref_batch), "--pr-samples", "10", "--metrics", "fid,sfid,pr")
    out1 = _ok(run_script(_args(release, one, *args), world_size=1, cwd=str(repo_root), timeout=900))[0].stdout
    _ok(run_script(_args(release, two, *args), world_size=2, cwd=str(repo_root), timeout=900))
    r1, r2 = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    for key in ("fid", "sfid"):
        assert r1[key] > 0 and r2[key] == pytest.approx(r1[key], rel=1e-9), key
    assert (r1["precision"], r1["recall"]) == (r2["precision"], r2["recall"])
    assert r1["inception_score"] is None and "no classifier" in r1["metrics"]["absent"]["inception_score"]
    pr = r1["metrics"]["precision_recall"]
    assert (pr["k"], pr["num_samples"], pr["num_reference"]) == (3, 10, 10)
    assert r1["metrics"]["order"] == ["fid", "sfid", "inception_score", "precision", "recall"]
    assert "sfid=" in out1 and "precision=" in out1 and "absent: inception_score" in out1
    assert (one / "ref_features.npz").is_file() and (two / "ref_features.npz").is_file()
    assert (one / "samples.npz").read_bytes() == (two / "samples.npz").read_bytes()
    # the same numbers from features extracted here, in the tool's batches (one per shard of 4)
    torch.set_num_threads(1)
    ext = build_extractor("bundled")
    samples = _arr(one)
    with np.load(ref_batch) as z:
        ref_imgs = z["arr_0"]
    f_smp = [ext.features(samples[a:a + 4]) for a in range(0, 12, 4)]
    f_ref = ext.features(ref_imgs)
    smp_pool = np.concatenate([f["pool"].numpy() for f in f_smp])
    smp_spatial = np.concatenate([f["spatial"].numpy() for f in f_smp])
    assert r1["fid"] == pytest.approx(_direct_frechet(smp_pool, f_ref["pool"].numpy()), rel=1e-6)
    assert r1["sfid"] == pytest.approx(_direct_frechet(smp_spatial, f_ref["spatial"].numpy()), rel=1e-6)
    assert (r1["precision"], r1["recall"]) == _brute_pr(f_ref["pool"].numpy(), smp_pool[:10])
    # a second scoring reads the cached reference features
    with np.load(one / "ref_features.npz") as z:
        np.testing.assert_allclose(z["pool"], f_ref["pool"].numpy(), rtol=1e-5, atol=1e-6)
    with np.load(one / "samples_stats.npz") as z:
        assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023)


def test_stats_only_reference_reports_absent_metrics_and_bad_inputs_stop_before_sampling(
        release, tmp_path, single_rank):
    mar = tmp_path / "mar_stats.npz"
    np.savez(mar, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="--metrics sfid cannot be computed.*no spatial statistics"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "a"), ref_stats=str(mar),
                       metrics="fid,sfid", progress=False)
    with pytest.raises(ValueError, match="--metrics pr cannot be computed.*holds no images"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "b"), ref_stats=str(mar),
                       metrics="pr", progress=False)
    few = tmp_path / "few.npz"
    np.savez(few, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 3 images; precision/recall with k=3 need >= 4"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "c"), ref_stats=str(few),
                       progress=False)
    ok = tmp_path / "ok.npz"
    np.savez(ok, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="need at least 4 samples, this run gives 2"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "d"), ref_stats=str(ok),
                       pr_samples=2, progress=False)
    with pytest.raises(ValueError, match="--metrics 'fid,kid'"):
        _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "e"), metrics="fid,kid",
                       progress=False)
    for d in "abcde":
        assert not (tmp_path / d / "shards").exists() or not os.listdir(tmp_path / d / "shards")
    # MAR's stats-only file: FID, and the others absent with their reasons (not zero)
    res = _run_inprocess(ckpt=str(release), num_samples=10, out=str(tmp_path / "f"), ref_stats=str(mar),
                         shard_size=10, batch_size=10, digits_metrics="off", progress=False)
    assert res["fid"] > 0
    absent = res["metrics"]["absent"]
    for key in ("sfid", "precision", "recall", "inception_score"):
        assert res[key] is None and absent[key], key
    assert "no spatial statistics" in absent["sfid"] and "no images" in absent["precision"]
