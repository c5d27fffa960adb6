"""common/metrics.py against the values of the official evaluation code.

tests/fixtures/metric_cases.{json,npz} hold masks with the values that davis2017-evaluation with
MeViS's averaging (video cases) and LAVT test.py (image cases, plus VATEX's strict Pr@X under
"vatex") compute on them; the json's "about" says how they were made. Oc-IoU (VATEX Eqs. 9-10) has
no official code, so its cases are worked out by hand here. tests/fixtures/a2d_map_cases.json
holds A2D-Sentences / JHMDB-Sentences cases with pycocotools' COCOeval values
(tests/fixtures/make_map_cases.py).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common.metrics as metrics
from common.coco_mask import rle_decode
from common.metrics import ImageMetrics, VideoMetrics, boundary_f, jaccard, oc_iou

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {case["case"]: case for case in json.loads((FIXTURES / "metric_cases.json").read_text())["cases"]}
VIDEO_CASES = [name for name, case in CASES.items() if case["mode"] == "video"]
IMAGE_CASES = [name for name, case in CASES.items() if case["mode"] == "image"]
TOL = 1e-6
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURES / "metric_cases.npz") as npz:
        return {name: npz[name] for name in npz.files}


def _pairs(case, arrays):
    return [(arrays[a["pred"]], arrays[a["gt"]]) for a in case["arrays"]]


def _close(got, want):
    if want is None:  # the fixture's null is NaN
        return math.isnan(got)
    return abs(got - want) <= TOL


def _check_video(metric, expected):
    summary = metric.summary()
    assert summary["n"] == expected["n_expressions"] == len(metric.records)
    for name in ("J", "F", "J&F"):
        assert _close(summary[name], expected[name]), (name, summary[name], expected[name])
    for record, want in zip(metric.records, expected["per_expression"], strict=True):
        assert record["n_frames"] == want["n_frames"]
        for name in ("J", "F", "J&F"):
            assert _close(record[name], want[name]), (name, record[name], want[name])
        np.testing.assert_allclose(record["J_per_frame"], want["J_per_frame"], rtol=0, atol=TOL)
        np.testing.assert_allclose(record["F_per_frame"], want["F_per_frame"], rtol=0, atol=TOL)


# ------------------------------------------------------------------------- official values
@pytest.mark.parametrize("name", VIDEO_CASES)
def test_video_case_matches_official(name, arrays):
    metric = VideoMetrics()
    for pred, gt in _pairs(CASES[name], arrays):
        metric.add(pred, gt, key=None)
    _check_video(metric, CASES[name]["expected"])
    # the readable reference gives the official per-frame values too
    for (pred, gt), want in zip(_pairs(CASES[name], arrays), CASES[name]["expected"]["per_expression"], strict=True):
        np.testing.assert_allclose(metrics.reference_jaccard(pred, gt), want["J_per_frame"], rtol=0, atol=TOL)
        np.testing.assert_allclose(metrics.reference_boundary_f(pred, gt), want["F_per_frame"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", IMAGE_CASES)
@pytest.mark.parametrize("strict_pr", [False, True])
def test_image_case_matches_official(name, strict_pr, arrays):
    expected = CASES[name]["expected"]
    metric = ImageMetrics(strict_pr=strict_pr)
    for pred, gt in _pairs(CASES[name], arrays):
        metric.add(pred, gt)
    summary = metric.summary()
    want = expected["vatex"] if strict_pr else expected  # VATEX's evaluator counts IoU > X
    for key in ["mIoU", "oIoU"] + [f"Pr@{x}" for x in metrics.PR_THRESHOLDS]:
        assert _close(summary[key], want[key]), (key, summary[key], want[key])
    counts = (summary["cum_I"], summary["cum_U"], summary["n"])
    assert counts == (expected["cum_I"], expected["cum_U"], expected["n_samples"])
    per_sample = expected["per_sample"]
    assert [r["I"] for r in metric.records] == per_sample["I"]
    assert [r["U"] for r in metric.records] == per_sample["U"]
    np.testing.assert_allclose([r["IoU"] for r in metric.records], per_sample["IoU"], rtol=0, atol=TOL)


def test_chunking_does_not_change_values(arrays, monkeypatch):
    # 9 frames of 480x854: the default chunk holds 5 of them; then one frame, then all at once.
    case = CASES["vid_tolerance_480x854"]
    (pred, gt), = _pairs(case, arrays)
    want = case["expected"]["per_expression"][0]
    for pixels in (metrics.CPU_CHUNK_PIXELS, 1, 10**9):
        monkeypatch.setattr(metrics, "CPU_CHUNK_PIXELS", pixels)
        np.testing.assert_allclose(jaccard(pred, gt).numpy(), want["J_per_frame"], rtol=0, atol=TOL)
        np.testing.assert_allclose(boundary_f(pred, gt).numpy(), want["F_per_frame"], rtol=0, atol=TOL)


# ------------------------------------------------------ fast and readable versions agree
@pytest.mark.parametrize("shape", [(6, 1, 13), (6, 9, 1), (5, 37, 53), (4, 64, 64), (3, 150, 201)])
@pytest.mark.parametrize("chunk_pixels", [metrics.CPU_CHUNK_PIXELS, 1])
def test_fast_j_and_f_equal_the_readable_reference(shape, chunk_pixels, monkeypatch):
    # Sparse noise and blocky blobs, some kept to one part of the frame (with one frame per chunk,
    # each frame is cropped to its own window), odd sizes and 1-pixel-wide frames.
    monkeypatch.setattr(metrics, "CPU_CHUNK_PIXELS", chunk_pixels)
    rng = np.random.default_rng(sum(shape))
    n_frames, height, width = shape
    blocks = rng.random((n_frames, height // 4 + 1, width // 4 + 1)) < 0.4
    gt = blocks.repeat(4, 1).repeat(4, 2)[:, :height, :width]
    pred = gt ^ (rng.random(shape) < 0.03)
    pred[0] = rng.random((height, width)) < 0.01
    gt[1, :, : width // 2] = pred[1, : height // 3] = False
    gt[2, height // 2 + 1:] = pred[2, height // 2:] = False
    np.testing.assert_allclose(jaccard(pred, gt).numpy(), metrics.reference_jaccard(pred, gt), rtol=0, atol=1e-12)
    for bound_th in (0.008, 0.05, 1, 3, 7):
        want = metrics.reference_boundary_f(pred, gt, bound_th=bound_th)
        np.testing.assert_allclose(boundary_f(pred, gt, bound_th=bound_th).numpy(), want, rtol=0, atol=1e-12)


def test_dilation_is_a_disk_not_a_square():
    # One boundary pixel dilates to skimage's disk(r) = {dx^2 + dy^2 <= r^2}, not a square, for
    # radii well past the 8 of 480x854 frames; the map is laid out as _boundary_maps returns it.
    for r in range(21):
        size = 2 * r + 3  # the pixel at (r + 1, r + 1): the disk reaches the last row and column but one
        padded = torch.zeros(1, size + 2 * r, size + 2 * r, dtype=torch.bool)
        padded[0, 2 * r + 1, 2 * r + 1] = True
        grid = np.arange(size) - (r + 1)
        disk = grid[None, :] ** 2 + grid[:, None] ** 2 <= r * r
        np.testing.assert_array_equal(metrics._dilate_disk(padded, r)[0].numpy(), disk, err_msg=f"radius {r}")


# --------------------------------------------------------------------------------- Oc-IoU
def test_oc_iou_hand_cases():
    gt_a = np.zeros((4, 4), dtype=bool)
    gt_a[:2, :2] = True  # 4 pixels
    extra = gt_a.copy()
    extra[3, 3] = True
    # Object A, K=2: intersection = the 4 GT pixels, union = 5 pixels -> 0.8 (Eq. 9).
    object_a = (gt_a, np.stack([gt_a, extra]))
    gt_b = np.zeros((3, 5), dtype=bool)
    gt_b[1, :3] = True  # 3 pixels
    short, long = gt_b.copy(), gt_b.copy()
    short[1, 2] = False
    long[1, 3:] = True
    # Object B, K=3 (frame size differs from A): intersection 2 pixels, union 5 -> 0.4.
    object_b = (gt_b, np.stack([gt_b, short, long]))
    assert oc_iou([object_a]) == pytest.approx(0.8, abs=1e-12)
    assert oc_iou([object_b]) == pytest.approx(0.4, abs=1e-12)
    assert oc_iou([object_a, object_b]) == pytest.approx(0.6, abs=1e-12)  # Eq. (10): mean over objects

    # Two half predictions: each has IoU 0.5 with the GT, but they share no pixel -> Oc-IoU 0.
    left, right = np.zeros((2, 4), dtype=bool), np.zeros((2, 4), dtype=bool)
    left[:, :2], right[:, 2:] = True, True
    assert oc_iou([(left | right, np.stack([left, right]))]) == 0.0
    # K=1 is the plain IoU: the GT's columns 0-1 against columns 1-2 share 2 of 6 pixels.
    shifted = np.zeros((2, 4), dtype=bool)
    shifted[:, 1:3] = True
    assert oc_iou([(left, shifted[None])]) == pytest.approx(2 / 6, abs=1e-12)
    # Empty GT and empty predictions: union empty -> 0 (LAVT's rule; the paper is silent).
    empty = np.zeros((3, 3), dtype=bool)
    assert oc_iou([(empty, empty[None]), object_a]) == pytest.approx(0.4)
    assert math.isnan(oc_iou([]))
    with pytest.raises(ValueError, match="K >= 1"):
        oc_iou([(gt_a, np.zeros((0, 4, 4), dtype=bool))])


# ------------------------------------------------------------------- accumulators and inputs
def test_video_records_merge_across_processes(arrays):
    case = CASES["vid_multi_expression"]
    pairs = _pairs(case, arrays)
    rank0, rank1 = VideoMetrics(), VideoMetrics()
    rank0.add(*pairs[0], key="v0_e0")
    rank1.add(*pairs[1], key="v0_e1")
    rank1.add(*pairs[2], key="v1_e0")
    rank1.add(*pairs[0], key="v0_e0")  # padding repeat of rank 0's expression
    gathered = json.loads(json.dumps([rank0.records, rank1.records]))  # records survive JSON
    merged = VideoMetrics()
    for records in gathered:
        merged.extend(records)
    assert [r["key"] for r in merged.records] == ["v0_e0", "v0_e1", "v1_e0"]
    _check_video(merged, case["expected"])
    conflicting = dict(merged.records[0], J=0.0)
    with pytest.raises(ValueError, match="v0_e0"):
        merged.extend([conflicting])
    assert VideoMetrics().summary()["n"] == 0 and math.isnan(VideoMetrics().summary()["J&F"])


def test_image_batch_equals_samples_and_keys(arrays):
    (pred, gt), = _pairs(CASES["img_random_batch_64x64"], arrays)
    batched, single = ImageMetrics(), ImageMetrics()
    iou = batched.add(pred, gt, key=[f"s{i}" for i in range(len(pred))])
    for i in range(len(pred)):
        single.add(pred[i], gt[i], key=f"s{i}")
    assert batched.records == single.records
    want = CASES["img_random_batch_64x64"]["expected"]["per_sample"]["IoU"]
    np.testing.assert_allclose(iou.numpy(), want, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="keys"):
        batched.add(pred, gt, key=["only one"])


def test_bad_inputs_raise_clear_errors():
    masks = np.zeros((2, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        jaccard(masks, np.zeros((2, 8, 9), dtype=bool))
    with pytest.raises(ValueError, match="T, H, W"):
        boundary_f(masks[0], masks[0])
    with pytest.raises(ValueError, match="integer"):
        boundary_f(masks, masks, bound_th=2.5)
    with pytest.raises(ValueError, match="no frames"):
        VideoMetrics().add(masks[:0], masks[:0])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_inputs_device(device, arrays):
    case = CASES["vid_multi_expression"]
    metric = VideoMetrics()
    for pred, gt in _pairs(case, arrays):
        # MeViS reads predictions as 0/255 PNGs: any nonzero value is foreground.
        pred, gt = torch.from_numpy(pred).to(device, torch.uint8) * 255, torch.from_numpy(gt).to(device)
        assert jaccard(pred, gt).device.type == device and boundary_f(pred, gt).device.type == device
        metric.add(pred, gt)
    _check_video(metric, case["expected"])
    image = ImageMetrics()
    (pred, gt), = _pairs(CASES["img_random_batch_64x64"], arrays)
    assert image.add(torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device)).device.type == device
    assert _close(image.summary()["oIoU"], CASES["img_random_batch_64x64"]["expected"]["oIoU"])


# --------------------------------------------------------------- DAVIS unsupervised (Ref-DAVIS17)
def test_davis_unsupervised_matches_proposals_to_objects_by_hand():
    gt = np.zeros((2, 4, 4), dtype=np.uint8)  # (T, H, W) palette values
    gt[:, :2, :2] = 1  # object 1: top left
    gt[:, 2:, 2:] = 2  # object 2: bottom right
    gt[1, 0, 3] = 3  # object 3 appears after the first frame only: not an object of the sequence
    gt[:, 3, 0] = 255  # a void pixel
    pred = np.zeros_like(gt)
    pred[:, 2:, 2:] = 1  # proposal 1 is object 2
    pred[0, :2, :2] = 2  # proposal 2 is object 1, in frame 0 only
    pred[:, 3, 0] = 2  # on the void pixel: not counted
    j, f = metrics.davis_unsupervised(gt, pred)
    # Hungarian on mean (J + F) / 2: proposal 1 -> object 2 (1.0), proposal 2 -> object 1 (J 1 then 0)
    np.testing.assert_allclose(j, [[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(f, [[1.0, 1.0], [1.0, 0.0]])
    # a proposal for nothing: the official code pads to the number of objects with empty proposals
    j, _ = metrics.davis_unsupervised(gt, np.where(gt == 1, 1, 0).astype(np.uint8))
    np.testing.assert_allclose(sorted(j.mean(1)), [0.0, 1.0])
    with pytest.raises(ValueError, match="at most 20"):
        metrics.davis_unsupervised(gt, np.full_like(gt, 21))


# ------------------------------------------ A2D-Sentences / JHMDB-Sentences (ReferFormer protocol)
# tests/fixtures/a2d_map_cases.json: seeded cases and what the official protocol computes on them
# with pycocotools (COCOeval stats[:6]; P@X, oIoU, mIoU), made by tests/fixtures/make_map_cases.py.
A2D = json.loads((FIXTURES / "a2d_map_cases.json").read_text())
A2D_CASES = {case["case"]: case for case in A2D["cases"]}
A2D_IOU_CASES = [name for name, case in A2D_CASES.items() if case["official_iou"] is not None]
A2D_STATS = ("mAP", "AP@0.5", "AP@0.75", "AP_small", "AP_medium", "AP_large")
A2D_TOL = 1e-12


def _a2d_inputs(case):
    """gt_masks, pred_masks, pred_scores and image ids of a case, in its ground truth's order."""
    gts, preds, scores, ids = [], [], [], []
    for image in case["images"]:
        size = [image["height"], image["width"]]
        gts.append(rle_decode({"size": size, "counts": image["gt"]}))
        preds.append(np.array([rle_decode({"size": size, "counts": counts})
                               for counts, _ in image["preds"]]).reshape(-1, *size))
        scores.append(np.array([score for _, score in image["preds"]]))
        ids.append(image["id"])
    return gts, preds, scores, ids


