"""pretokenize: round trip against a direct encode, skipped images, resume, lock, refusals."""
import numpy as np
import pytest
import torch

from data_helpers import make_image_folder
from heptapod_ds.config.schema import TokenizerConfig
from heptapod_ds.data import (EmptySourceError, ImageFolderSource, OutputLockedError, PretokenizeOptions,
                              pretokenize, verify_beton)
from heptapod_ds.data.format import summary_path
from heptapod_ds.data.locking import OutputLock
from heptapod_ds.tokenizers import KL16Tokenizer, PatchTokenizer

OPTS = dict(batch_size=3, shard_size=4, decode_workers=2, write_workers=1, progress=False, device="cpu")


def _read_all(path):
    from ffcv.reader import Reader
    from ffcv.loader import Loader, OrderOption

    fields = list(Reader(path).handlers)
    loader = Loader(path, batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False)
    out = {}
    for batch in loader:
        for name, value in zip(fields, batch):
            out.setdefault(name, []).append(value.clone())
    return {k: torch.cat(v) for k, v in out.items()}


def test_round_trip_equals_direct_encode_and_reports_corrupt(tmp_path):
    src_dir = make_image_folder(tmp_path / "in")
    tok = KL16Tokenizer(image_size=32, ch=32, load_weights=False)  # random weights: an exact test of the path
    cfg = TokenizerConfig(name="kl16", image_size=32, stride=16, channels=16, scale_factor=0.2325)
    out = str(tmp_path / "out" / "train.beton")
    summary = pretokenize(ImageFolderSource(str(src_dir), 32), tok, cfg, out, PretokenizeOptions(**OPTS))
    source = ImageFolderSource(str(src_dir), 32)
    assert len(source) == 7 and summary["count"] == 6 and summary["skipped_count"] == 1
    assert summary["skipped"][0]["path"] == "dog/zz_broken.jpg" and summary["skipped"][0]["source_index"] == 6
    assert summary["shape"] == [32, 2, 2] and summary["dtype"] == "float32" and summary["classes"] == 2
    assert verify_beton(out, cfg, full_checksum=True)["sha256"] == summary["sha256"]
    rows = _read_all(out)
    images = torch.stack([source.load(i) for i in range(6)])
    assert torch.allclose(rows["moments"], tok.encode(images), atol=1e-5)
    assert torch.allclose(rows["moments_flip"], tok.encode(images.flip(-1)), atol=1e-5)
    assert rows["label"].flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert rows["index"].flatten().tolist() == list(range(6))
    assert rows["source_index"].flatten().tolist() == list(range(6))


class _Interrupting(PatchTokenizer):
    """Counts encoder calls and fails once after ``fail_after`` of them (a killed job)."""

    def __init__(self, fail_after=None):
        super().__init__(image_size=32, stride=16, channels=768)
        self.calls, self.fail_after = 0, fail_after

    def encode(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return super().encode(images)


def test_resume_skips_finished_shards_and_matches_uninterrupted(tmp_path):
    src = ImageFolderSource(str(make_image_folder(tmp_path / "in", per_class=5, corrupt=False)), 32)
    cfg = TokenizerConfig(name="patch", image_size=32, stride=16, channels=768)
    opts = PretokenizeOptions(**dict(OPTS, batch_size=4, shard_size=4))  # 10 images: shards of 4, 4, 2
    reference = pretokenize(src, _Interrupting(), cfg, str(tmp_path / "ref.beton"), opts)
    out = str(tmp_path / "resumed.beton")
    with pytest.raises(KeyboardInterrupt):
        pretokenize(src, _Interrupting(fail_after=2), cfg, out, opts)
    second = _Interrupting()
    summary = pretokenize(src, second, cfg, out, opts)
    assert second.calls == 1  # only the last shard was encoded again
    assert summary["count"] == reference["count"] == 10
    a, b = _read_all(str(tmp_path / "ref.beton")), _read_all(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_existing_output_without_force_and_overwrites_with_it(tmp_path):
    src = ImageFolderSource(str(make_image_folder(tmp_path / "in", corrupt=False)), 32)
    cfg = TokenizerConfig(name="patch", image_size=32, stride=16, channels=768)
    out = str(tmp_path / "x.beton")
    pretokenize(src, _Interrupting(), cfg, out, PretokenizeOptions(**OPTS))
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        pretokenize(src, _Interrupting(), cfg, out, PretokenizeOptions(**OPTS))
    assert pretokenize(src, _Interrupting(), cfg, out, PretokenizeOptions(**OPTS, force=True))["count"] == 6


def test_lock_held_by_another_job_is_an_error(tmp_path):
    src = ImageFolderSource(str(make_image_folder(tmp_path / "in", corrupt=False)), 32)
    cfg = TokenizerConfig(name="patch", image_size=32, stride=16, channels=768)
    out = str(tmp_path / "locked.beton")
    with OutputLock(out):
        with pytest.raises(OutputLockedError, match=r"another pretokenize job holds the lock .*locked.beton.lock"):
            pretokenize(src, _Interrupting(), cfg, out, PretokenizeOptions(**OPTS))
    assert not (tmp_path / "locked.beton").exists() and not (tmp_path / "locked.beton.json").exists()


def test_daemonic_process_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A rank of a daemonic pool (a test harness, some launchers) cannot start FFCV's writer processes."""
    import multiprocessing as mp

    src = ImageFolderSource(str(make_image_folder(tmp_path / "in", corrupt=False)), 32)
    cfg = TokenizerConfig(name="patch", image_size=32, stride=16, channels=768)
    monkeypatch.setitem(mp.current_process()._config, "daemon", True)
    with pytest.raises(RuntimeError, match="daemonic process.*Build the dataset first"):
        pretokenize(src, _Interrupting(), cfg, str(tmp_path / "d.beton"), PretokenizeOptions(**OPTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_image_folder_without_images_is_an_error(tmp_path):
    with pytest.raises(EmptySourceError, match="no class sub-folders"):
        ImageFolderSource(str(tmp_path), 32)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(EmptySourceError, match="1 class folder\\(s\\) but no images"):
        ImageFolderSource(str(tmp_path), 32)
    with pytest.raises(EmptySourceError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "missing"), 32)


def test_center_crop_is_adm_style():
    from PIL import Image
    from heptapod_ds.data.sources import center_crop

    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 140:160] = 255  # a bright vertical bar at the centre survives the crop
    out = np.asarray(center_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3)
    assert out[:, 16].mean() > 200 and out[:, 0].mean() < 10
