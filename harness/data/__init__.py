"""Images -> multi-crop batches: folder scanning, built-in photos, augmentation, loading."""

from harness.data.builtin import BUILTIN_PHOTOS, builtin_image_paths
from harness.data.images import ImageDataset, find_images, load_image, to_rgb
from harness.data.loader import (
    EpochSampler,
    RepeatedDataset,
    SeededDataset,
    build_dataloader,
    collate_crops,
    count_images,
    sample_seed,
    set_epoch,
)
from harness.data.multicrop import MultiCrop, validate_augment, validate_crops
from harness.data.stream import DataStream

__all__ = [
    "BUILTIN_PHOTOS",
    "DataStream",
    "EpochSampler",
    "ImageDataset",
    "MultiCrop",
    "RepeatedDataset",
    "SeededDataset",
    "build_dataloader",
    "builtin_image_paths",
    "collate_crops",
    "count_images",
    "find_images",
    "load_image",
    "sample_seed",
    "set_epoch",
    "to_rgb",
    "validate_augment",
    "validate_crops",
]