def _official_torch_iou(gts, preds, scores):
    """MTTR metrics.py / ReferFormer datasets/a2d_eval.py `compute_iou` and
    `calculate_precision_at_k_and_iou_metrics` verbatim in torch, lists for the COCO objects."""
    def compute_iou(outputs: torch.Tensor, labels: torch.Tensor, EPS=1e-6):
        outputs = outputs.int()
        intersection = (outputs & labels).float().sum((1, 2))
        union = (outputs | labels).float().sum((1, 2))
        iou = (intersection + EPS) / (union + EPS)
        return iou, intersection, union

    counters_by_iou = {iou: 0 for iou in [0.5, 0.6, 0.7, 0.8, 0.9]}
    total_intersection_area, total_union_area, ious_list = 0, 0, []
    for gt_mask, masks, image_scores in zip(gts, preds, scores):
        pred_annots = [{"mask": m, "score": float(s)} for m, s in zip(masks, image_scores)]
        pred_mask = sorted(pred_annots, key=lambda a: a['score'])[-1]["mask"]
        iou, intersection, union = compute_iou(torch.tensor(pred_mask).unsqueeze(0),
                                               torch.tensor(gt_mask).unsqueeze(0))
        iou, intersection, union = iou.item(), intersection.item(), union.item()
        for iou_threshold in counters_by_iou.keys():
            if iou > iou_threshold:
                counters_by_iou[iou_threshold] += 1
        total_intersection_area += intersection
        total_union_area += union
        ious_list.append(iou)
    precision_at_k = np.array(list(counters_by_iou.values())) / len(ious_list)
    return precision_at_k, total_intersection_area / total_union_area, np.mean(ious_list), \
        ious_list


