"""Tests for common/matching.py: matcher invariants (DETR test_all.py style) and losses against
hand computations."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from common.matching import (
    num_masks,
    visible_objects,
    batch_dice_cost,
    batch_sigmoid_bce_cost,
    classification_loss,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    hungarian_match,
    mask_losses,
    matched_masks,
    point_sample,
    sigmoid_bce_loss,
)

WEIGHTS = dict(w_cls=2.0, w_bce=5.0, w_dice=5.0)  # Mask2Former / VITA matcher weights


def boxes(n, size, generator, grid=4):
    """n disjoint boxes, each inside its own cell of a grid x grid layout: (n, size, size) bool."""
    cell = size // grid
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, c in enumerate(torch.randperm(grid * grid, generator=generator)[:n].tolist()):
        r, col = divmod(c, grid)
        masks[i, r * cell + 1 : (r + 1) * cell - 1, col * cell + 1 : (col + 1) * cell - 1] = True
    return masks


def logits_of(masks, scale=8.0, pool=1):
    """Mask logits that agree with `masks`, optionally at 1/pool of the resolution."""
    frac = F.avg_pool2d(masks.float().flatten(0, -3)[:, None], pool)[:, 0]  # fraction of each low-res pixel
    return (scale * (2 * frac - 1)).view(*masks.shape[:-2], *frac.shape[-2:])


def permuted_predictions(all_boxes, labels, num_classes, generator, pool=4):
    """Query perm[i] predicts box i: boxes 0..N-1 are the targets (with `labels`), the rest are
    distractors with the no-object class. Returns (Q, C) logits, (Q, h, w) mask logits, perm[:N]."""
    n, num_queries = len(labels), len(all_boxes)
    perm = torch.randperm(num_queries, generator=generator)
    pred_masks = logits_of(all_boxes, pool=pool)[perm.argsort()]  # (Q, h, w): row perm[i] holds box i
    pred_logits = torch.zeros(num_queries, num_classes + 1)
    pred_logits[:, -1] = 5.0
    pred_logits[perm[:n]] = 0.0
    pred_logits[perm[:n], labels] = 5.0
    return pred_logits, pred_masks, perm[:n]


def assert_same_indices(a, b):
    assert len(a) == len(b)
    for (pa, ta), (pb, tb) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(ta, tb), (pa, ta, pb, tb)


def expected_pairs(perm):
    """(pred_idx, tgt_idx) sorted by pred_idx, as the matcher returns them, for target n -> query perm[n]."""
    order = perm.argsort()
    return perm[order], order


# ------------------------------------------------------------------------------- matcher
@pytest.mark.parametrize("num_points", [None, 2000])
def test_known_permutation_is_recovered_with_low_res_predictions(num_points):
    g = torch.Generator().manual_seed(0)
    logits, masks, targets, perms = [], [], [], []
    for n in (3, 5):
        all_boxes = boxes(7, 64, g)  # (Q, 64, 64) full resolution, disjoint
        tgt, labels = all_boxes[:n], torch.randint(0, 3, (n,), generator=g)
        pred_logits, pred_masks, perm = permuted_predictions(all_boxes, labels, 3, g)  # masks (Q, 16, 16)
        logits.append(pred_logits)
        masks.append(pred_masks)
        perms.append(perm)
        targets.append({"labels": labels, "masks": tgt})
    indices = hungarian_match(
        torch.stack(logits), torch.stack(masks), targets, **WEIGHTS, num_points=num_points, generator=g
    )
    for (pred_idx, tgt_idx), perm in zip(indices, perms):
        want_pred, want_tgt = expected_pairs(perm)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert torch.equal(pred_idx, want_pred) and torch.equal(tgt_idx, want_tgt)


def test_video_match_uses_all_frames():
    # Tubes A and B share frame 0 and then move apart. Query 1 copies frame 0 only, so it is as good
    # as queries 0 and 2 on frame 0 and must lose on the whole tube. Classes carry no information.
    size, cell = 32, 8
    tubes = torch.zeros(2, 3, size, size, dtype=torch.bool)  # (N, T, H, W)
    for t in range(3):
        tubes[0, t, 1 : cell - 1, t * cell + 1 : (t + 1) * cell - 1] = True  # A moves right
        tubes[1, t, t * cell + 1 : (t + 1) * cell - 1, 1 : cell - 1] = True  # B moves down
    frame0_only = torch.zeros_like(tubes[0])
    frame0_only[0] = tubes[0, 0]
    pred_masks = logits_of(torch.stack([tubes[1], frame0_only, tubes[0], torch.zeros_like(tubes[0])]), pool=2)
    targets = [{"labels": torch.zeros(2, dtype=torch.long), "masks": tubes}]
    for num_points in (None, 500):
        g = torch.Generator().manual_seed(1)
        (pred_idx, tgt_idx), = hungarian_match(
            torch.zeros(1, 4, 2), pred_masks[None], targets, **WEIGHTS, num_points=num_points, generator=g
        )
        assert pred_idx.tolist() == [0, 2] and tgt_idx.tolist() == [1, 0]


def random_batch(g, num_targets=(2, 3, 1), num_queries=5, video=False):
    frames = (2,) if video else ()
    pred_logits = torch.randn(len(num_targets), num_queries, 4, generator=g)
    pred_masks = 3 * torch.randn(len(num_targets), num_queries, *frames, 8, 8, generator=g)
    targets = [
        {
            "labels": torch.randint(0, 3, (n,), generator=g),
            "masks": torch.rand(n, *frames, 16, 16, generator=g) > 0.5,
        }
        for n in num_targets
    ]
    return pred_logits, pred_masks, targets


@pytest.mark.parametrize("video", [False, True])
def test_batched_equals_per_sample(video):
    pred_logits, pred_masks, targets = random_batch(
        torch.Generator().manual_seed(2), num_targets=(2, 0, 3), video=video
    )
    # 4 points make the assignment depend on which points are drawn, so the generator must be honoured
    for num_points in (None, 4):
        g = torch.Generator().manual_seed(3)
        batched = hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS, num_points=num_points, generator=g)
        g = torch.Generator().manual_seed(3)
        single = [
            hungarian_match(
                pred_logits[b : b + 1], pred_masks[b : b + 1], [t], **WEIGHTS, num_points=num_points, generator=g
            )[0]
            for b, t in enumerate(targets)
        ]
        assert_same_indices(batched, single)


def test_match_is_the_brute_force_minimum_of_the_documented_cost():
    pred_logits, pred_masks, targets = random_batch(torch.Generator().manual_seed(4), num_targets=(3, 2))
    indices = hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS, num_points=None)
    for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices)):
        pred = F.interpolate(pred_masks[b][:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        prob = pred_logits[b].softmax(-1)
        cost = torch.zeros(len(pred), len(target["labels"]))
        for q, n in itertools.product(range(cost.shape[0]), range(cost.shape[1])):
            x, t = pred[q].flatten(), target["masks"][n].flatten().float()
            p = x.sigmoid()
            bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[q, n] = -2.0 * prob[q, target["labels"][n]] + 5.0 * bce + 5.0 * dice
        best = min(
            itertools.permutations(range(cost.shape[0]), cost.shape[1]),
            key=lambda qs: sum(cost[q, n].item() for n, q in enumerate(qs)),
        )
        assert pred_idx.tolist() == sorted(best)
        assert [best[n] for n in tgt_idx.tolist()] == pred_idx.tolist()


def test_zero_targets_and_fewer_queries_than_targets():
    g = torch.Generator().manual_seed(5)
    pred_logits, pred_masks, targets = random_batch(g, num_targets=(0, 2, 4), num_queries=3)
    indices = hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS, num_points=100)
    assert [len(p) for p, _ in indices] == [0, 2, 3]  # min(Q, N)
    for pred_idx, tgt_idx in indices:
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64 and len(pred_idx) == len(tgt_idx)
        assert torch.equal(pred_idx, pred_idx.sort().values)
        assert len(set(tgt_idx.tolist())) == len(tgt_idx)


def test_point_sampled_costs_match_whole_masks_on_separated_masks():
    g = torch.Generator().manual_seed(6)
    logits, masks, targets = [], [], []
    for n in (4, 6):
        all_boxes = boxes(8, 64, g)  # (Q, 64, 64), disjoint
        tgt = all_boxes[:n]
        _, pred_masks, _ = permuted_predictions(all_boxes, torch.zeros(n, dtype=torch.long), 1, g)
        logits.append(torch.randn(8, 2, generator=g))  # uninformative classes: masks decide
        masks.append(pred_masks + torch.randn(pred_masks.shape, generator=g))
        targets.append({"labels": torch.zeros(n, dtype=torch.long), "masks": tgt})
    logits, masks = torch.stack(logits), torch.stack(masks)
    whole = hungarian_match(logits, masks, targets, **WEIGHTS, num_points=None)
    sampled = hungarian_match(logits, masks, targets, **WEIGHTS, generator=g)  # default 12544 points
    assert_same_indices(whole, sampled)


def test_cost_is_float32_under_autocast_with_bfloat16_inputs():
    pred_logits, pred_masks, targets = random_batch(torch.Generator().manual_seed(7))
    pred_logits, pred_masks = pred_logits.bfloat16(), pred_masks.bfloat16()
    want = hungarian_match(pred_logits.float(), pred_masks.float(), targets, **WEIGHTS, num_points=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS, num_points=None)
    assert_same_indices(want, got)


def test_bad_target_shapes_raise_clear_errors():
    pred_logits, pred_masks, targets = random_batch(torch.Generator().manual_seed(8), num_targets=(2,))
    video_masks = [{"labels": targets[0]["labels"], "masks": torch.zeros(2, 2, 16, 16)}]
    with pytest.raises(ValueError, match=r"targets\[0\].*\(2, 2, 16, 16\)"):
        hungarian_match(pred_logits, pred_masks, video_masks, **WEIGHTS)
    no_object_label = [{"labels": torch.tensor([0, 3]), "masks": targets[0]["masks"]}]
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        hungarian_match(pred_logits, pred_masks, no_object_label, **WEIGHTS)
    pred_logits, pred_masks, targets = random_batch(torch.Generator().manual_seed(8), num_targets=(2, 1))
    targets[1]["masks"] = torch.zeros(1, 12, 16, dtype=torch.bool)  # the batch's targets share H, W
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\] is \(12, 16\).*\(16, 16\)"):
        hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS)


# ------------------------------------------------------------------------------- losses
def hand_bce(x, t):
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def hand_dice(xs, ts):
    ps = [1 / (1 + math.exp(-x)) for x in xs]
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)


LOGITS = [[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.0, -0.5]]
TARGETS = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]


def test_losses_and_pairwise_costs_match_hand_computation():
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    num_masks = 3.0  # not N, so the normalisation is checked too
    bce_per_mask = [sum(hand_bce(x, t) for x, t in zip(xs, ts)) / 4 for xs, ts in zip(LOGITS, TARGETS)]
    dice_per_mask = [hand_dice(xs, ts) for xs, ts in zip(LOGITS, TARGETS)]
    bce, dice = sigmoid_bce_loss(logits, targets, num_masks), dice_loss(logits, targets, num_masks)
    assert bce.item() == pytest.approx(sum(bce_per_mask) / num_masks, rel=1e-6)
    assert dice.item() == pytest.approx(sum(dice_per_mask) / num_masks, rel=1e-6)
    bce_cost, dice_cost = batch_sigmoid_bce_cost(logits, targets), batch_dice_cost(logits, targets)
    for q, n in itertools.product(range(2), range(2)):
        assert bce_cost[q, n].item() == pytest.approx(sum(map(hand_bce, LOGITS[q], TARGETS[n])) / 4, rel=1e-6)
        assert dice_cost[q, n].item() == pytest.approx(hand_dice(LOGITS[q], TARGETS[n]), rel=1e-6)


def test_video_mask_loss_is_taken_over_the_whole_tube():
    pred = torch.tensor([[[[3.0, -3.0]], [[-1.0, 2.0]]]])  # (N=1, T=2, 1, 2)
    tgt = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    losses = mask_losses(pred, tgt, 1.0, num_points=None)
    xs, ts = [3.0, -3.0, -1.0, 2.0], [1.0, 0.0, 1.0, 0.0]
    tube_dice = hand_dice(xs, ts)
    assert losses["dice"].item() == pytest.approx(tube_dice, rel=1e-6)
    assert tube_dice != pytest.approx((hand_dice(xs[:2], ts[:2]) + hand_dice(xs[2:], ts[2:])) / 2, rel=1e-3)
    assert losses["bce"].item() == pytest.approx(sum(map(hand_bce, xs, ts)) / 4, rel=1e-6)


def test_losses_vanish_for_perfect_logits():
    g = torch.Generator().manual_seed(9)
    tgt = torch.cat([boxes(3, 16, g), torch.zeros(1, 16, 16, dtype=torch.bool)])  # one empty mask too
    perfect = 100.0 * (2 * tgt.float() - 1)
    # BCE per value is softplus(-100) ~ 4e-44 (a float32 denormal), far below 1e-30. Dice is exactly
    # 0: sigmoid(100) rounds to 1.0 and the sigmoid(-100) terms vanish next to the +1 smoothing.
    flat = perfect.flatten(1), tgt.flatten(1).float()
    assert 0 <= sigmoid_bce_loss(*flat, 4.0).item() < 1e-30
    assert dice_loss(*flat, 4.0).item() == 0.0
    losses = mask_losses(perfect, tgt, 4.0, num_points=None)
    assert losses["bce"].item() < 1e-30 and losses["dice"].item() == 0.0
    assert batch_dice_cost(*flat).diagonal().abs().max().item() == 0.0


def test_classification_loss_matches_hand_computation():
    logits = [
        [[1.0, 0.5, -1.0], [0.0, 2.0, 0.3], [-0.5, 1.5, 0.2]],
        [[0.7, -0.2, 1.1], [2.0, 0.1, -0.3], [0.4, 0.4, 0.9]],
    ]  # (B=2, Q=3, C=3), class 2 is no-object
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([0, 1])}]
    indices = [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([0, 1]), torch.tensor([1, 0]))]
    classes = [[2, 2, 1], [1, 0, 2]]  # unmatched -> no-object (2); batch 1: query 0 <- target 1 (label 1)
    weight = [1.0, 1.0, 0.1]
    num, den = 0.0, 0.0
    for b, q in itertools.product(range(2), range(3)):
        y, row = classes[b][q], logits[b][q]
        num += weight[y] * -(row[y] - math.log(sum(math.exp(v) for v in row)))
        den += weight[y]
    loss = classification_loss(torch.tensor(logits), targets, indices, no_object_weight=0.1)
    assert loss.item() == pytest.approx(num / den, rel=1e-6)


# ------------------------------------------------------------------------------- gradients, sampling
@pytest.mark.parametrize("frames", [(), (3,)])
def test_gradients_reach_predictions(frames):
    g = torch.Generator().manual_seed(10)
    pred_masks = torch.randn(2, 4, *frames, 8, 8, generator=g, requires_grad=True)  # (B, Q, [T,] h, w)
    pred_logits = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    targets = [
        {"labels": torch.tensor([0, 1]), "masks": torch.rand(2, *frames, 32, 32, generator=g) > 0.5},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, *frames, 32, 32, generator=g) > 0.5},
    ]
    indices = hungarian_match(pred_logits, pred_masks, targets, **WEIGHTS, num_points=200, generator=g)
    preds, tgts = matched_masks(pred_masks, targets, indices)
    assert preds.shape == (3, *frames, 8, 8) and tgts.shape == (3, *frames, 32, 32)
    losses = mask_losses(preds, tgts, 3.0, num_points=200, generator=g)
    losses["ce"] = classification_loss(pred_logits, targets, indices, no_object_weight=0.0)
    sum(losses.values()).backward()
    matched = torch.zeros(2, 4, dtype=torch.bool)
    for b, (pred_idx, _) in enumerate(indices):
        matched[b, pred_idx] = True
    mask_grad = pred_masks.grad.flatten(2).abs().sum(-1)  # (B, Q)
    assert torch.isfinite(pred_masks.grad).all()
    assert (mask_grad[matched] > 0).all() and (mask_grad[~matched] == 0).all()
    # with no_object_weight=0 only matched queries receive a class gradient
    logit_grad = pred_logits.grad.abs().sum(-1)  # (B, Q)
    assert (logit_grad[matched] > 0).all() and (logit_grad[~matched] == 0).all()


def test_point_sample_reads_pixel_centres_in_xy_order():
    masks = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 * row + col
    rows, cols = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 2])
    coords = torch.stack([(cols + 0.5) / 4, (rows + 0.5) / 3], dim=-1)[None]  # (1, 3, 2) as (x, y)
    assert point_sample(masks, coords)[0, 0].tolist() == pytest.approx((4 * rows + cols).tolist(), abs=1e-5)


def test_importance_sampling_prefers_the_boundary():
    size, radius = 64, 0.3
    centres = (torch.arange(size) + 0.5) / size
    dist = torch.sqrt((centres[None, :] - 0.5) ** 2 + (centres[:, None] - 0.5) ** 2)  # [y, x]
    logits = (20 * (radius - dist))[None, None]  # (1, 1, H, W), zero on the circle

    def sample(importance_ratio, seed):
        generator = torch.Generator().manual_seed(seed)
        return get_uncertain_point_coords_with_randomness(
            logits, 2000, importance_ratio=importance_ratio, generator=generator
        )[0]  # (P, 2)

    def near_boundary(coords):
        return ((torch.linalg.norm(coords - 0.5, dim=-1) - radius).abs() < 0.02).float().mean().item()

    coords = sample(0.75, 11)
    assert coords.shape == (2000, 2) and coords.min() >= 0 and coords.max() <= 1
    assert torch.equal(coords, sample(0.75, 11))
    # The band |r - 0.3| < 0.02 covers 2*pi*0.3*0.04 ~ 7.5% of the square: uniform points land in it
    # ~7.5% of the time. Of the 3P candidates ~0.226P are in the band, fewer than the 0.75P kept as
    # most uncertain, so all of them are kept: ~22.6% of the P points.
    assert near_boundary(sample(0.0, 12)) < 0.11
    assert near_boundary(coords) > 0.18
    # The other 0.25P points are drawn uniformly anew (detectron2), so ~7.5% of them are in the band;
    # a subset of the candidates left over after the most uncertain ones would hold none.
    assert 0.03 < near_boundary(coords[1500:]) < 0.12


def test_point_sample_reads_bf16_logits_at_exact_coordinates():
    """Under CUDA autocast the mask logits are bf16; the points must still be read in float32 at the
    exact coordinates the float32 labels are read at (bf16 coordinates are ~0.3 px off at 1/4 size)."""
    from common.matching import point_sample
    ramp = torch.linspace(-50, 50, 200).repeat(1, 1, 200, 1)  # (1, 1, 200, 200): logit = f(x)
    coords = 0.01 + 0.98 * torch.rand(1, 500, 2, generator=torch.Generator().manual_seed(0))  # (1, P, 2), inside
    bf16 = point_sample(ramp.bfloat16(), coords)
    assert bf16.dtype == torch.float32
    assert torch.equal(bf16, point_sample(ramp.bfloat16().float(), coords))
    # the ramp's value at x, read exactly: bf16-rounded coordinates would miss it by up to ~0.2
    expected = -50 + 100 * (coords[0, :, 0] * 200 - 0.5) / 199  # pixel centres at (i + 0.5) / 200
    assert (bf16[0, 0] - expected).abs().max() < 0.15  # bf16 logits are within 0.125 of the ramp


def test_visible_objects_drops_the_objects_absent_from_the_clip_and_num_masks_counts_the_rest():
    masks = torch.zeros(3, 2, 4, 4, dtype=torch.bool)  # (N, T, H, W)
    masks[0, 1, 0, 0] = masks[2, 0, 1, 1] = True  # object 1 is in no frame
    empty = {"masks": masks[:0], "labels": torch.zeros(0, dtype=torch.long)}
    kept = visible_objects([{"masks": masks, "labels": torch.tensor([5, 6, 7])}, empty])
    assert kept[0]["labels"].tolist() == [5, 7] and torch.equal(kept[0]["masks"], masks[[0, 2]])
    assert len(kept[1]["labels"]) == 0
    assert num_masks(kept, "cpu") == 2.0  # no process group: this process's count
    assert num_masks(kept[1:], "cpu") == 1.0  # at least 1
