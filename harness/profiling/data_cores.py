"""How many CPU cores per GPU the data path needs, from a measured images/s per core.

Multi-crop augmentation is the host's hot spot: every image becomes six
views, decoded and augmented on CPU cores that a GPU node has a fixed
number of. The step's images/s per GPU (planned or measured) over the
images/s one core produces gives the cores each GPU must have; a node needs
that times its GPUs, plus what the training processes themselves use.
The per-core figure is measured, never assumed: `profiling/bench_data.py`
prints it for the recipe at hand on the machine at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

# Images/s per core of harness's pipeline for SEER's recipe (2x224 + 4x96 views, SwAV's augmentations,
# 48 JPEGs of 0.3-1.8 MP), one thread, by data.colour_on: `python profiling/bench_data.py` on this
# project's 2-core CPU machine (2026-11-30: "fast" 64.0, "colour on device (CPU part)" 117.9). A
# measurement of one machine, not a law: pass --images-per-core with your own figure.
IMAGES_PER_CORE = {"cpu": 64.0, "device": 117.9}
IMAGES_PER_CORE_SOURCE = "profiling/bench_data.py on this project's 2-core CPU machine"


@dataclass(frozen=True)
class DataCores:
    images_per_s_per_gpu: float
    images_per_core: float
    gpus_per_node: int

    @property
    def per_gpu(self) -> float:
        return self.images_per_s_per_gpu / self.images_per_core

    @property
    def per_node(self) -> float:
        return self.per_gpu * self.gpus_per_node


def data_cores(images_per_s_per_gpu: float, images_per_core: float, gpus_per_node: int) -> DataCores:
    if images_per_core <= 0 or images_per_s_per_gpu < 0:
        raise ValueError(f"need images_per_core > 0 and a non-negative step rate, got {images_per_core}, "
                         f"{images_per_s_per_gpu}")
    return DataCores(images_per_s_per_gpu, images_per_core, gpus_per_node)


def data_line(cores: DataCores, source: str, colour_on: str) -> str:
    """One line for `harness plan`: the cores each GPU and node need to keep the step fed."""
    hint = "" if colour_on == "device" else (
        f"; data.colour_on=device (colour and blur on the GPU) needs "
        f"{cores.images_per_s_per_gpu / IMAGES_PER_CORE['device']:.1f} at this machine's rate")
    return (f"data: {cores.images_per_s_per_gpu:.1f} images/s per GPU need {cores.per_gpu:.1f} CPU cores per GPU "
            f"({cores.per_node:.0f} per {cores.gpus_per_node}-GPU node) for loading at {cores.images_per_core:.1f} "
            f"images/s per core (colour on the {'GPU' if colour_on == 'device' else 'CPU'}; {source}){hint}")