def test_a2d_fixture_holds_enough_pycocotools_cases():
    assert A2D["pycocotools"] and len(A2D_CASES) >= 20 and len(A2D_IOU_CASES) >= 15
    assert (FIXTURES / "a2d_map_cases.json").stat().st_size < 2**20
    assert any(not image["preds"] for case in A2D["cases"] for image in case["images"])
    assert any(len(image["preds"]) > metrics.COCO_MAX_DETS
               for case in A2D["cases"] for image in case["images"])


@pytest.mark.parametrize("name", list(A2D_CASES))
def test_a2d_map_equals_pycocotools(name):
    gts, preds, scores, ids = _a2d_inputs(A2D_CASES[name])
    got = metrics.a2d_map(gts, preds, scores, image_ids=ids)
    for key, want in zip(A2D_STATS, A2D_CASES[name]["coco_stats"], strict=True):
        assert abs(got[key] - want) <= A2D_TOL, (key, got[key], want)


@pytest.mark.parametrize("name", A2D_IOU_CASES)
def test_a2d_iou_equals_the_official_code(name):
    gts, preds, scores, _ = _a2d_inputs(A2D_CASES[name])
    want = A2D_CASES[name]["official_iou"]
    got = metrics.a2d_iou(gts, preds, scores)
    assert got["oIoU"] == want["oIoU"] and got["mIoU"] == want["mIoU"]
    assert [got[f"P@{x}"] for x in metrics.PR_THRESHOLDS] == want["P@"]
    assert got["IoU"] == want["IoU"] and got["n"] == len(gts)
    # the generator wrote the official torch float32 arithmetic in numpy: torch itself agrees
    p_at_k, oiou, miou, ious = _official_torch_iou(gts, preds, scores)
    assert (list(p_at_k), oiou, miou, ious) == (want["P@"], want["oIoU"], want["mIoU"], want["IoU"])


