"""Evaluation metrics, equal to the official evaluation code of each benchmark.

Video (MeViS, Ref-YouTube-VOS, Ref-DAVIS17): region similarity J and boundary F-measure F per
frame as davis2017-evaluation (davisvideochallenge/davis2017-evaluation, davis2017/metrics.py:
`db_eval_iou`, `db_eval_boundary`, `f_measure`, `_seg2bmap`; MeViS tools/ carries a copy), averaged
as MeViS tools/eval_mevis.py: the mean over all frames of an expression, then the mean over
expressions, J&F = (J + F) / 2.

Images (RefCOCO/+/g): IoU per sample, mIoU, oIoU and Pr@X as LAVT test.py (yz93/LAVT-RIS,
`evaluate` and `computeIoU`); Oc-IoU as the VATEX paper, Sec. 4.3, Eqs. (9)-(10).

J and F come twice: `reference_jaccard` / `reference_boundary_f` are the davis2017 algorithm
written plainly, one numpy frame at a time (copy these to understand or port the metric), and
`jaccard` / `boundary_f` compute the same numbers batched over frames on any torch device, tens
of times faster (copy these to evaluate). tests/test_metrics.py checks that they agree.

All values are fractions in [0, 1] (the official scripts print them x100). Masks are boolean, or
any dtype where nonzero is foreground (MeViS reads 0/255 PNGs); torch tensors or numpy arrays. The
video functions run batched over frames on the masks' device, without OpenCV: the disk dilation of
`f_measure` is rebuilt from shifted ORs and gives the same pixels as `cv2.dilate`.

    j = jaccard(pred, gt)            # (T,) float64, pred and gt (T, H, W)
    f = boundary_f(pred, gt)         # (T,) float64
    video = VideoMetrics(); video.add(pred, gt, key="vid_exp");
    video.summary()  # {"J", "F", "J&F", "n"}
    image = ImageMetrics(); image.add(pred, gt); image.summary()  # {"mIoU", "oIoU", "Pr@0.5", ...}
    oc_iou([(gt, preds), ...])       # float, preds (K, H, W) for the K expressions of one object
    davis_unsupervised(gt_labels,
                       pred_labels)  # Ref-DAVIS17: J and F of each GT object, Hungarian-matched
"""
import math

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Shapes: T frames (t in a chunk), H W mask size (h w of a window), N image samples, K expressions
# of one object, r the disk radius of the boundary F-measure in pixels.

PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # LAVT test.py eval_seg_iou_list

# Frames processed together. On the CPU about two million pixels keep the boundary and dilation
# buffers of a chunk in cache, which is several times faster than whole videos (ours, measured with
# tests/bench/bench_metrics.py); accelerators take much larger chunks.
CPU_CHUNK_PIXELS = 2**21
DEVICE_CHUNK_PIXELS = 2**26


def _as_masks(masks) -> Tensor:
    masks = torch.as_tensor(masks)
    return masks if masks.dtype == torch.bool else masks != 0


def _mask_pair(pred, gt, ndims: tuple, expected: str) -> tuple:
    pred, gt = _as_masks(pred), _as_masks(gt)
    if pred.ndim not in ndims or pred.shape != gt.shape:
        raise ValueError(f"expected pred and gt of the same shape {expected}, got pred "
                         f"{tuple(pred.shape)} "
                         f"and gt {tuple(gt.shape)}")
    if pred.device != gt.device:
        raise ValueError(f"pred is on {pred.device} but gt is on {gt.device}; put both on one "
                         f"device")
    return pred, gt


def _count(masks: Tensor) -> Tensor:
    # Row sums in int16 first: several times faster on the CPU than widening every pixel to int32.
    rows = masks.sum(-1, dtype=torch.int16 if masks.shape[-1] < 2**15 else torch.int32)  # (T, ...)
    return rows.flatten(1).sum(1, dtype=torch.int32)  # (T,) foreground pixels per frame


