"""tools/convert_ckpt.py on checkpoints made by its own writer (one process, no training): every layout
round-trips, inspect / verify report, and each bad input is a clear error naming the file, with nothing
written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from heptapod_ds.checkpoint.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["backbone.depth=2", "backbone.width=32", "backbone.num_heads=2", "head.depth=1", "head.width=32",
         "head.num_heads=2", "train.global_batch_size=16", "train.micro_batch_size=8", "train.grad_accum=0",
         "train.ema_decay=0.9"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A release of random weights and a TP=2 x DP=2 ZeRO-3 training checkpoint made from it."""
    from heptapod_ds.checkpoint.names import model_spec
    from heptapod_ds.checkpoint.release import write_release
    from heptapod_ds.checkpoint.world import ensure_local_world
    from heptapod_ds.config import load_config

    ensure_local_world()
    tmp = tmp_path_factory.mktemp("cli")
    cfg = load_config(overrides=SMALL, world_size=1)
    g = torch.Generator().manual_seed(0)
    tensors = {s.name: torch.randn(s.shape, generator=g) for s in model_spec(cfg)}
    rel = tmp / "rel"
    rel.mkdir()
    write_release(rel, tensors, cfg, source={"test": True}, weights="raw", dtype="fp32")
    assert main(["from-release", "--release", str(rel), "--out", str(tmp / "run"), "--tensor", "2", "--dp", "2",
                 "--zero", "3"]) == 0
    return tmp, tensors


