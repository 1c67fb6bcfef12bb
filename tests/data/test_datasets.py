"""The digits cache and beton validation: built once, reused, rebuilt when corrupt; clear errors."""
import logging
import os
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from heptapod_ds.config import load_config
from heptapod_ds.data import BetonError, ensure_dataset, verify_beton


def _cfg(tmp_path, *extra):
    return load_config(overrides=[f"data.cache_dir={tmp_path}", *extra], world_size=1)


def _rows(path, field):
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    names = list(Reader(path).handlers)
    out = [b[names.index(field)].clone() for b in Loader(path, batch_size=512, num_workers=1,
                                                          order=OrderOption.SEQUENTIAL, drop_last=False)]
    return np.concatenate([o.numpy() for o in out])


def test_digits_pixel_built_fast_cached_and_exact(tmp_path):
    cfg = _cfg(tmp_path)
    ensure_dataset(_cfg(tmp_path / "warm"))  # pay imports / numba JIT outside the timing
    t0 = time.perf_counter()
    path = ensure_dataset(cfg)
    assert time.perf_counter() - t0 < 10.0
    mtime = os.path.getmtime(path)
    assert ensure_dataset(cfg) == path and os.path.getmtime(path) == mtime  # reused, not rebuilt
    digits = load_digits()
    assert np.array_equal(_rows(path, "codes"), digits.images.astype(np.int16))
    assert np.array_equal(_rows(path, "codes_flip"), digits.images[:, :, ::-1].astype(np.int16))
    assert np.array_equal(_rows(path, "label").ravel(), digits.target)


def test_digits_patch_stores_deterministic_moments(tmp_path):
    path = ensure_dataset(_cfg(tmp_path, "tokenizer.name=patch"))
    moments = _rows(path, "moments")
    assert moments.shape == (1797, 2, 8, 8)
    assert np.allclose(moments[:, 0], load_digits().images / 16 * 2 - 1, atol=1e-6)
    assert np.all(moments[:, 1] == -30.0)


def test_corrupt_cache_is_rebuilt_with_a_log_line(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    path = ensure_dataset(cfg)
    with open(path, "r+b") as fh:  # flip bytes inside the data region, same size
        fh.seek(os.path.getsize(path) // 2)
        fh.write(b"\x13" * 64)
    with caplog.at_level(logging.WARNING):
        assert ensure_dataset(cfg) == path
    assert "is unusable" in caplog.text and "rebuilding" in caplog.text
    verify_beton(path, cfg.tokenizer, full_checksum=True)


def test_bad_betons_are_clear_errors(tmp_path):
    cfg = _cfg(tmp_path)
    good = ensure_dataset(cfg)
    with pytest.raises(BetonError, match="does not exist. Write it with tools/pretokenize.py"):
        ensure_dataset(_cfg(tmp_path, f"data.path={tmp_path}/missing.beton"))
    empty = tmp_path / "empty.beton"
    empty.write_bytes(b"")
    with pytest.raises(BetonError, match="is empty"):
        verify_beton(str(empty))
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(BetonError, match="corrupt or truncated|truncated"):
        verify_beton(str(truncated))
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(BetonError, match="corrupt"):
        verify_beton(str(garbage))
    corrupt = tmp_path / "corrupt.beton"
    data = bytearray(open(good, "rb").read())
    data[len(data) // 2: len(data) // 2 + 8] = b"\x00\x01" * 4
    corrupt.write_bytes(bytes(data))
    os.link(good + ".json", str(corrupt) + ".json")
    with pytest.raises(BetonError, match="sha256 differs"):
        verify_beton(str(corrupt), full_checksum=True)
    nosummary = tmp_path / "nosummary.beton"
    nosummary.write_bytes(open(good, "rb").read())
    with pytest.raises(BetonError, match="has no summary"):
        verify_beton(str(nosummary))


def test_beton_that_does_not_fit_the_model_config(tmp_path):
    path = ensure_dataset(_cfg(tmp_path))  # pixel codes int16 [8, 8]
    with pytest.raises(BetonError, match="written with tokenizer 'pixel' but the config uses tokenizer.name=patch"):
        ensure_dataset(_cfg(tmp_path, f"data.path={path}", "tokenizer.name=patch"))
    # the tokenizer settings recorded with the beton are checked before the field layouts
    with pytest.raises(BetonError, match=r"other tokenizer settings .*tokenizer\.stride: beton 1, config 2"):
        ensure_dataset(_cfg(tmp_path, f"data.path={path}", "tokenizer.stride=2"))
    with pytest.raises(BetonError, match=r"tokenizer\.vocab_size: beton 17, config 40000"):
        ensure_dataset(_cfg(tmp_path, f"data.path={path}", "tokenizer.vocab_size=40000"))
    with pytest.raises(BetonError, match="digits are 8x8"):
        ensure_dataset(_cfg(tmp_path, "tokenizer.image_size=16"))
