"""tools/pretokenize.py as a command: exit status, summary, skipped report, refusals."""
import json
import subprocess
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "data"))
from data_helpers import make_image_folder  # noqa: E402


def _run(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "tools" / "pretokenize.py"), *args, "--no-progress",
                           "--decode-workers", "1", "--write-workers", "1"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_contract(repo_root, tmp_path):
    src = make_image_folder(tmp_path / "in")
    out = tmp_path / "out" / "train.beton"
    ok = _run(repo_root, "--input", str(src), "--output", str(out), "--tokenizer", "patch", "--size", "32")
    assert ok.returncode == 0, ok.stderr
    assert "skipped dog/zz_broken.jpg" in ok.stderr
    summary = json.loads((tmp_path / "out" / "train.beton.json").read_text())
    assert summary["count"] == 6 and summary["skipped_count"] == 1 and summary["shape"] == [1536, 2, 2]
    assert summary["tokenizer"]["name"] == "patch" and len(summary["sha256"]) == 64

    again = _run(repo_root, "--input", str(src), "--output", str(out), "--tokenizer", "patch", "--size", "32")
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr

    (tmp_path / "empty").mkdir()
    empty = _run(repo_root, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "e.beton"),
                 "--tokenizer", "pixel", "--size", "8")
    assert empty.returncode == 1 and "no class sub-folders" in empty.stderr

    no_ckpt = _run(repo_root, "--input", str(src), "--output", str(tmp_path / "k.beton"), "--tokenizer", "vq16",
                   "--size", "32", "--tokenizer-ckpt", str(tmp_path / "vq_ds16_c2i.pt"))
    assert no_ckpt.returncode == 1 and "vq_ds16_c2i.pt' does not exist" in no_ckpt.stderr
    assert "huggingface.co/FoundationVision/LlamaGen" in no_ckpt.stderr