def _release(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _copy_run(made, name):
    tmp, _ = made
    dst = tmp / name
    shutil.copytree(tmp / "run", dst)
    return dst, dst / "checkpoints" / "global_step0"


@pytest.mark.parametrize("tp,zero,pp", [(1, 0, 1), (2, 0, 1), (1, 1, 1), (2, 2, 1), (1, 3, 1), (2, 1, 2),
                                        (1, 0, 3)])
def test_every_layout_round_trips_bit_exactly(made, tp, zero, pp):
    tmp, tensors = made
    run, out = tmp / f"rs{tp}{zero}{pp}", tmp / f"rel{tp}{zero}{pp}"
    assert main(["reshard", "--ckpt", str(tmp / "run"), "--out", str(run), "--tensor", str(tp), "--dp", "2",
                 "--zero", str(zero), "--pipeline", str(pp)]) == 0
    if pp > 1:  # the stages' folders hold disjoint parts; back to PP=1 from there
        tag = run / "checkpoints" / "global_step0"
        assert sorted(d.name for d in tag.iterdir() if d.is_dir()) == [f"pp_stage{k:02d}" for k in range(pp)]
        meta = json.loads((tag / "heptapod_meta.json").read_text())
        assert meta["layout"]["pipeline"] == pp and len(meta["layout"]["pipeline_split"]) == pp
        assert len(list(tag.glob("heptapod_rank*.pt"))) == tp * pp * 2
        back = tmp / f"rs{tp}{zero}{pp}_pp1"
        assert main(["reshard", "--ckpt", str(run), "--out", str(back), "--tensor", "1", "--dp", "1",
                     "--zero", "0"]) == 0
        assert main(["to-release", "--ckpt", str(back), "--out", str(tmp / f"relback{tp}{zero}"),
                     "--weights", "ema"]) == 0
        got = _release(tmp / f"relback{tp}{zero}")
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    from heptapod_ds.engine.integrity import verify_checkpoint
    assert verify_checkpoint(run / "checkpoints" / "global_step0", strict=True) == []  # every file hashed
    assert main(["to-release", "--ckpt", str(run), "--out", str(out), "--weights", "raw"]) == 0
    got = _release(out)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert main(["to-release", "--ckpt", str(run), "--out", str(tmp / f"relb{tp}{zero}{pp}"), "--dtype",
                 "bf16"]) == 0
    assert all(v.dtype == torch.bfloat16 for v in _release(tmp / f"relb{tp}{zero}{pp}").values())


def test_inspect_and_verify(made, capsys):
    tmp, _ = made
    assert main(["inspect", str(tmp / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == {"tensor": 2, "pipeline": 1, "dp": 2, "zero_stage": 3} and info["ema"] is True
    assert info["parameters_per_module"]["backbone"] > 0 and info["step"] == 0
    assert main(["inspect", str(tmp / "rel")]) == 0
    assert "release" in capsys.readouterr().out
    assert main(["verify", str(tmp / "run")]) == 0
    assert main(["verify", str(tmp / "rel")]) == 0


def test_truncated_shard_is_named_and_nothing_written(made, capsys):
    tmp, _ = made
    run, tag = _copy_run(made, "trunc")
    shard = tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert main(["to-release", "--ckpt", str(run), "--out", str(tmp / "trunc_rel")]) == 1
    assert str(shard) in capsys.readouterr().err
    assert not (tmp / "trunc_rel").exists() and not list(tmp.glob(".trunc_rel*"))
    assert main(["verify", str(run)]) == 1
    assert shard.name in capsys.readouterr().out


def test_missing_shard_is_named_and_nothing_written(made, capsys):
    tmp, _ = made
    run, tag = _copy_run(made, "missing")
    (tag / "zero_pp_rank_0_mp_rank_01_model_states.pt").unlink()
    assert main(["reshard", "--ckpt", str(run), "--out", str(tmp / "missing_out"), "--tensor", "1", "--dp", "1",
                 "--zero", "0"]) == 1
    assert "zero_pp_rank_0_mp_rank_01_model_states.pt" in capsys.readouterr().err
    assert not (tmp / "missing_out").exists()


def test_pickle_that_would_run_code_is_refused(made, capsys):
    tmp, _ = made
    run, tag = _copy_run(made, "evil")
    torch.save({"rng": _RunsCode(), "client_state": {}, "ema": None}, tag / "heptapod_rank00000.pt")
    assert main(["reshard", "--ckpt", str(run), "--out", str(tmp / "evil_out"), "--tensor", "1", "--dp", "1",
                 "--zero", "0"]) == 1
    err = capsys.readouterr().err
    assert "heptapod_rank00000.pt" in err and "system" in err
    assert not (tmp / "evil_out").exists()


def test_existing_output_needs_force(made, capsys):
    tmp, tensors = made
    out = tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["to-release", "--ckpt", str(tmp / "run"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["to-release", "--ckpt", str(tmp / "run"), "--out", str(out), "--force", "--weights", "raw"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_reshard_into_a_run_of_another_preset_is_refused(made, capsys):
    from heptapod_ds.config import load_config, to_yaml

    tmp, _ = made
    other = tmp / "other_run"
    other.mkdir()
    (other / "config.yaml").write_text(to_yaml(load_config(overrides=["preset=B"], world_size=1,
                                                           validate_config=False)))
    before = sorted(os.listdir(other))
    for force in ([], ["--force"]):
        assert main(["reshard", "--ckpt", str(tmp / "run"), "--out", str(other), "--tensor", "1", "--dp", "2",
                     "--zero", "1", *force]) == 1
        err = capsys.readouterr().err
        assert str(other / "config.yaml") in err and "preset" in err
    assert sorted(os.listdir(other)) == before


def test_altered_release_is_named(made, capsys):
    tmp, _ = made
    rel = tmp / "rel_altered"
    shutil.copytree(tmp / "rel", rel)
    data = bytearray((rel / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (rel / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(rel)]) == 1
    assert "model.safetensors" in capsys.readouterr().out


def test_every_command_has_help(capsys):
    # the script itself once (a process costs seconds of imports); each sub-command through its parser
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_ckpt.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "from-release" in proc.stdout, proc.stderr
    for cmd in ("to-release", "reshard", "from-release", "inspect", "verify"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:") and cmd in out


@pytest.mark.parametrize("zero,pp", [(0, 1), (2, 2), (3, 1)])
def test_transformer_engine_names_round_trip(made, zero, pp):
    """Written under TE names (the LayerNorms fused into the next linear, TE's parameter order, its
    attention's extra state) and read back: the same tensors; the names are exactly those names.py maps
    a TE model's to."""
    from heptapod_ds.checkpoint.names import from_canonical, model_spec, te_parameter_order, to_canonical
    from heptapod_ds.config import load_config
    from heptapod_ds.engine import safe_load

    tmp, tensors = made
    run, out = tmp / f"te{zero}{pp}", tmp / f"relte{zero}{pp}"
    assert main(["reshard", "--ckpt", str(tmp / "run"), "--out", str(run), "--tensor", "2", "--dp", "1",
                 "--zero", str(zero), "--pipeline", str(pp), "--layer-impl", "transformer_engine"]) == 0
    tag = run / "checkpoints" / "global_step0"
    meta = json.loads((tag / "heptapod_meta.json").read_text())
    assert meta["config"]["backbone"]["transformer_impl"] == "transformer_engine"
    specs = model_spec(load_config(overrides=SMALL, world_size=1))
    group = {from_canonical(s.name, "transformer_engine"): s.group for s in specs}
    te_order = [from_canonical(n, "transformer_engine") for n in te_parameter_order([s.name for s in specs])]
    assert not any(n.endswith(("input_layernorm.weight", "pre_mlp_layernorm.bias")) for n in te_order)
    assert "backbone.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_order
    stages = [tag] if pp == 1 else [tag / f"pp_stage{k:02d}" for k in range(pp)]
    names, extras = [], []
    for stage in stages:
        sd = safe_load.load(stage / ("zero_pp_rank_0_mp_rank_01_model_states.pt" if zero == 3
                                     else "mp_rank_01_model_states.pt"), mmap=True)
        keys = list(sd["module"])
        extras += [k for k in keys if k.endswith("._extra_state")]
        params = [k for k in keys if not k.endswith("._extra_state")]
        if zero > 0:  # DeepSpeed's flat layout: optimizer group by group, each in the model's order
            mine = [n for n in te_order if n in set(params)]
            assert [n for g in sd["param_shapes"] for n in g] == sorted(mine, key=lambda n: group[n])
        names += params
    assert sorted(names) == sorted(te_order)
    assert all(from_canonical(to_canonical(n), "transformer_engine") == n for n in names)
    assert "backbone.decoder.layers.1.self_attention.core_attention._extra_state" in extras
    assert main(["to-release", "--ckpt", str(run), "--out", str(out), "--weights", "ema"]) == 0
    got = _release(out)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_streamed_release_reads_each_tensor_exactly(made, tmp_path):
    """from-release reads the release tensor by tensor (fp32 and bf16 files); a cut file is named."""
    from safetensors.torch import save_file

    from heptapod_ds.checkpoint.release import ReleaseError, StreamedWeights

    _, tensors = made
    half = {k: v.to(torch.bfloat16) for k, v in list(tensors.items())[:4]}
    for name, data in (("fp32", tensors), ("bf16", half)):
        path = tmp_path / f"{name}.safetensors"
        save_file(data, str(path))
        streamed = StreamedWeights(path)
        assert set(streamed) == set(data) and len(streamed) == len(data)
        for k, v in data.items():
            assert streamed.shape(k) == tuple(v.shape)
            assert streamed[k].dtype == torch.float32 and torch.equal(streamed[k], v.float())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "fp32.safetensors").read_bytes()[:-100])
    with pytest.raises(ReleaseError, match="cut.safetensors"):
        StreamedWeights(cut)
