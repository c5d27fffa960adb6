"""Time per frame of J + F from common/metrics.py against a numpy port of the official loop.

The video has DAVIS / MeViS resolution (default 60 frames of 480x854): two moving blobs with
wavy outlines, and a prediction that follows them with a slightly different outline, a small
offset, a missed object now and then and a false positive. common.metrics works on the bounding
box of the masks' boundaries, so the same video is also timed with small blobs added in the four
corners, where that box is the whole frame (the slowest case). The reference is our straight numpy
port of davis2017-evaluation (`db_eval_iou` over the video, then `f_measure` frame by frame),
with scipy.ndimage.binary_dilation and a skimage-style disk where the original calls cv2.dilate.
Both run in this process, one after the other, and must give the same values. scipy's
binary_dilation with a 17x17 disk is far slower than cv2.dilate, so the ratio overstates the gain
over the original code (about 6 ms per 480x854 frame with OpenCV, which this repository does not use).

Run from the repository root:
    python tests/bench/bench_metrics.py                 # torch's default thread count
    python tests/bench/bench_metrics.py --threads 2 --repeats 9
Prints the best time per frame over the repeats (the machine may be busy; the best run is the
least disturbed one), the ratio, and the same for CUDA when it is available.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common.metrics import boundary_f, jaccard  # noqa: E402

# Shapes: T frames, H W frame size.


# ------------------------------------------------------------------------------------ the video
def _blob(height, width, cy, cx, radius, harmonics):
    """A filled star-shaped blob: radius(theta) = radius * (1 + sum a cos(k theta + phase))."""
    yy, xx = np.mgrid[:height, :width]  # (H, W) each
    theta = np.arctan2(yy - cy, xx - cx)  # (H, W)
    wave = sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics)  # (H, W)
    return np.hypot(yy - cy, xx - cx) <= radius * (1 + wave)  # (H, W)


def make_video(n_frames=60, height=480, width=854, seed=0, corners=False):
    """Ground truth and prediction (T, H, W) bool; corners=True adds a small blob in each corner."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n_frames, height, width), dtype=bool)  # (T, H, W)
    pred = np.zeros((n_frames, height, width), dtype=bool)  # (T, H, W)
    objects = [dict(start=(200, 250), velocity=(0.8, 4.0), radius=90),
               dict(start=(300, 650), velocity=(-1.5, -2.5), radius=60)]
    for obj in objects:
        shape = [(k, rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)]
        for t in range(n_frames):
            cy, cx = obj["start"][0] + obj["velocity"][0] * t, obj["start"][1] + obj["velocity"][1] * t
            gt[t] |= _blob(height, width, cy, cx, obj["radius"], shape)
            if rng.random() < 0.05:  # the prediction misses the object in this frame
                continue
            jitter = [(k, a + rng.normal(0, 0.01), phase + rng.normal(0, 0.2)) for k, a, phase in shape]
            jitter.append((7, rng.uniform(0, 0.02), rng.uniform(0, 2 * math.pi)))
            dy, dx = rng.normal(0, 2, size=2)
            pred[t] |= _blob(height, width, cy + dy, cx + dx, obj["radius"] * rng.uniform(0.95, 1.05), jitter)
    for t in range(0, n_frames, 10):  # an occasional false positive
        pred[t] |= _blob(height, width, 60, 80 + 10 * t, 20, [])
    if corners:
        for cy, cx in ((10, 10), (10, width - 11), (height - 11, 10), (height - 11, width - 11)):
            gt |= _blob(height, width, cy, cx, 6, [])
            pred |= _blob(height, width, cy + 1, cx, 6, [])
    return pred, gt


# ------------------------------------------------- numpy port of davis2017-evaluation metrics.py
def _disk(radius):
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return x**2 + y**2 <= radius**2


def _seg2bmap(seg):
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def _f_measure(fg, gt, bound_th=0.008):
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fg_boundary, gt_boundary = _seg2bmap(fg), _seg2bmap(gt)
    fg_dil = ndimage.binary_dilation(fg_boundary, structure=_disk(bound_pix))
    gt_dil = ndimage.binary_dilation(gt_boundary, structure=_disk(bound_pix))
    n_fg, n_gt = fg_boundary.sum(), gt_boundary.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision = np.sum(fg_boundary & gt_dil) / float(n_fg)
        recall = np.sum(gt_boundary & fg_dil) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def reference_jf(pred, gt):
    inter = np.sum(pred & gt, axis=(-2, -1))
    union = np.sum(pred | gt, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    f = np.array([_f_measure(pred[t], gt[t]) for t in range(len(pred))])
    return j, f


# ------------------------------------------------------------------------------------- timing
def best_time(fn, repeats, sync=lambda: None):
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for corners in (False, True):
        pred_np, gt_np = make_video(args.frames, corners=corners)
        n_frames, height, width = gt_np.shape
        radius = math.ceil(0.008 * math.hypot(height, width))
        print(f"video {n_frames}x{height}x{width}{' with blobs in the corners' if corners else ''}, disk radius "
              f"{radius}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; best of the repeats")
        j_ref, f_ref = reference_jf(pred_np, gt_np)
        ref_s = best_time(lambda: reference_jf(pred_np, gt_np), max(1, args.repeats // 3))
        print(f"  numpy/scipy port (per-frame loop): {ref_s / n_frames * 1e3:8.3f} ms/frame   "
              f"mean J {j_ref.mean():.4f}  F {f_ref.mean():.4f}")
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            pred, gt = torch.from_numpy(pred_np).to(device), torch.from_numpy(gt_np).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            j, f = jaccard(pred, gt), boundary_f(pred, gt)  # also the warm-up
            diff = max(np.abs(j.cpu().numpy() - j_ref).max(), np.abs(f.cpu().numpy() - f_ref).max())
            ours_s = best_time(lambda: (jaccard(pred, gt), boundary_f(pred, gt)), args.repeats, sync)
            print(f"  common.metrics on {device:4s} (batched):  {ours_s / n_frames * 1e3:8.3f} ms/frame   "
                  f"port/ours {ref_s / ours_s:6.1f}x   max |diff| {diff:.1e}")
            if diff > 1e-12:
                raise SystemExit(f"common.metrics differs from the numpy port on {device} by {diff}")


if __name__ == "__main__":
    main()
