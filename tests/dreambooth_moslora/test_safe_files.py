"""Atomic writes and kill-safe deletes: a crash at any point leaves the old thing or the new one, never half."""

import shutil
from pathlib import Path

import pytest
from PIL import Image

import dreambooth_moslora.safe_files as safe_files
from dreambooth_moslora.safe_files import atomic_path, remove_path, replace_path, save_image, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = write_text(tmp_path / "card.md", "old\n")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]
    save_image(Image.new("RGB", (4, 4), "red"), tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").getpixel((0, 0)) == (255, 0, 0)


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    (final / "old.bin").write_text("old")
    with atomic_path(final, directory=True) as tmp:
        assert tmp.name.startswith(".") and tmp.is_dir()
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_a_kill_while_deleting_a_folder_leaves_no_half_folder_under_its_name(tmp_path, monkeypatch):
    doomed = tmp_path / "checkpoint-2"
    doomed.mkdir()
    for name in ("moslora_adapter.safetensors", "optimizer.bin", "scheduler.bin"):
        (doomed / name).write_text(name)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        for child in sorted(Path(path).iterdir())[:2]:
            child.unlink()  # part of the folder is gone …
        raise KeyboardInterrupt  # … when the process dies

    monkeypatch.setattr(safe_files.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        remove_path(doomed)
    monkeypatch.setattr(safe_files.shutil, "rmtree", real_rmtree)
    assert not doomed.exists()  # the real name never names a half-deleted checkpoint
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [".checkpoint-2.deleting"]


def test_replace_path_moves_an_old_folder_aside_first(tmp_path):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("a")
    new.mkdir()
    (new / "b").write_text("b")
    replace_path(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