def _frame_chunks(masks: Tensor) -> list:
    n_frames, height, width = masks.shape
    budget = CPU_CHUNK_PIXELS if masks.device.type == "cpu" else DEVICE_CHUNK_PIXELS
    step = max(1, budget // max(1, height * width))
    return [slice(start, start + step) for start in range(0, n_frames, step)]


# ------------------------------------------------------------------------- J: region similarity
def jaccard(pred, gt) -> Tensor:
    """Region similarity J per frame, davis2017-evaluation `db_eval_iou` (no void pixels).

    J = |P ∩ G| / |P ∪ G|, and 1 on a frame where both masks are empty.
    pred, gt: (T, H, W) masks on one device. Returns (T,) float64 on that device.
    """
    pred, gt = _mask_pair(pred, gt, (3,), "(T, H, W)")
    j = torch.empty(pred.shape[0], dtype=torch.float64, device=pred.device)  # (T,)
    for frames in _frame_chunks(pred):
        inter = _count(pred[frames] & gt[frames]).double()  # (t,)
        union = _count(pred[frames] | gt[frames]).double()  # (t,)
        j[frames] = torch.where(union > 0, inter / union, 1.0)
    return j


# --------------------------------------------------------------- F: boundary F-measure (DAVIS)
def _disk_radius(height: int, width: int, bound_th: float) -> int:
    # f_measure: bound_pix = bound_th if bound_th >= 1 else
    # np.ceil(bound_th * np.linalg.norm(shape));
    # np.linalg.norm of the shape is the correctly rounded sqrt(H^2 + W^2), as math.sqrt.
    if bound_th < 0:
        raise ValueError(f"bound_th must be >= 0, got {bound_th}")
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(f"bound_th >= 1 is a disk radius in pixels and must be an integer, "
                             f"got {bound_th}")
        return int(bound_th)
    return math.ceil(bound_th * math.sqrt(height * height + width * width))


def _boundary_maps(masks: Tensor, radius: int) -> Tensor:
    """`_seg2bmap` of every frame, inside a zero margin of `radius` pixels that lets `_dilate_disk`
    shift the maps without bounds checks.

    A pixel is on the boundary when it differs from its E, S or SE neighbour. As in `_seg2bmap`,
    a pixel of the last row compares with its E neighbour only, one of the last column with its S
    neighbour only, and the bottom-right pixel is never on the boundary.
    masks: (T, H, W) bool. Returns (T, H + 2r, W + 2r) bool, pixel (y, x) at (y + r, x + r).
    """
    n_frames, height, width = masks.shape
    r = radius
    padded = masks.new_zeros((n_frames, height + 2 * r, width + 2 * r))  # (T, H + 2r, W + 2r)
    bmap = padded[:, r:r + height, r:r + width]  # (T, H, W) view
    torch.bitwise_xor(masks[:, :, :-1], masks[:, :, 1:], out=bmap[:, :, :-1])  # E
    bmap[:, :-1] |= masks[:, :-1] ^ masks[:, 1:]  # S
    bmap[:, :-1, :-1] |= masks[:, :-1, :-1] ^ masks[:, 1:, 1:]  # SE
    return padded


def _dilate_disk(padded: Tensor, radius: int) -> Tensor:
    """Binary dilation by skimage's disk(radius) = {(dx, dy): dx^2 + dy^2 <= r^2}: the pixels that
    `f_measure` gets from cv2.dilate, where outside the frame counts as background.

    A disk is a stack of horizontal runs, its row dy spanning |dx| <= isqrt(r^2 - dy^2). So the
    dilation is the OR over dy of the maps dilated by that row's run and shifted by dy rows. A run
    of L pixels is the OR of two overlapping runs of n pixels, n the largest power of two <= L, and
    runs of 2n pixels are one OR of two runs of n (the doubling of a sparse table): about
    log2(r) + r + 2r
    ORs of whole maps instead of the (2r + 1)^2 products of a convolution with the disk.
    padded: (T, H + 2r, W + 2r) from `_boundary_maps`. Returns (T, H, W) bool.
    """
    n_frames, padded_h, padded_w = padded.shape
    r, height, width = radius, padded_h - 2 * radius, padded_w - 2 * radius
    runs = {1: padded}  # runs[n][..., c] = OR of padded[..., c : c + n]
    n = 1
    while 2 * n <= 2 * r + 1:
        runs[2 * n] = runs[n][:, :, :-n] | runs[n][:, :, n:]  # (T, H + 2r, W + 2r + 1 - 2n)
        n *= 2
    half_widths = {dy: math.isqrt(r * r - dy * dy) for dy in range(-r, r + 1)}
    dilated = padded.new_zeros((n_frames, height, width))  # (T, H, W)
    for w in sorted(set(half_widths.values())):
        n = 1 << ((2 * w + 1).bit_length() - 1)
        # runs[n] at these columns start at x - w and end at x + w
        first, last = r - w, r + w + 1 - n
        # (T, H + 2r, W)
        row_runs = runs[n][:, :, first:first + width] | runs[n][:, :, last:last + width]
        for dy in (dy for dy, half_width in half_widths.items() if half_width == w):
            dilated |= row_runs[:, r + dy:r + dy + height]
    return dilated


def _boundary_window(foreground: Tensor) -> tuple:
    """The rows and columns of frames (T, H, W) that hold every `_seg2bmap` boundary pixel: the
    foreground's bounding box grown by one pixel. The maps of this window equal the frame's maps
    inside it (its last row and column are background or the frame's own last ones)."""
    union = foreground.view(torch.uint8).amax(0)  # (H, W); amax is much faster than any on the CPU
    rows = union.amax(1).nonzero()[:, 0]  # (n,)
    cols = union.amax(0).nonzero()[:, 0]  # (m,)
    if len(rows) == 0:
        return slice(0, 1), slice(0, 1)
    top, bottom, left, right = rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()
    return slice(max(top - 1, 0), bottom + 2), slice(max(left - 1, 0), right + 2)


def boundary_f(pred, gt, *, bound_th: float = 0.008) -> Tensor:
    """Boundary F-measure F per frame, davis2017-evaluation `db_eval_boundary` / `f_measure`.

    Boundary maps as `_seg2bmap`; a boundary pixel of one mask is matched when the other mask's
    boundary lies within a disk of radius ceil(bound_th * sqrt(H^2 + W^2)) pixels (bound_th >= 1 is
    the radius itself). Precision = matched predicted / predicted boundary pixels, recall = matched
    GT / GT boundary pixels, F = 2PR / (P + R), and 0 when P + R = 0. Frames with no boundary in
    either mask score 1, frames with a boundary in only one of them score 0.
    pred, gt: (T, H, W) masks on one device. Returns (T,) float64 on that device.
    """
    pred, gt = _mask_pair(pred, gt, (3,), "(T, H, W)")
    n_frames, height, width = pred.shape
    r = _disk_radius(height, width, bound_th)  # from the whole frame, also when working on a window
    f = torch.empty(n_frames, dtype=torch.float64, device=pred.device)  # (T,)
    for frames in _frame_chunks(pred):
        rows, cols = _boundary_window(pred[frames] | gt[frames])
        pred_bmap = _boundary_maps(pred[frames, rows, cols], r)  # (t, h + 2r, w + 2r)
        gt_bmap = _boundary_maps(gt[frames, rows, cols], r)  # (t, h + 2r, w + 2r)
        inner = (slice(None), slice(r, pred_bmap.shape[1] - r), slice(r, pred_bmap.shape[2] - r))
        n_pred, n_gt = _count(pred_bmap).double(), _count(gt_bmap).double()  # (t,)
        pred_match = _count(pred_bmap[inner] & _dilate_disk(gt_bmap, r)).double()  # (t,)
        gt_match = _count(gt_bmap[inner] & _dilate_disk(pred_bmap, r)).double()  # (t,)
        # f_measure's cases: no predicted boundary gives precision 1, no GT boundary recall 1. Where
        # only one side has a boundary, the other side's match count is 0, which gives its
        # precision 0 (only pred) or recall 0 (only GT) as f_measure sets them.
        precision = torch.where(n_pred > 0, pred_match / n_pred, 1.0)
        recall = torch.where(n_gt > 0, gt_match / n_gt, 1.0)
        f[frames] = torch.where(precision + recall > 0,
                                2 * precision * recall / (precision + recall), 0.0)
    return f


# ---------------------------------------------------------
# readable reference (davis2017-evaluation)
def reference_jaccard(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """`db_eval_iou`: J = |P ∩ G| / |P ∪ G| per frame, 1 where both are empty.
    (T, H, W) -> (T,)."""
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
    inter = (pred & gt).sum(axis=(-2, -1))  # (T,)
    union = (pred | gt).sum(axis=(-2, -1))  # (T,)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def reference_boundary_map(mask: np.ndarray) -> np.ndarray:
    """`_seg2bmap`: a pixel is on the boundary when it differs from its E, S or SE neighbour
    (the last row compares with E only, the last column with S only). (H, W) -> (H, W) bool."""
    mask = np.asarray(mask) != 0
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = mask ^ east | mask ^ south | mask ^ south_east
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def reference_boundary_f(pred: np.ndarray, gt: np.ndarray, *,
                         bound_th: float = 0.008) -> np.ndarray:
    """`db_eval_boundary` / `f_measure` frame by frame: boundary pixels of one mask count as
    matched when the other's boundary lies within a disk of radius ceil(bound_th * diagonal).
    The official code dilates with cv2.dilate and skimage's disk; scipy's binary_dilation with the
    same disk gives the same pixels. (T, H, W) -> (T,)."""
    scores = []
    for fg, gt_frame in zip(np.asarray(pred) != 0, np.asarray(gt) != 0):
        radius = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(fg.shape))
        offsets = np.arange(-radius, radius + 1)
        disk = offsets[None, :] ** 2 + offsets[:, None] ** 2 <= radius**2  # skimage.morphology.disk
        fg_boundary, gt_boundary = reference_boundary_map(fg), reference_boundary_map(gt_frame)
        n_fg, n_gt = fg_boundary.sum(), gt_boundary.sum()
        if n_fg == 0 or n_gt == 0:  # precision, recall = (1, 0), (0, 1) or (1, 1)
            scores.append(1.0 if n_fg == n_gt else 0.0)
            continue
        precision = (fg_boundary & ndimage.binary_dilation(gt_boundary, structure=disk)).sum() \
            / n_fg
        recall = (gt_boundary & ndimage.binary_dilation(fg_boundary, structure=disk)).sum() / n_gt
        scores.append(0.0 if precision + recall == 0
                      else 2 * precision * recall / (precision + recall))
    return np.array(scores, dtype=np.float64)


# -------------------------------------------------------------------------------- accumulators
class _Records:
    """Per-item records (plain dicts with a "key") that can be gathered from several processes.

    `records` can be pickled or dumped as JSON, for example gathered with
    torch.distributed.all_gather_object, and passed to `extend` of one accumulator. A key seen
    before is skipped when its record is equal (DistributedSampler pads its shards with repeated
    samples) and is an error otherwise; records with key None are always kept.
    """

    def __init__(self):
        self.records = []
        self._by_key = {}

    def extend(self, records) -> None:
        for record in records:
            key = record["key"]
            if key is not None and key in self._by_key:
                if self._by_key[key] != record:
                    raise ValueError(f"two different results for key {key!r}: {self._by_key[key]} "
                                     f"and {record}")
                continue
            if key is not None:
                self._by_key[key] = record
            self.records.append(record)


class VideoMetrics(_Records):
    """J, F and J&F of a set of expressions, averaged as MeViS tools/eval_mevis.py.

    Each expression's J and F are the means over all its frames; the summary takes the mean over
    expressions (not over all frames pooled) and J&F = (J + F) / 2.
    """

    def __init__(self, *, bound_th: float = 0.008):
        super().__init__()
        self.bound_th = bound_th

    def add(self, pred, gt, key=None) -> dict:
        """Score one expression: pred and gt (T, H, W) masks of all its frames, on one device.

        Returns its record {"key", "n_frames", "J", "F", "J&F", "J_per_frame", "F_per_frame"}.
        """
        j = jaccard(pred, gt).tolist()
        f = boundary_f(pred, gt, bound_th=self.bound_th).tolist()
        if not j:
            raise ValueError(f"expression {key!r} has no frames: got masks of shape "
                             f"{tuple(_as_masks(pred).shape)}")
        j_mean, f_mean = float(np.mean(j)), float(np.mean(f))
        record = {"key": key, "n_frames": len(j), "J": j_mean, "F": f_mean,
                  "J&F": (j_mean + f_mean) / 2,
                  "J_per_frame": j, "F_per_frame": f}
        self.extend([record])
        return record

    def summary(self) -> dict:
        """{"J", "F", "J&F", "n"}: means over the n expressions added (NaN when n = 0)."""
        if not self.records:
            return {"J": math.nan, "F": math.nan, "J&F": math.nan, "n": 0}
        j = float(np.mean([record["J"] for record in self.records]))
        f = float(np.mean([record["F"] for record in self.records]))
        return {"J": j, "F": f, "J&F": (j + f) / 2, "n": len(self.records)}


class ImageMetrics(_Records):
    """mIoU, oIoU and Pr@X of referring image segmentation, as LAVT test.py `evaluate`.

    IoU of a sample = I / U, and 0 when U = 0 (both masks empty). mIoU = mean IoU,
    oIoU = sum of I / sum of U (NaN when the sum of U is 0), Pr@X = share of samples with IoU >= X.
    strict_pr=True counts IoU > X instead, as VATEX's own evaluator. Samples may differ in size.
    """

    def __init__(self, *, strict_pr: bool = False):
        super().__init__()
        self.strict_pr = strict_pr

    def add(self, pred, gt, key=None) -> Tensor:
        """Score one sample, pred and gt (H, W) with an optional key, or a batch, (N, H, W) with
        None or a sequence of N keys. Returns the IoU of each sample, (N,) float64 on their device.
        """
        pred, gt = _mask_pair(pred, gt, (2, 3), "(H, W) or (N, H, W)")
        if pred.ndim == 2:
            pred, gt, keys = pred[None], gt[None], [key]  # (1, H, W)
        else:
            keys = [None] * pred.shape[0] if key is None else [key] if isinstance(key, str) \
                else list(key)
        if len(keys) != pred.shape[0]:
            raise ValueError(f"a batch of {pred.shape[0]} masks needs None or {pred.shape[0]} "
                             f"keys, got {key!r}")
        inter, union = _count(pred & gt), _count(pred | gt)  # (N,)
        iou = torch.where(union > 0, inter.double() / union, 0.0)  # (N,)
        self.extend({"key": k, "I": i, "U": u, "IoU": v}
                    for k, i, u, v in zip(keys, inter.tolist(), union.tolist(), iou.tolist()))
        return iou

    def summary(self) -> dict:
        """{"mIoU", "oIoU", "Pr@0.5", ..., "Pr@0.9", "cum_I", "cum_U", "n"} over the n samples
        added."""
        n = len(self.records)
        ious = [record["IoU"] for record in self.records]
        cum_i = sum(record["I"] for record in self.records)
        cum_u = sum(record["U"] for record in self.records)
        out = {"mIoU": float(np.mean(ious)) if n else math.nan,
               "oIoU": cum_i / cum_u if cum_u else math.nan}
        for x in PR_THRESHOLDS:
            hits = sum(iou > x if self.strict_pr else iou >= x for iou in ious)
            out[f"Pr@{x}"] = hits / n if n else math.nan
        return {**out, "cum_I": cum_i, "cum_U": cum_u, "n": n}


# ------------------------------------------------------------------ Oc-IoU (VATEX Sec. 4.3)
def oc_iou(groups) -> float:
    """Object-centric IoU, VATEX paper Sec. 4.3, Eqs. (9)-(10) (the official VATEX code has none).

    groups: one (gt, preds) pair per object i: its ground truth GT_i (H, W) and the predictions
    P_i^1 .. P_i^K (K, H, W) for its K >= 1 expressions. An object scores
    |GT_i ∩ P_i^1 ∩ ... ∩ P_i^K| / |GT_i ∪ P_i^1 ∪ ... ∪ P_i^K|,
    and 0 when that union is empty
    (as LAVT's IoU; the paper does not say). Returns the mean over objects, NaN when there are none.
    """
    scores = []
    for i, (gt, preds) in enumerate(groups):
        gt = _as_masks(gt)
        preds = _as_masks(preds).to(gt.device)
        if gt.ndim != 2 or preds.ndim != 3 or preds.shape[0] == 0 or preds.shape[1:] != gt.shape:
            raise ValueError(f"object {i}: expected gt (H, W) and preds (K, H, W) with K >= 1, got "
                             f"gt "
                             f"{tuple(gt.shape)} and preds {tuple(preds.shape)}")
        inter = (gt & preds.all(0)).sum().item()  # Eq. (9) numerator
        union = (gt | preds.any(0)).sum().item()  # Eq. (9) denominator
        scores.append(inter / union if union else 0.0)
    return float(np.mean(scores)) if scores else math.nan  # Eq. (10)


# ----------------------------------------------------- DAVIS-2017 unsupervised task (Ref-DAVIS17)
DAVIS_VOID = 255  # davis2017-evaluation DAVIS.VOID_LABEL
DAVIS_MAX_PROPOSALS = 20  # davis2017-evaluation _evaluate_unsupervised max_n_proposals


def davis_unsupervised(gt_labels, pred_labels) -> tuple:
    """One sequence scored as davis2017-evaluation's unsupervised task (evaluation.py
    `_evaluate_unsupervised`, the default of ReferFormer's eval_davis.py for Ref-DAVIS17).

    gt_labels: (T, H, W) integer palette values of the ground truth, objects 1..G (G = the largest
    value in the first frame, as davis.py `get_all_masks`), 255 = void (excluded from J and F).
    pred_labels: (T, H, W) integer palette values of the prediction, proposals 1..P (P = the
    largest value anywhere, as results.py `read_masks`), at most 20. Every pair (proposal, GT
    object) is scored by its mean J and mean F over the frames; the proposals (padded with empty
    ones to G) are assigned to the GT objects by the Hungarian algorithm on (J + F) / 2.
    Returns J (G, T) and F (G, T), float64 numpy: the per-frame scores of the assigned pairs.
    """
    gt, pred = torch.as_tensor(np.asarray(gt_labels)), torch.as_tensor(np.asarray(pred_labels))
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"expected gt and prediction labels of one shape (T, H, W), got "
                         f"{tuple(gt.shape)} and "
                         f"{tuple(pred.shape)}")
    void = gt == DAVIS_VOID  # (T, H, W)
    num_gt, num_pred = int(gt[0].masked_fill(void[0], 0).max()), int(pred.max())
    if num_pred > DAVIS_MAX_PROPOSALS:
        raise ValueError(f"{num_pred} proposals: the DAVIS unsupervised task allows at most "
                         f"{DAVIS_MAX_PROPOSALS}")
    num_pred = max(num_pred, num_gt)  # the official code pads with empty proposals
    j = np.zeros((num_pred, num_gt, len(gt)))  # (P, G, T)
    f = np.zeros((num_pred, num_gt, len(gt)))
    for g in range(num_gt):
        target = gt == g + 1  # (T, H, W); void pixels belong to no object
        for p in range(num_pred):
            proposal = (pred == p + 1) & ~void  # void pixels are removed from the prediction
            j[p, g], f[p, g] = jaccard(proposal, target).numpy(), \
                boundary_f(proposal, target).numpy()
    rows, cols = linear_sum_assignment(-(j.mean(2) + f.mean(2)) / 2)
    return j[rows, cols], f[rows, cols]

