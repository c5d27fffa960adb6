"""Time per frame of J + F: common.metrics (fast, batched) against the official davis2017-evaluation
code, measured side by side in one run, on two inputs at DAVIS / MeViS resolution (default 60
frames of 480x854):

  noise  random-noise masks over the whole frame (every other pixel is a boundary pixel: the
         worst case for the boundary F-measure, and for common.metrics, which works on the box
         that holds the boundaries);
  blobs  two moving blobs with wavy outlines, and a prediction that follows them with a slightly
         different outline, a small offset, a missed object now and then and a false positive.

The official side, in order of preference:
  1. the real `davis2017.metrics` (db_eval_iou, db_eval_boundary), from an installed package or a
     checkout passed with --davis-repo (github.com/davisvideochallenge/davis2017-evaluation);
     it needs OpenCV and scikit-image (pip install opencv-python-headless scikit-image; neither is
     a dependency of this repository);
  2. without the package but with OpenCV and scikit-image: the same algorithm with the same
     library calls (cv2.dilate with skimage's disk), written out below;
  3. without OpenCV: only the readable reference of common.metrics (scipy's binary_dilation,
     much slower than cv2.dilate, so its ratio overstates the gain over the official code).
The bench prints which one it used. Every timed version must give the same values.

Run from the repository root:
    python tests/bench/bench_metrics.py --davis-repo ../davis2017-evaluation
    python tests/bench/bench_metrics.py --threads 2 --repeats 5
Prints the best time per frame over the repeats (the machine may be busy; the best run is the
least disturbed one), and the ratios; the same for CUDA when it is available.
"""
import argparse
import importlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common.metrics import boundary_f, jaccard, reference_boundary_f, reference_jaccard  # noqa: E402

# Shapes: T frames, H W frame size.


# ------------------------------------------------------------------------------------ the inputs
def _blob(height, width, cy, cx, radius, harmonics):
    """A filled star-shaped blob: radius(theta) = radius * (1 + sum a cos(k theta + phase))."""
    yy, xx = np.mgrid[:height, :width]  # (H, W) each
    theta = np.arctan2(yy - cy, xx - cx)  # (H, W)
    wave = sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics)  # (H, W)
    return np.hypot(yy - cy, xx - cx) <= radius * (1 + wave)  # (H, W)


def blob_video(n_frames=60, height=480, width=854, seed=0):
    """Ground truth and prediction (T, H, W) bool: moving blobs."""
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
    return pred, gt


def noise_video(n_frames=60, height=480, width=854, seed=0):
    """Ground truth and prediction (T, H, W) bool: independent random noise, half the pixels set."""
    rng = np.random.default_rng(seed)
    return rng.random((n_frames, height, width)) < 0.5, rng.random((n_frames, height, width)) < 0.5


# ------------------------------------------------------------------------ the official code
def official_metrics(davis_repo):
    """(name, jf function) of the best available official version (see the module docstring)."""
    if davis_repo:
        sys.path.insert(0, str(Path(davis_repo).resolve()))
    try:
        official = importlib.import_module("davis2017.metrics")
        return ("davis2017-evaluation's own davis2017.metrics (OpenCV + scikit-image)",
                lambda pred, gt: (official.db_eval_iou(gt, pred), official.db_eval_boundary(gt, pred)))
    except ImportError as error:
        missing = str(error)
    try:
        import cv2
        from skimage.morphology import disk
    except ImportError:
        return None, f"no official code ({missing}) and no OpenCV / scikit-image"

    def f_measure(fg, gt, bound_th=0.008):  # davis2017/metrics.py f_measure, without void pixels
        bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
        fg_boundary, gt_boundary = _seg2bmap(fg), _seg2bmap(gt)
        fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), disk(bound_pix).astype(np.uint8))
        gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), disk(bound_pix).astype(np.uint8))
        n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
        if n_fg == 0 or n_gt == 0:
            return 1.0 if n_fg == n_gt else 0.0
        precision, recall = np.sum(fg_boundary * gt_dil) / float(n_fg), np.sum(gt_boundary * fg_dil) / float(n_gt)
        return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)

    def jf(pred, gt):
        return reference_jaccard(pred, gt), np.array([f_measure(p, g) for p, g in zip(pred, gt)])

    return f"the davis2017 algorithm written out here with OpenCV + scikit-image ({missing})", jf


def _seg2bmap(seg):
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :], b[:, -1] = seg[-1, :] ^ e[-1, :], seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--davis-repo", default="", help="a davis2017-evaluation checkout (holds davis2017/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    official_name, official = official_metrics(args.davis_repo)
    print(f"official side: {official_name if official else 'none: ' + official_name}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; best of {args.repeats} repeats")
    for name, make in (("noise", noise_video), ("blobs", blob_video)):
        pred_np, gt_np = make(args.frames)
        n_frames, height, width = gt_np.shape
        print(f"{name}: {n_frames} frames of {height}x{width}")
        j_ref, f_ref = reference_jaccard(pred_np, gt_np), reference_boundary_f(pred_np, gt_np)
        timed = {"common.metrics readable reference (scipy)":
                 best_time(lambda: (reference_jaccard(pred_np, gt_np), reference_boundary_f(pred_np, gt_np)),
                           max(1, args.repeats // 2))}
        if official is not None:
            j_off, f_off = official(pred_np, gt_np)
            diff = max(np.abs(j_off - j_ref).max(), np.abs(f_off - f_ref).max())
            if diff > 1e-12:
                raise SystemExit(f"the official code and the readable reference differ by {diff}")
            timed["official"] = best_time(lambda: official(pred_np, gt_np), max(1, args.repeats // 2))
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            pred, gt = torch.from_numpy(pred_np).to(device), torch.from_numpy(gt_np).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            j, f = jaccard(pred, gt), boundary_f(pred, gt)  # also the warm-up
            diff = max(np.abs(j.cpu().numpy() - j_ref).max(), np.abs(f.cpu().numpy() - f_ref).max())
            if diff > 1e-12:
                raise SystemExit(f"common.metrics on {device} differs from the readable reference by {diff}")
            timed[f"common.metrics on {device}"] = best_time(lambda: (jaccard(pred, gt), boundary_f(pred, gt)),
                                                            args.repeats, sync)
        fast = timed["common.metrics on cpu"]
        for label, seconds in timed.items():
            print(f"  {label:44s} {seconds / n_frames * 1e3:9.3f} ms/frame   {seconds / fast:7.2f}x the fast "
                  f"version's time")
        print(f"  mean J {j_ref.mean():.4f}, mean F {f_ref.mean():.4f} (all versions equal to 1e-12)")


if __name__ == "__main__":
    main()