def test_a2d_metrics_can_fail():
    """Reversed scores, another image order for ties between images, and the first instead of the
    last of equal scores each change a fixture value."""
    gts, preds, scores, ids = _a2d_inputs(A2D_CASES["referformer_like_5_queries"])
    reversed_map = metrics.a2d_map(gts, preds, [-s for s in scores], image_ids=ids)["mAP"]
    assert abs(reversed_map - A2D_CASES["referformer_like_5_queries"]["coco_stats"][0]) > 1e-3
    gts, preds, scores, ids = _a2d_inputs(A2D_CASES["ties_across_images"])
    unsorted = metrics.a2d_map(gts, preds, scores)  # the listed order is not the sorted id order
    assert [unsorted[key] for key in A2D_STATS] != A2D_CASES["ties_across_images"]["coco_stats"]
    gts, preds, scores, _ = _a2d_inputs(A2D_CASES["ties_within_image"])
    first_of_ties = metrics.a2d_iou(gts, [p[::-1] for p in preds], [s[::-1] for s in scores])
    assert first_of_ties["IoU"] != A2D_CASES["ties_within_image"]["official_iou"]["IoU"]


def test_a2d_bad_inputs_raise_clear_errors():
    gt, pred = np.zeros((4, 5)), np.zeros((1, 4, 5))
    with pytest.raises(ValueError, match="one entry per sample"):
        metrics.a2d_map([gt], [pred, pred], [[0.5]])
    with pytest.raises(ValueError, match="sample 0"):
        metrics.a2d_map([gt], [np.zeros((1, 5, 4))], [[0.5]])
    with pytest.raises(ValueError, match="distinct image ids"):
        metrics.a2d_map([gt, gt], [pred, pred], [[0.5], [0.5]], image_ids=["a", "a"])
    with pytest.raises(ValueError, match="no prediction"):
        metrics.a2d_iou([gt], [[]], [[]])
    assert metrics.a2d_map([gt], [[]], [[]])["mAP"] == 0.0  # no detection, one ground truth
