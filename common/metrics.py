"""Evaluation metrics, equal to the official evaluation code of each benchmark.

Video (MeViS, Ref-YouTube-VOS, Ref-DAVIS17): region similarity J and boundary F-measure F per
frame as davis2017-evaluation (davisvideochallenge/davis2017-evaluation, davis2017/metrics.py:
`db_eval_iou`, `db_eval_boundary`, `f_measure`, `_seg2bmap`; MeViS tools/ carries a copy), averaged
as MeViS tools/eval_mevis.py: the mean over all frames of an expression, then the mean over
expressions, J&F = (J + F) / 2.

Images (RefCOCO/+/g): IoU per sample, mIoU, oIoU and Pr@X as LAVT test.py (yz93/LAVT-RIS,
`evaluate` and `computeIoU`); Oc-IoU as the VATEX paper, Sec. 4.3, Eqs. (9)-(10). Ref-ZOM: the
same at 480 x 480 over the sentences with a target, and the accuracy on those without, as
RIS-DMMI test.py (`RefZOMMetrics`).

A2D-Sentences and JHMDB-Sentences: mAP@0.5:0.95 (and AP@0.5, AP@0.75, AP S/M/L) equal to
pycocotools' COCOeval(iouType="segm") as the ReferFormer / MTTR protocol runs it, and its overall
IoU, mean IoU and P@X (ReferFormer datasets/a2d_eval.py), in numpy; `a2d_map` says how.

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
    zom = RefZOMMetrics(); zom.add(pred, gt, no_target=False)
    zom.summary()                    # Ref-ZOM {"oIoU", "mIoU", "Pr@0.5", ..., "acc_zero", ...}
    davis_unsupervised(gt_labels,
                       pred_labels)  # Ref-DAVIS17: J and F of each GT object, Hungarian-matched
    a2d_map(gts, preds, scores)      # A2D / JHMDB {"mAP", "AP@0.5", ...}; per sample a gt (H, W),
    a2d_iou(gts, preds, scores)      # {"oIoU", "mIoU", "P@0.5", ...}; preds (K, H, W), scores (K,)
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


# ------------------------------------------------------------- Ref-ZOM (RIS-DMMI's test.py)
# toggle1995/RIS-DMMI @ 753cd60, test.sh: --img_size 480; test.py get_transform: Resize(480, 480)
REFZOM_SIZE = (480, 480)


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """The source row (or column) of each of n_out output rows of PIL's Image.resize(NEAREST)
    from n_in rows (Pillow src/_imaging.c `_resize`, src/libImaging/Geometry.c
    `ImagingScaleAffine`): the position starts at half a step, step = n_in / n_out, grows by one
    step per output row, summed in double precision, and is truncated. The running sum is not
    always (i + 0.5) * step (640 -> 480: row 4 reads row 5, not 6). Returns (n_out,) int64."""
    step = n_in / n_out
    positions = np.cumsum(np.r_[step * 0.5, np.full(n_out - 1, step)])  # sequential, as C's +=
    return np.minimum(positions.astype(np.int64), n_in - 1)


def resize_nearest(mask, size) -> np.ndarray:
    """(H, W) array -> size (h, w), the pixels PIL's Image.resize((w, h), NEAREST) picks: what
    torchvision's F.resize(..., interpolation=NEAREST) does to RIS-DMMI's target
    (transforms.py Resize)."""
    mask = np.asarray(mask)
    rows, cols = pil_nearest_index(mask.shape[0], size[0]), pil_nearest_index(mask.shape[1],
                                                                              size[1])
    return mask[rows[:, None], cols]  # (h, w)


class RefZOMMetrics(_Records):
    """Ref-ZOM's scores as RIS-DMMI test.py `evaluate` computes them (toggle1995/RIS-DMMI @
    753cd60), every sentence its own sample, at 480 x 480:
    - the target is the original mask resized to 480 x 480 with PIL's nearest neighbour
      (transforms.py Resize: `F.resize(target, (h, w), interpolation=Image.NEAREST)`);
    - the prediction is made at 480 x 480: the model's logits upsampled bilinearly
      (align_corners=True, lib/_utils.py) to its 480 x 480 input, then the argmax of the two
      classes (test.py). That is the rule's job (common.run asks it for a mask of that size); a
      mask of another size given here is resized as the target is;
    - a sentence with a target: I = |P ∩ G|, U = |P ∪ G|, IoU = I / U and 0 when U = 0; oIoU =
      sum I / sum U, mIoU = mean IoU, Pr@X = share of them with IoU >= X (seg_correct, over
      seg_total: the sentences with a target only);
    - a sentence with no target (source "zero"): correct iff the prediction has no foreground
      pixel (`np.sum(output_mask) == 0`); acc_zero = share correct ("Mean accuracy for
      one-to-zero sample").
    Values are fractions (test.py prints x100); NaN where a mean has no sample.
    """

    def __init__(self, *, size=REFZOM_SIZE):
        super().__init__()
        self.size = tuple(size)

    def add(self, pred, gt, *, no_target: bool, key=None) -> dict:
        """Score one sentence: pred and gt (H, W) masks (torch or numpy, nonzero = foreground),
        each at any size; no_target: the sentence refers to nothing. Returns its record."""
        pred, gt = (_as_masks(m).detach().cpu().numpy() for m in (pred, gt))
        if pred.ndim != 2 or gt.ndim != 2:
            raise ValueError(f"expected pred and gt (H, W), got {pred.shape} and {gt.shape}")
        pred = pred if pred.shape == self.size else resize_nearest(pred, self.size)  # (480, 480)
        if no_target:
            record = {"key": key, "no_target": True, "correct": int(not pred.any())}
        else:
            gt = resize_nearest(gt, self.size)  # (480, 480)
            inter, union = int((pred & gt).sum()), int((pred | gt).sum())
            record = {"key": key, "no_target": False, "I": inter, "U": union,
                      "IoU": inter / union if union else 0.0}
        self.extend([record])
        return record

    def summary(self) -> dict:
        """ImageMetrics' summary of the n sentences with a target (its mIoU, oIoU, Pr@X with
        IoU >= X as test.py's `this_iou >= eval_seg_iou`, cum_I, cum_U, n), and acc_zero over
        the n_zero sentences without one."""
        scored = ImageMetrics()
        scored.extend([{**r, "key": None} for r in self.records if not r["no_target"]])
        zero = [r["correct"] for r in self.records if r["no_target"]]
        return {**scored.summary(), "acc_zero": float(np.mean(zero)) if zero else math.nan,
                "n_zero": len(zero)}


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


# ------------------------------------------ A2D-Sentences / JHMDB-Sentences (ReferFormer protocol)
# pycocotools cocoeval.py, Params.setDetParams: the parameters COCOeval(iouType="segm") runs with
COCO_IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
COCO_RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1,
                                     endpoint=True)
COCO_MAX_DETS = 100  # maxDets[-1] = [1, 10, 100][-1], the one stats[0:6] read
COCO_AREA_RANGES = {"all": (0 ** 2, 1e5 ** 2), "small": (0 ** 2, 32 ** 2),
                    "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2)}
A2D_EPS = 1e-6  # compute_iou(..., EPS=1e-6) of MTTR metrics.py / ReferFormer datasets/a2d_eval.py


def _a2d_samples(gt_masks, pred_masks, pred_scores) -> list:
    """[(gt (H, W) bool, preds (K, H, W) bool, scores (K,) float64)] of each sample."""
    if not len(gt_masks) == len(pred_masks) == len(pred_scores):
        raise ValueError(f"expected one entry per sample in gt_masks, pred_masks and pred_scores, "
                         f"got {len(gt_masks)}, {len(pred_masks)} and {len(pred_scores)}")
    samples = []
    for i, (gt, preds, scores) in enumerate(zip(gt_masks, pred_masks, pred_scores)):
        gt = np.asarray(gt) != 0  # (H, W)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)  # (K,)
        preds = np.asarray(preds) != 0  # (K, H, W)
        if gt.ndim == 2 and len(scores) == 0 and preds.size == 0:
            preds = preds.reshape(0, *gt.shape)  # no prediction, given as [] for instance
        if gt.ndim != 2 or preds.shape != (len(scores), *gt.shape):
            raise ValueError(f"sample {i}: expected gt (H, W), preds (K, H, W) of the same H, W "
                             f"and K scores, got gt {gt.shape}, preds {preds.shape} and "
                             f"{len(scores)} scores")
        samples.append((gt, preds, scores))
    return samples


def _coco_precision(tp, fp, num_gt: int) -> np.ndarray:
    """COCOeval.accumulate for one area range: tp, fp (T, D) bool over the detections of all
    images in score order (an ignored detection is neither). Returns precision (T, R) at the R =
    101 recall thresholds, -1 everywhere when no ground truth counts."""
    precision = -np.ones((len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS)))  # (T, R)
    if num_gt == 0:
        return precision
    tp_sum = np.cumsum(tp, axis=1).astype(dtype=float)  # (T, D)
    fp_sum = np.cumsum(fp, axis=1).astype(dtype=float)
    for t, (tps, fps) in enumerate(zip(tp_sum, fp_sum)):
        recall = tps / num_gt  # (D,)
        prec = tps / (fps + tps + np.spacing(1))
        prec = np.maximum.accumulate(prec[::-1])[::-1]  # the best precision at this recall or more
        at = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")  # (R,)
        reached = at < len(prec)  # beyond the last recall reached the precision stays 0
        precision[t] = 0.0
        precision[t, reached] = prec[at[reached]]
    return precision


def _coco_average(precision: np.ndarray) -> float:
    # COCOeval.summarize: the mean of the entries > -1, and -1 when there are none
    kept = precision[precision > -1]
    return float(np.mean(kept)) if len(kept) else -1.0


def a2d_map(gt_masks, pred_masks, pred_scores, image_ids=None) -> dict:
    """mAP@0.5:0.95, AP@0.5, AP@0.75 and AP small / medium / large of A2D-Sentences and
    JHMDB-Sentences: COCOeval's stats[0:6] in the ReferFormer protocol, without pycocotools.

    The protocol (wjn922/ReferFormer @ 06fc218, engine.py `evaluate_a2d`; the same code as
    mttr2021/MTTR @ 2cc35ab, trainer.py `evaluate_a2d`):
    - Ground truth: a COCO json made once by MTTR's datasets/a2d_sentences/
      create_gt_in_coco_format.py (JHMDB: datasets/jhmdb_sentences/create_gt_in_coco_format.py).
      One image per annotated (frame, sentence) sample, its id a string
      "v_<video>_f_<frame>_i_<instance>" (JHMDB "v_<video>_f_<frame>"), with exactly one
      annotation: the referred object's mask as pycocotools RLE, category_id 1 (a dummy class),
      iscrowd 0, area = float(mask.area(rle)), the pixel count.
    - Predictions: every query's mask of that frame with its score, all on the sample's image id,
      category_id 1 (ReferFormer: 5 queries; models/postprocessors.py A2DSentencesPostProcess:
      mask = sigmoid > 0.5 at the frame's original size, RLE by pycocotools mask.encode,
      score = sigmoid of the logit, `s.item()`). coco_gt.loadRes(predictions) adds area and
      iscrowd 0.
    - COCOeval(coco_gt, coco_pred, iouType="segm"), params.useCats = 0, the rest default: iouThrs
      0.5:0.05:0.95, recThrs 0:0.01:1, maxDets [1, 10, 100], areaRng all [0, 1e10], small
      [0, 1024], medium [1024, 9216], large [9216, 1e10]; evaluate(), accumulate(), summarize(),
      and stats[:6] reported as 'mAP 0.5:0.95', 'AP 0.5', 'AP 0.75', 'AP 0.5:0.95 S', 'M', 'L'.
      The papers' mAP is stats[0].

    COCOeval's steps for this case (pycocotools cocoeval.py, maskApi.c rleIou): per image the
    detections are sorted by score (stable) and the first 100 kept; mask IoU = |P & G| / |P | G|,
    0 when either mask is empty. With one non-crowd ground truth per image, the greedy matching at
    a threshold t gives it to the first detection in score order whose IoU >= t; the others are
    false positives. In an area range a ground truth outside it is ignored (and the detection
    matched to it), and so is an unmatched detection outside it. Then over all images, in sorted
    id order, the detections are sorted by score (stable, so equal scores keep that order): TP and
    FP counts give recall and precision, the precision is made non-increasing from the right and
    read at the 101 recall thresholds (0 beyond the last recall reached), and AP is the mean of
    these T x 101 values (-1 where no ground truth counts in the range, as pycocotools).

    gt_masks: N masks (H_i, W_i), nonzero = foreground, one per sample.
    pred_masks: N arrays (K_i, H_i, W_i) of the sample's predictions (K_i may be 0).
    pred_scores: N arrays (K_i,) of their scores.
    image_ids: the samples' COCO image ids; COCOeval visits the images in sorted id order, which
    decides between equal scores of different images. None: the samples are in that order.
    Returns {"mAP", "AP@0.5", "AP@0.75", "AP_small", "AP_medium", "AP_large"}, Python floats.
    """
    samples = _a2d_samples(gt_masks, pred_masks, pred_scores)
    if not samples:
        raise ValueError("a2d_map needs at least one sample")
    order = range(len(samples))
    if image_ids is not None:
        ids = np.asarray(list(image_ids))
        if len(ids) != len(samples) or len(np.unique(ids)) != len(ids):
            raise ValueError(f"expected {len(samples)} distinct image ids, got {len(ids)} ids "
                             f"of which {len(np.unique(ids))} distinct")
        order = np.argsort(ids, kind="stable")  # COCOeval: p.imgIds = np.unique(imgIds)
    scores, matched, dt_areas, dt_gt, gt_areas = [], [], [], [], []  # per image
    for n, i in enumerate(order):
        gt, preds, score = samples[i]
        rank = np.argsort(-score, kind="mergesort")[:COCO_MAX_DETS]  # (D,)
        preds, score = preds[rank], score[rank]
        inter = (preds & gt).sum((1, 2))  # (D,)
        union = (preds | gt).sum((1, 2))
        iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)  # (D,)
        # the ground truth goes to the first detection reaching t (COCOeval compares the IoU with
        # min(t, 1 - 1e-10) = t)
        hits = iou[:, None] >= COCO_IOU_THRESHOLDS  # (D, T)
        matched.append((hits & (np.cumsum(hits, axis=0) == 1)).T)  # (T, D)
        scores.append(score)
        dt_areas.append(preds.sum((1, 2)))
        dt_gt.append(np.full(len(score), n))  # the image of each detection, in visiting order
        gt_areas.append(gt.sum())
    scores, dt_areas, dt_gt = np.concatenate(scores), np.concatenate(dt_areas), \
        np.concatenate(dt_gt)  # (D_all,)
    matched, gt_areas = np.concatenate(matched, axis=1), np.array(gt_areas)  # (T, D_all), (N,)
    by_score = np.argsort(-scores, kind="mergesort")  # (D_all,)
    matched, dt_areas, dt_gt = matched[:, by_score], dt_areas[by_score], dt_gt[by_score]
    precision = {}
    for name, (low, high) in COCO_AREA_RANGES.items():
        gt_ignored = (gt_areas < low) | (gt_areas > high)  # (N,)
        dt_outside = (dt_areas < low) | (dt_areas > high)  # (D_all,)
        ignored = np.where(matched, gt_ignored[dt_gt], dt_outside)  # (T, D_all)
        precision[name] = _coco_precision(matched & ~ignored, ~matched & ~ignored,
                                          int(np.count_nonzero(~gt_ignored)))
    at_50, at_75 = (np.where(COCO_IOU_THRESHOLDS == t)[0] for t in (.5, .75))
    return {"mAP": _coco_average(precision["all"]),
            "AP@0.5": _coco_average(precision["all"][at_50]),
            "AP@0.75": _coco_average(precision["all"][at_75]),
            "AP_small": _coco_average(precision["small"]),
            "AP_medium": _coco_average(precision["medium"]),
            "AP_large": _coco_average(precision["large"])}


def a2d_best(scores) -> int:
    """The prediction A2D's IoU metrics score a sample by: the highest-scoring one, the last
    listed among equal scores (ReferFormer's `sorted(preds, key=score)[-1]`)."""
    scores = np.asarray(scores)
    return len(scores) - 1 - int(np.argmax(scores[::-1]))


def a2d_iou(gt_masks, pred_masks, pred_scores) -> dict:
    """Overall IoU, mean IoU and P@0.5-0.9 of A2D-Sentences and JHMDB-Sentences, as ReferFormer
    @ 06fc218 datasets/a2d_eval.py `calculate_precision_at_k_and_iou_metrics` (a copy of MTTR
    @ 2cc35ab metrics.py) computes them on the COCO ground truth and predictions of `a2d_map`.

    Each sample (the ground truth's images, in its order) is scored by its highest-scoring
    prediction (`sorted(preds, key=score)[-1]`: among equal scores the last listed). I and U are
    pixel counts (torch float32 sums there, exact below 2**24 pixels) and the sample's
    IoU = (I + 1e-6) / (U + 1e-6) in float32 (`compute_iou`), so 1 when both masks are empty.
    oIoU = sum I / sum U (NaN when that is 0, where the official code divides by zero),
    mIoU = np.mean of the IoUs, P@X = the share of samples with IoU > X (strict).
    Every sample needs a prediction (the official code raises IndexError otherwise).

    gt_masks, pred_masks, pred_scores: as `a2d_map`, in the ground truth's image order.
    Returns {"oIoU", "mIoU", "P@0.5", ..., "P@0.9", "IoU": [per sample], "n"}.
    """
    eps = np.float32(A2D_EPS)
    ious, cum_i, cum_u = [], 0, 0
    for i, (gt, preds, scores) in enumerate(_a2d_samples(gt_masks, pred_masks, pred_scores)):
        if len(scores) == 0:
            raise ValueError(f"sample {i} has no prediction; the A2D IoU metrics score each "
                             f"sample by its highest-scoring one")
        best = a2d_best(scores)
        inter, union = int((preds[best] & gt).sum()), int((preds[best] | gt).sum())
        ious.append(float((np.float32(inter) + eps) / (np.float32(union) + eps)))
        cum_i, cum_u = cum_i + inter, cum_u + union
    n = len(ious)
    out = {"oIoU": cum_i / cum_u if cum_u else math.nan,
           "mIoU": float(np.mean(ious)) if n else math.nan}
    for x in PR_THRESHOLDS:  # the official [0.5, 0.6, 0.7, 0.8, 0.9]
        out[f"P@{x}"] = sum(iou > x for iou in ious) / n if n else math.nan
    return {**out, "IoU": ious, "n": n}

