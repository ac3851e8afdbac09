"""The README's first quick-start command: the offline demo, end to end."""

from PIL import Image

from dreambooth_moslora import FILE_NAMES
from dreambooth_moslora.demo import main


def test_demo_runs_offline_and_writes_adapters_and_grid(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--mixer", "learned"]) == 0
    out = capsys.readouterr().out
    for name in FILE_NAMES.values():
        assert (tmp_path / "adapter" / name).stat().st_size > 10_000
    assert "MISMATCH" not in out and out.count(" ok") >= 6
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (3 * 128, 128 + 14)


def test_demo_bad_setting_is_one_line(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--rank", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rank must be a positive integer") and "\n" not in err
