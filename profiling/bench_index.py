"""Start-up cost of an index of 10 million images, per rank, and the folder listing rate.

    .venv/bin/python profiling/bench_index.py [--entries 10000000] [--files 20000] [--dir /tmp]

1. Writes an index of synthetic paths (`a/b/c/img_00123456.jpg`, no files
   made) with `write_index`, timing the streaming write.
2. In a fresh interpreter (what a rank is), opens it and looks up 1000
   random entries, printing the time and the peak resident memory that
   adds on top of the interpreter with harness.data.index imported
   (ru_maxrss; psutil's current RSS too when installed).
   Target (issue 13): start-up under 10 s and under 100 MB per rank.
3. The same size of index over real files, in a fresh interpreter: the
   rank's whole data start-up (`build_stream`: open, probe for a readable
   image, first batch of crops) and a resume 9 billion images into the stream.
4. Lists a real folder of `--files` empty files with `index_folder`, twice,
   and prints files/s: the rate of the walk and the index writing on a
   local disk with the folders cached, not that of a cold network file
   system (which is why the listing happens once, not once per rank).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _paths(n: int) -> Iterator[str]:
    for i in range(n):
        yield f"{i % 16:02x}/{i // 16 % 256:02x}/{i // 4096 % 256:02x}/img_{i:08d}.jpg"


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def probe(path: str, lookups: int) -> None:
    """Run in the fresh interpreter: the rank's view."""
    from harness.data.index import IndexFile

    base_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    index = IndexFile(path)
    t_open = time.perf_counter() - t0
    rng = random.Random(0)
    t1 = time.perf_counter()
    got = [index[rng.randrange(len(index))] for _ in range(lookups)]
    t_look = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = _rss_mb()
    print(json.dumps({
        "entries": len(index), "open_s": t_open, "lookups": lookups, "lookups_s": t_look, "example": got[0],
        "baseline_peak_mb": base_peak_kb / 1024, "peak_increase_mb": (peak_kb - base_peak_kb) / 1024,
        "rss_increase_mb": None if rss is None or base_rss is None else rss - base_rss,
    }))


def probe_stream(path: str) -> None:
    """Run in the fresh interpreter: a rank's whole data start-up over the index (open, probe for a readable
    image, first batch of SEER's crops), then a resume 9 billion images into the stream."""
    import torch

    from harness.config.schema import DataConfig
    from harness.data import build_stream
    import harness.data.decode
    import harness.data.multicrop

    assert harness.data.decode and harness.data.multicrop  # imported before the baseline: every rank has them

    torch.set_num_threads(1)
    base_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stream = build_stream(DataConfig(path=path, batch_size=4, num_workers=0), seed=0, rank=3, world_size=512)
    next(stream)
    t_start = time.perf_counter() - t0
    state = {**stream.state_dict(), "cursor": 9_000_000_000}
    t1 = time.perf_counter()
    stream.load_state_dict(state)
    next(stream)
    t_resume = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"start_s": t_start, "resume_s": t_resume, "baseline_peak_mb": base_peak_kb / 1024,
                      "peak_increase_mb": (peak_kb - base_peak_kb) / 1024}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.lookups)
        return 0
    if args.probe_stream:
        probe_stream(args.probe_stream)
        return 0

    from harness.data.index import index_folder, write_index

    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.dir))
    try:
        out = work / "synthetic.harnidx"
        t0 = time.perf_counter()
        n = write_index(_paths(args.entries), out, root="/data/crawl")
        t_write = time.perf_counter() - t0
        print(f"write_index: {n:,} entries in {t_write:.1f} s ({n / t_write:,.0f} entries/s), "
              f"{out.stat().st_size / 2**20:.0f} MiB on disk")

        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--probe", str(out), "--lookups", str(args.lookups)],
                             capture_output=True, text=True, check=True)
        t_proc = time.perf_counter() - t0
        r = json.loads(run.stdout)
        rss = "" if r["rss_increase_mb"] is None else f", RSS +{r['rss_increase_mb']:.1f} MB (psutil)"
        print(f"fresh rank: open {r['open_s'] * 1e3:.2f} ms, {r['lookups']} random lookups "
              f"{r['lookups_s'] * 1e3:.1f} ms ({r['lookups_s'] / r['lookups'] * 1e6:.1f} us each); "
              f"peak RSS +{r['peak_increase_mb']:.1f} MB over the interpreter with the module imported "
              f"({r['baseline_peak_mb']:.0f} MB){rss}; whole process start to finish {t_proc:.2f} s "
              f"(target: < 10 s and < 100 MB per rank)")

        # The same size of index over real files (16 photos, each listed many times), read by the real loader.
        from harness.data.builtin import builtin_image_paths

        photos = work / "photos"
        photos.mkdir()
        for i, src in enumerate(builtin_image_paths()[:16]):
            shutil.copy(src, photos / f"p{i:02d}{src.suffix}")
        names = sorted(p.name for p in photos.iterdir())
        real = work / "real.harnidx"
        write_index((names[i % len(names)] for i in range(args.entries)), real, root=photos)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--probe-stream", str(real)], capture_output=True, text=True,
                             check=True)
        t_proc = time.perf_counter() - t0
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"fresh rank 3 of 512, data.path = a {args.entries:,}-entry index: build_stream + first batch "
              f"{r['start_s']:.2f} s, peak RSS +{r['peak_increase_mb']:.1f} MB over the interpreter with torch and "
              f"harness.data imported ({r['baseline_peak_mb']:.0f} MB); resume 9e9 images in: {r['resume_s'] * 1e3:.1f} ms to the next "
              f"batch; whole process {t_proc:.1f} s (target: < 10 s and < 100 MB per rank)")

        folder = work / "folder"
        per = 1000
        for i in range(args.files):
            if i % per == 0:
                sub = folder / f"d{i // per:03d}"
                sub.mkdir(parents=True)
            (sub / f"img_{i:07d}.jpg").touch()
        for attempt in ("first", "second"):
            t0 = time.perf_counter()
            listed = index_folder(folder, work / "folder.harnidx", [".jpg"], progress=False)
            t_list = time.perf_counter() - t0
            print(f"index_folder ({attempt} listing): {listed:,} files in {-(-args.files // per)} folders in "
                  f"{t_list:.2f} s ({listed / t_list:,.0f} files/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
