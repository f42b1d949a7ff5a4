"""Images/s per CPU core of the SEER multi-crop recipe: harness's pipeline against plain torchvision.

    .venv/bin/python profiling/bench_data.py                       # 48 photos x 3 rounds, one process
    .venv/bin/python profiling/bench_data.py --workers 2           # also through a 2-worker DataLoader
    .venv/bin/python profiling/bench_data.py --photos /my/jpegs    # your own JPEGs instead

The recipe is SwAV's/SEER's (Caron et al. 2020; VISSL's SEER configs): 2 views
of 224 px at scale [0.14, 1] and 4 of 96 px at [0.05, 0.14]; flip p=0.5,
colour jitter (0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur p=0.5
sigma in [0.1, 2], normalisation. On the same photos, in the same run:

* fast: `harness.data.decode.open_image` -> `harness.data.multicrop.MultiCrop`
  (reduced-size JPEG decode, uint8 views) -> stack per crop group ->
  `normalize` (on the CPU here; training runs it on the accelerator);
* baseline: what a user writes with PIL and torchvision.transforms (v1):
  `Image.open(...).convert("RGB")` then per view RandomResizedCrop,
  RandomHorizontalFlip, RandomApply([ColorJitter]), RandomGrayscale,
  RandomApply([GaussianBlur(kernel ~10% of the crop)]), ToTensor, Normalize;
  stacked per group the same way;
* baseline with SwAV's PIL blur: the same, with the blur of SwAV's own code
  (PIL's ImageFilter.GaussianBlur, much cheaper than torchvision's float
  kernel): the strongest plain pipeline, printed so the ratio is not read
  against a slow blur alone;
* harness before (transforms.v2): the pipeline this one replaced;
* fast, colour on device: the CPU's share with `data.colour_on=device`
  (decode, crop, resize, flip, stack; jitter, grayscale, blur and
  normalisation run batched on the accelerator, `DeviceAugment`);
* decode only: `open_image` + `decode(reduce=1)`, the floor of any pipeline
  that decodes every pixel.

Each sample reseeds torch (as the loader does). Photos are read into memory
first, so disk speed is not measured. "Per core" is images per second of CPU
time of this process (`time.process_time`) with torch.set_num_threads(1): on a
machine shared with other jobs, wall time counts the time others hold the core
and CPU time does not, so it is the steadier figure; both are printed.
Rounds alternate between the pipelines, so slow phases of a busy machine hit
both alike. With --workers N the same two pipelines also run through a
DataLoader of N workers (wall time; per core = rate / N; the fast one hands
over uint8 batches, as in training, the baseline float32 ones).

Photos: `harness.data.photos.make_photos` (built-in photographs cropped and
scaled to 0.3-2 MP, JPEG quality 90) unless --photos is given.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config.schema import AugmentConfig, CropConfig  # noqa: E402
from harness.data.decode import decode, open_image  # noqa: E402
from harness.data.multicrop import MultiCrop, blur_kernel_size, normalize, view_transform  # noqa: E402
from harness.data.photos import make_photos  # noqa: E402

SEER_CROPS = [CropConfig(size=224, count=2, scale=[0.14, 1.0]), CropConfig(size=96, count=4, scale=[0.05, 0.14])]

Pipeline = Callable[[bytes], list[torch.Tensor]]


def baseline_transform(crop: CropConfig, aug: AugmentConfig) -> T.Compose:
    """One view as a user writes it with torchvision.transforms (v1) on PIL images."""
    s = aug.jitter_strength
    return T.Compose([
        T.RandomResizedCrop(crop.size, scale=(crop.scale[0], crop.scale[1])),
        T.RandomHorizontalFlip(aug.flip_p),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.jitter_p),
        T.RandomGrayscale(aug.grayscale_p),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(crop.size), sigma=tuple(aug.blur_sigma))], p=aug.blur_p),
        T.ToTensor(),
        T.Normalize(aug.normalize_mean, aug.normalize_std),
    ])


class PILGaussianBlur:
    """SwAV's own blur (facebookresearch/swav, src/multicropdataset.py: PIL's ImageFilter.GaussianBlur with a
    radius drawn from [0.1, 2]), drawn from torch's RNG here so that reseeding covers it."""

    def __init__(self, sigma: Sequence[float]) -> None:
        self.low, self.high = float(sigma[0]), float(sigma[1])

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = self.low + (self.high - self.low) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def swav_transform(crop: CropConfig, aug: AugmentConfig) -> T.Compose:
    """The baseline with SwAV's PIL blur instead of torchvision's: the strongest plain pipeline we know."""
    base = baseline_transform(crop, aug).transforms
    return T.Compose([*base[:4], T.RandomApply([PILGaussianBlur(aug.blur_sigma)], p=aug.blur_p), *base[5:]])


