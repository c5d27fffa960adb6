"""Where a toy training step of DsHmp spends its time: wall-clock timers around the model's
forward pass, the losses (and the Hungarian matcher inside them) and the backward pass, over one
short `python dshmp.py --data toy --train` run (no profiler: its overhead inflates small operations).

Run from the repository root, alone on the machine (about 2 minutes, the evaluation included):
    python tests/bench/toy_step_times.py --steps 40
"""
import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common.matching  # noqa: E402
import dshmp  # noqa: E402

SECONDS = collections.Counter()


def timed(function, name):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        SECONDS[name] += time.perf_counter() - start
        return result
    return wrapper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    common.matching.hungarian_match = timed(common.matching.hungarian_match, "hungarian_match")
    dshmp.compute_losses = timed(dshmp.compute_losses, "losses (matching included)")
    dshmp.DsHmp.forward = timed(dshmp.DsHmp.forward, "forward")
    torch.Tensor.backward = timed(torch.Tensor.backward, "backward")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        dshmp.main(["--data", "toy", "--train", "--steps", str(args.steps), "--out", out])
        last = json.loads((Path(out) / "log.jsonl").read_text().splitlines()[-1])  # the last logged step
    print(f"{args.steps} steps, {torch.get_num_threads()} threads; whole command {time.perf_counter() - start:.1f} s "
          f"(the evaluation included); s/it at step {last['step']} {last['s/it']:.2f}")
    for name, total in SECONDS.most_common():
        print(f"{name:28s} {total:7.2f} s  {total / args.steps:.3f} s/step")


if __name__ == "__main__":
    main()
