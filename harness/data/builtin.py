"""Built-in photographs, so that the quickstart trains without any download.

scikit-image ships a few real photos inside its wheel. We only read the
files: finding the package with `importlib.util.find_spec` avoids importing
scikit-image (slow, and it pulls in scipy) in every DataLoader worker.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# File name -> what it shows. Natural photographs and scans only: synthetic
# test patterns (chessboard, phantom, logo, ...) would teach the trunk nothing.
BUILTIN_PHOTOS: dict[str, str] = {
    "astronaut.png": "astronaut Eileen Collins, colour portrait",
    "brick.png": "brick wall texture, greyscale",
    "camera.png": "cameraman on a field, greyscale classic",
    "chelsea.png": "Chelsea the cat, colour",
    "coffee.png": "cup of coffee on a table, colour",
    "coins.png": "Greek coins on a plain background, greyscale",
    "grass.png": "grass texture, greyscale",
    "gravel.png": "gravel texture, greyscale",
    "hubble_deep_field.jpg": "Hubble deep field galaxies, colour",
    "ihc.png": "immunohistochemistry tissue stain, colour microscopy",
    "moon.png": "lunar surface, greyscale",
    "motorcycle_left.png": "motorcycle in a workshop, left stereo view",
    "motorcycle_right.png": "motorcycle in a workshop, right stereo view",
    "retina.jpg": "human retina fundus photograph, colour",
    "rocket.jpg": "SpaceX Falcon 9 on the launch pad, colour",
    "clock_motion.png": "wall clock with motion blur, greyscale",
    "page.png": "scanned book page under uneven light, greyscale",
    "text.png": "photographed hand-written text, greyscale",
    "cell.png": "cell under a microscope, greyscale",
}


def skimage_data_dir() -> Path:
    """scikit-image's bundled `data/` folder, without importing the package."""
    spec = importlib.util.find_spec("skimage")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            "the built-in images come with scikit-image, which is not installed: "
            "pip install scikit-image, or set data.path=/folder/of/images"
        )
    return Path(locations[0]) / "data"


def builtin_image_paths() -> list[Path]:
    """The bundled photos present in this install, in `BUILTIN_PHOTOS` order."""
    folder = skimage_data_dir()
    paths = [folder / name for name in BUILTIN_PHOTOS if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"scikit-image is installed but {folder} holds none of its sample photos; "
            "reinstall scikit-image (pip install --force-reinstall scikit-image), or set data.path=..."
        )
    return paths