def previous_transform(crop: CropConfig, aug: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    """harness's pipeline before this one: torchvision.transforms.v2 on PIL images, float output."""
    return view_transform(crop, aug)


def _stack_groups(views: list[torch.Tensor], crops: Sequence[CropConfig]) -> list[torch.Tensor]:
    out, at = [], 0
    for crop in crops:
        out.append(torch.stack(views[at:at + crop.count]))
        at += crop.count
    return out


def fast_pipeline(crops: Sequence[CropConfig], aug: AugmentConfig, colour_on: str = "cpu",
                  normalise: bool = True) -> Pipeline:
    """normalise=False: the CPU's part ends at the uint8 batch, as in training (normalised on the device)."""
    multicrop = MultiCrop(crops, aug, colour_on=colour_on)

    def run(data: bytes) -> list[torch.Tensor]:
        groups = _stack_groups(multicrop(open_image(data)), crops)
        return [normalize(group, aug) for group in groups] if normalise else groups
    return run


def baseline_pipeline(crops: Sequence[CropConfig], aug: AugmentConfig, make: Callable = baseline_transform
                      ) -> Pipeline:
    groups = [(crop.count, make(crop, aug)) for crop in crops]

    def run(data: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return _stack_groups([t(image) for count, t in groups for _ in range(count)], crops)
    return run


def decode_only(data: bytes) -> list[torch.Tensor]:
    decode(open_image(data), 1)
    return []


class _Photos(Dataset):
    """Photo bytes -> a pipeline's output, reseeded per sample like the training loader."""

    def __init__(self, datas: list[bytes], pipeline: Pipeline, repeat: int) -> None:
        self.datas, self.pipeline, self.repeat = datas, pipeline, repeat

    def __len__(self) -> int:
        return len(self.datas) * self.repeat

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        torch.manual_seed(i)
        return self.pipeline(self.datas[i % len(self.datas)])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def time_loader(datas: list[bytes], pipeline: Pipeline, workers: int, repeat: int, batch: int) -> float:
    """Wall images/s through a DataLoader of `workers` processes (first batch excluded: start-up)."""
    loader = DataLoader(_Photos(datas, pipeline, repeat), batch_size=batch, num_workers=workers,
                        worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for item in it:
        n += item[0].shape[0]
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, help="folder of JPEGs (default: made from the built-in photos)")
    parser.add_argument("--n", type=int, default=48, help="photos to make (default 48)")
    parser.add_argument("--megapixels", type=float, nargs=2, default=(0.3, 2.0))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over all photos (default 3)")
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with N workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.photos is not None:
            paths = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
            if not paths:
                raise SystemExit(f"no .jpg/.jpeg files in {args.photos}")
        else:
            paths = make_photos(tmp, args.n, megapixels=tuple(args.megapixels), seed=args.seed)
        datas = [p.read_bytes() for p in paths]
    pixels = [Image.open(io.BytesIO(d)).size for d in datas]
    mean_mp = sum(w * h for w, h in pixels) / len(pixels) / 1e6
    aug = AugmentConfig()
    pipelines: dict[str, Pipeline] = {
        "fast": fast_pipeline(SEER_CROPS, aug),
        "baseline": baseline_pipeline(SEER_CROPS, aug),
        "baseline with SwAV's PIL blur": baseline_pipeline(SEER_CROPS, aug, swav_transform),
        "harness before (transforms.v2)": baseline_pipeline(SEER_CROPS, aug, previous_transform),
        "fast, colour on device (CPU part)": fast_pipeline(SEER_CROPS, aug, colour_on="device", normalise=False),
        "decode only": decode_only,
    }
    cpu = dict.fromkeys(pipelines, 0.0)
    wall = dict.fromkeys(pipelines, 0.0)
    for data in datas[:2]:  # warm-up: imports, allocator, first-call costs
        for run in pipelines.values():
            run(data)
    total = args.rounds * len(datas)
    with tqdm(total=total * len(pipelines), desc="images", unit="img") as bar:
        for r in range(args.rounds):
            for name, run in pipelines.items():
                c0, w0 = time.process_time(), time.perf_counter()
                for i, data in enumerate(datas):
                    torch.manual_seed(r * len(datas) + i)
                    run(data)
                cpu[name] += time.process_time() - c0
                wall[name] += time.perf_counter() - w0
                bar.update(len(datas))

    print(f"\n{len(datas)} JPEGs, {mean_mp:.2f} MP mean ({min(w * h for w, h in pixels) / 1e6:.2f}-"
          f"{max(w * h for w, h in pixels) / 1e6:.2f}), {args.rounds} rounds, torch threads 1, "
          f"recipe {' + '.join(f'{c.count}x{c.size}' for c in SEER_CROPS)}")
    width = max(map(len, pipelines))
    print(f"{'pipeline':<{width}} {'img/s per core (CPU time)':>26} {'img/s (wall)':>14} {'ms/img (CPU)':>13}")
    for name in pipelines:
        print(f"{name:<{width}} {total / cpu[name]:>26.1f} {total / wall[name]:>14.1f} "
              f"{1e3 * cpu[name] / total:>13.2f}")
    print(f"ratio fast / baseline: {cpu['baseline'] / cpu['fast']:.2f}x per core (CPU time), "
          f"{wall['baseline'] / wall['fast']:.2f}x wall")
    for name in ("baseline with SwAV's PIL blur", "harness before (transforms.v2)"):
        print(f"ratio fast / {name}: {cpu[name] / cpu['fast']:.2f}x per core (CPU time)")

    if args.workers > 0:
        batch = 16
        repeat = max(1, (args.workers * 8 * batch) // len(datas))
        print(f"\nDataLoader, {args.workers} workers, batch {batch}, {len(datas) * repeat} images (wall):")
        rates = {}
        # as in training, the fast loader hands over uint8 (normalised on the device); the baseline float32
        loaders = {"fast": fast_pipeline(SEER_CROPS, aug, normalise=False), "baseline": pipelines["baseline"]}
        for name, pipeline in loaders.items():
            rates[name] = time_loader(datas, pipeline, args.workers, repeat, batch)
            print(f"{name:<12} {rates[name]:>8.1f} img/s  {rates[name] / args.workers:>8.1f} img/s per worker")
        print(f"ratio fast / baseline: {rates['fast'] / rates['baseline']:.2f}x")


if __name__ == "__main__":
    main()
