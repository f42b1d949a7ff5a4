"""Folder scanning and the built-in photographs (bad files: test_decode.py, test_bad_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from harness.data import BUILTIN_PHOTOS, builtin_image_paths, find_images
from harness.data.decode import decode, open_image
from harness.data.images import first_image

EXTS = [".jpg", ".jpeg", ".png"]


def _save(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)
    return path


def test_find_images_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    a = _save(tmp_path / "b" / "deep" / "x.JPG")
    b = _save(tmp_path / "a.png")
    c = _save(tmp_path / "c" / "y.Jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / "._a.png")  # macOS resource fork
    _save(tmp_path / ".cache" / "z.png")
    found = find_images(tmp_path, EXTS)
    assert found == sorted([a, b, c])
    assert find_images(tmp_path, ["png"]) == [b]  # leading dot optional
    assert find_images(tmp_path, EXTS) == found  # deterministic


def test_find_images_missing_folder_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        find_images(missing, EXTS)
    assert str(missing) in str(err.value) and "data.path" in str(err.value)


def test_find_images_empty_folder_message(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no photos here")
    with pytest.raises(FileNotFoundError, match="no images found") as err:
        find_images(tmp_path, EXTS)
    message = str(err.value)
    assert str(tmp_path) in message and ".jpeg" in message and "data.path" in message


def test_first_image_follows_find_images_rules(tmp_path: Path) -> None:
    """The cheap up-front check must agree with the loader's scan on what counts as an image."""
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / ".cache" / "z.png")  # hidden folder: not a photo
    _save(tmp_path / "._a.png")  # macOS resource fork
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "again").symlink_to(tmp_path / "loop")  # a cycle must end the scan, not hang it
    assert first_image(tmp_path, EXTS) is None
    deep = _save(tmp_path / "b" / "deep" / "x.JPG")
    assert first_image(tmp_path, EXTS) == deep == find_images(tmp_path, EXTS)[0]
    assert first_image(tmp_path, ["png"]) is None


def test_builtin_photos_decode() -> None:
    paths = builtin_image_paths()
    print(f"{len(paths)} built-in photos: {[p.name for p in paths]}")
    assert len(paths) >= 15
    assert [p.name for p in paths] == [n for n in BUILTIN_PHOTOS if n in {p.name for p in paths}]
    for path in paths:
        image = decode(open_image(path))
        assert image.mode == "RGB"
        assert min(image.size) >= 128, (path.name, image.size)
