"""Throughput of the MeViS reader: training clips per second at T frames, read in the main process
and with DataLoader workers, side by side in one run.

    python tests/bench/bench_data.py                       # data/toy/mevis, split train
    python tests/bench/bench_data.py --root /data/mevis --clips 400
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere: import common/
from common.datasets import MeViS, collate_video  # noqa: E402


def clips_per_second(dataset, *, workers: int, clips: int, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate_video, drop_last=True)
    batches = iter(loader)
    next(batches)  # worker start-up and first reads are not throughput
    done, start = 0, time.perf_counter()
    while done < clips:
        try:
            done += len(next(batches)["video"])
        except StopIteration:
            batches = iter(loader)
    return done / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/toy/mevis")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clips", type=int, default=200, help="clips timed per setting")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--short-side", type=int, default=360,
                        help="resize target (360/640: the ReferFormer/MeViS eval size; the toy frames are 64x96)")
    parser.add_argument("--max-size", type=int, default=640)
    args = parser.parse_args()
    if not (Path(args.root) / args.split).is_dir():
        sys.exit(f"no MeViS split at {Path(args.root) / args.split}: for the toy set run "
                 "`python data/toy.py --out data/toy` first, or pass --root to a MeViS copy (see data/README.md)")

    torch.set_num_threads(1)  # DataLoader workers run one torch thread each; the main process does the same here
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped-expression warning is not what is measured here
        dataset = MeViS(args.root, args.split, train=True, num_frames=args.num_frames, short_side=args.short_side,
                        max_size=args.max_size)
    init_s = time.perf_counter() - start
    torch.manual_seed(0)
    item = dataset[0]
    print(f"MeViS {args.root}/{args.split}: {len(dataset)} expressions, init {init_s:.2f} s, "
          f"clip {tuple(item['frames'].shape)} from frames of {item['orig_size']}")
    main_rate = clips_per_second(dataset, workers=0, clips=args.clips, batch_size=args.batch_size)
    worker_rate = clips_per_second(dataset, workers=args.workers, clips=args.clips, batch_size=args.batch_size)
    print(f"T={args.num_frames}, batch {args.batch_size}, one torch thread per process")
    print(f"  main process only : {main_rate:7.1f} clips/s")
    print(f"  {args.workers} DataLoader workers: {worker_rate:7.1f} clips/s  ({worker_rate / main_rate:.2f}x)")


if __name__ == "__main__":
    main()
