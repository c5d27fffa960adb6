"""One-time conversion of the A2D-Sentences release into the tree that
common.datasets.A2DSentences reads (data/README.md, "A2D-Sentences").

The release keeps its frames in videos (Release/clips320H/<video>.mp4) and its masks in HDF5
files, and reading those needs a video decoder and an HDF5 reader that the repository's
requirements leave out. This script needs them, once:

    pip install av h5py numpy pillow      # a separate environment is fine: nothing else is used

    python data/convert_a2d.py --release /path/to/a2d_sentences --out data/a2d-sentences

It writes, for every video that a2d_annotation.txt names and a2d_missed_videos.txt does not:
  JPEGImages/<video>/<frame:05d>.jpg   every decoded frame of the video in presentation order,
                                       numbered from 1 as the annotations number them (ReferFormer
                                       and MTTR index torchvision's read_video frames with
                                       frame - 1), JPEG quality --quality
  text_annotations/a2d_annotation_with_instances/<video>/<frame:05d>.npz
                                       each .h5 file's arrays unchanged (reMask transposed,
                                       (N, W, H) or (W, H) for one instance; reBBox; instance): the
                                       reader undoes the transposition, as MTTR does
and copies Release/videoset.csv, text_annotations/a2d_annotation.txt and
a2d_missed_videos.txt, so that --out is the whole dataset (--out may be the release folder
itself). A video already converted (its folder complete) is skipped, so an interrupted run can
be started again. The readers use numpy, Pillow and the repository's requirements only.
"""
import argparse
import csv
import importlib.util
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

TEXT_FILES = ("Release/videoset.csv", "text_annotations/a2d_annotation.txt",
              "text_annotations/a2d_missed_videos.txt")
MASK_DIR = "text_annotations/a2d_annotation_with_instances"


def videos_to_convert(release: Path) -> list:
    """The videos the readers use: those with a sentence in a2d_annotation.txt (header
    video_id,instance_id,query), less those a2d_missed_videos.txt lists (one per line)."""
    with open(release / "text_annotations" / "a2d_annotation.txt", newline="",
              encoding="utf-8") as f:
        named = {row["video_id"] for row in csv.DictReader(f)}
    missed = set((release / "text_annotations" / "a2d_missed_videos.txt").read_text()
                 .splitlines())
    return sorted(named - missed)


def h5_arrays(h5) -> dict:
    """Every dataset of an open h5py File (or any mapping of names to arrays) as numpy arrays,
    unchanged."""
    return {name: np.asarray(h5[name]) for name in h5.keys()}


def write_annotation(arrays: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def write_frames(frames, folder: Path, *, quality: int) -> int:
    """(H, W, 3) uint8 RGB frames -> folder/00001.jpg, 00002.jpg, ... Written to folder.partial
    and renamed at the end, so a folder that exists is complete. Returns the count."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = 0
    for count, frame in enumerate(frames, 1):
        Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(partial / f"{count:05d}.jpg",
                                                                quality=quality)
    partial.rename(folder)
    return count


def decode_video(path: Path):
    """The frames of a video as (H, W, 3) uint8 RGB arrays, in presentation order (PyAV, which
    torchvision's read_video uses)."""
    import av  # imported here: the rest of this file runs without it (main checks it is there)

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def read_h5(path: Path) -> dict:
    import h5py  # imported here, as av

    with h5py.File(path, "r") as h5:
        return h5_arrays(h5)


def convert_video(release: Path, out: Path, video: str, *, quality: int) -> str:
    """One video's frames and annotations; returns a line for the log."""
    folder = out / "JPEGImages" / video
    annotations = sorted((release / MASK_DIR / video).glob("*.h5"))
    for h5 in annotations:
        target = out / MASK_DIR / video / f"{h5.stem}.npz"
        if not target.is_file():
            write_annotation(read_h5(h5), target)
    if folder.is_dir():
        return f"{video}: frames already there"
    clips = release / "Release" / "clips320H"  # ReferFormer's and MTTR's code
    if not clips.is_dir() and (release / "Release" / "CLIPS320").is_dir():
        clips = release / "Release" / "CLIPS320"  # the name MTTR's README gives
    count = write_frames(decode_video(clips / f"{video}.mp4"), folder, quality=quality)
    late = [h5.stem for h5 in annotations if int(h5.stem) > count]
    warning = f"; annotated frames beyond the video: {late}" if late else ""
    return f"{video}: {count} frames, {len(annotations)} annotated{warning}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, required=True,
                        help="the unpacked release: Release/ and text_annotations/")
    parser.add_argument("--out", type=Path, default=Path("data/a2d-sentences"))
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--workers", type=int, default=4, help="videos converted in parallel")
    args = parser.parse_args(argv)
    missing = [m for m in ("av", "h5py") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"data/convert_a2d.py needs {' and '.join(missing)}: pip install av "
                         f"h5py (a separate environment is fine; see the top of the file)")
    for name in TEXT_FILES:
        source, target = args.release / name, args.out / name
        if not source.is_file():
            raise SystemExit(f"expected {source} in the A2D-Sentences release (data/README.md)")
        if source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    videos = videos_to_convert(args.release)
    convert = partial(convert_video, args.release, args.out, quality=args.quality)
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else nullcontext() as pool:
        for k, line in enumerate((pool.map if pool else map)(convert, videos), 1):
            print(f"[{k}/{len(videos)}] {line}", flush=True)


if __name__ == "__main__":
    main()
