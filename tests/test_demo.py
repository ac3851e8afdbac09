"""The README's first quick-start command: the offline demo, end to end."""

import pytest
from PIL import Image

from dreambooth_moslora import FILE_NAMES
from dreambooth_moslora.demo import main


def test_demo_trains_offline_and_writes_adapters_and_grid(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--max_train_steps", "6"]) == 0
    out = capsys.readouterr().out
    for name in FILE_NAMES.values():
        assert (tmp_path / "adapter" / name).stat().st_size > 10_000
    assert (tmp_path / "adapter" / "README.md").is_file()
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 8
    assert "MISMATCH" not in out and out.count(" ok") == 8
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (3 * 128, 2 * (128 + 14))


def test_demo_bad_setting_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--output_dir", str(tmp_path), "--rank", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--rank and --max_train_steps must be at least 1")
