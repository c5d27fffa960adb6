"""Hungarian matching and the set losses of Mask2Former-style segmentation models.

The matcher follows DETR (facebookresearch/detr, models/matcher.py) with Mask2Former's
point-sampled mask costs (facebookresearch/Mask2Former, mask2former/modeling/matcher.py). The
losses follow Mask2Former's criterion (mask2former/modeling/criterion.py) with PointRend's
importance sampling (detectron2, projects/PointRend/point_rend/point_features.py). Video masks
follow VITA (sukjunhwang/VITA, vita/modeling/vita_matcher.py and vita_criterion.py): one object
is one mask tube over T frames, and its costs and losses are taken over the whole tube.

Everything here is a plain function: the matcher takes the cost weights as keyword arguments and
the losses return unweighted values, so the weighted sum is one visible line in each `train()`.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from scipy.optimize import linear_sum_assignment

# Shapes: B batch, Q queries, N target objects (or matched pairs), C classes including the
# no-object class (the last one), T frames, h w predicted mask size, H W target mask size,
# P points per mask (per frame for video), S oversampled candidate points.


# ------------------------------------------------------------------------------- point sampling
def _rand(shape, *, device, generator=None):
    # Drawn on the generator's device, so one CPU generator reproduces the points on any device.
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def point_sample(masks, coords):
    """Bilinearly sample `masks` (N, c, H, W) at `coords` (N, P, 2), given as (x, y) in [0, 1]^2.

    Returns (N, c, P) float32. Normalised coordinates address the same place on masks of any size,
    so low-resolution predictions and full-resolution targets can be compared point by point without
    resizing either (detectron2 point_features.py `point_sample`, align_corners=False). Always in
    float32: bf16 logits (CUDA autocast) sampled at bf16-rounded coordinates would be read about
    0.3 px away from where the float32 labels are read.
    """
    grid = rearrange(2.0 * coords.float() - 1.0, "n p xy -> n p 1 xy")  # (N, P, 1, 2) in [-1, 1]
    values = F.grid_sample(masks.float(), grid, mode="bilinear",
                           align_corners=False)  # (N, c, P, 1)
    return rearrange(values, "n c p 1 -> n c p")  # (N, c, P)


def get_uncertain_point_coords_with_randomness(
    logits, num_points, *, oversample_ratio=3.0, importance_ratio=0.75, generator=None
):
    """PointRend's importance sampling of training points: (N, 1, h, w) logits -> (N, P, 2) coords.

    Draws S = num_points * oversample_ratio uniform candidates per mask and keeps the
    importance_ratio * num_points most uncertain ones (uncertainty = -|logit| at the candidate,
    i.e. closest to the decision boundary); the other points are drawn uniformly anew, so a fixed
    share of the points covers the whole mask. Coordinates are (x, y) in [0, 1]^2. As detectron2
    point_features.py `get_uncertain_point_coords_with_randomness` with Mask2Former's
    `calculate_uncertainty` (both Mask2Former's and VITA's criterion call it).
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio must be in [0, 1], got {importance_ratio}")
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    coords = _rand((n, num_sampled, 2), device=logits.device, generator=generator)  # (N, S, 2)
    # Uncertainty of the interpolated logit at each candidate, not interpolated uncertainty of the
    # pixels around it: between logits -1 and 1 the point sits on the boundary (point_features.py).
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # (N, S)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # (N, P_u)
    uncertain = torch.gather(coords, 1, repeat(idx, "n p -> n p xy", xy=2))  # (N, P_u, 2)
    uniform = _rand((n, num_points - num_uncertain, 2), device=logits.device, generator=generator)
    return torch.cat([uncertain, uniform], dim=1)  # (N, P, 2)


# ------------------------------------------------------------------------------- matching costs
def batch_sigmoid_bce_cost(logits, targets):
    """Mean sigmoid BCE between every prediction and every target: (Q, P), (N, P) -> (Q, N).

    Mask2Former matcher.py `batch_sigmoid_ce_loss`: BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0)
    is linear in t, so all pairs come from two matrix products instead of a (Q, N, P) tensor.
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits),
                                             reduction="none")  # (Q, P)
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                             reduction="none")  # (Q, P)
    # (Q, N)
    cost = torch.einsum("qp,np->qn", pos, targets) + torch.einsum("qp,np->qn", neg, 1 - targets)
    return cost / logits.shape[1]


def batch_dice_cost(logits, targets):
    """Dice loss 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) for every pair: (Q, P), (N, P) ->
    (Q, N).

    Mask2Former matcher.py `batch_dice_loss`, with p = sigmoid(logits).
    """
    probs = logits.sigmoid()  # (Q, P)
    numerator = 2 * torch.einsum("qp,np->qn", probs, targets)  # (Q, N)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]  # (Q, N)
    return 1 - (numerator + 1) / (denominator + 1)


def _as_tubes(masks, name):
    # Images are videos of one frame, so one code path serves both.
    if masks.dim() == 3:
        return rearrange(masks, "n h w -> n 1 h w")  # (N, 1, H, W)
    if masks.dim() == 4:
        return masks  # (N, T, H, W)
    raise ValueError(f"{name} must be (N, H, W) or (N, T, H, W), got shape {tuple(masks.shape)}")


def _shared_point_masks(pred, tgt, tgt_batch, num_points, generator):
    # (B, Q, T, h, w), (N, T, H, W) -> (B, Q, T*P), (N, T*P): the predictions and targets of batch
    # element b on the same points, for every mask and frame; tgt_batch (N,) is each target's b.
    num_frames = pred.shape[2]
    if num_points is None:
        pred = F.interpolate(pred.flatten(1, 2), tgt.shape[-2:], mode="bilinear",
                             align_corners=False)
        pred = rearrange(pred, "b (q t) h w -> b q (t h w)", t=num_frames)  # (B, Q, T*H*W)
        return pred, rearrange(tgt, "n t h w -> n (t h w)")
    # One draw per batch element, in order: a batched call equals per-sample calls (same generator).
    coords = torch.cat([_rand((1, num_points, 2), device=pred.device, generator=generator)
                        for _ in range(len(pred))])  # (B, P, 2)
    # Every mask and frame of an element is a channel of one image, sampled on its element's points.
    pred_pts = point_sample(rearrange(pred, "b q t h w -> b (q t) h w"), coords)  # (B, Q*T, P)
    tgt_pts = point_sample(tgt, coords[tgt_batch])  # (N, T, P)
    pred_pts = rearrange(pred_pts, "b (q t) p -> b q (t p)", t=num_frames)  # (B, Q, T*P)
    return pred_pts, rearrange(tgt_pts, "n t p -> n (t p)")  # (N, T*P)


def _check_target(b, target, pred_logits, pred_masks):
    labels, masks = target["labels"], target["masks"]
    same_frames = masks.dim() == pred_masks.dim() - 1 \
        and masks.shape[1:-2] == pred_masks.shape[2:-2]
    if not same_frames or len(labels) != len(masks):
        raise ValueError(
            f"targets[{b}] has {len(labels)} labels and masks of shape {tuple(masks.shape)}; "
            f"expected one mask per label, with the frame axes of pred_masks "
            f"{tuple(pred_masks.shape)} minus B, Q, h, w"
        )
    num_classes = pred_logits.shape[-1] - 1
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"targets[{b}]['labels'] = {labels.tolist()} must lie in [0, {num_classes}) "
            "(the last of the C logits is no-object)"
        )


@torch.no_grad()
def hungarian_match(
    pred_logits, pred_masks, targets, *, w_cls, w_bce, w_dice, num_points=12544, generator=None
):
    """One-to-one assignment of predictions to target objects with the lowest total cost.

    Args:
        pred_logits: (B, Q, C) class logits; the last class is "no object".
        pred_masks: (B, Q, h, w) image or (B, Q, T, h, w) video mask logits.
        targets: list of B dicts with
            "labels": (N,) long, class ids in [0, C - 1) (N may be 0),
            "masks": (N, H, W) or (N, T, H, W), bool or float in [0, 1]; H, W may differ from h, w
            but are the same for all B (pad them in the collate function).
        w_cls, w_bce, w_dice: weights of the class, sigmoid-BCE and dice costs.
        num_points: masks are compared on this many random points, the same points for all
            predictions and targets of a batch element and, for video, for all frames
            (Mask2Former / VITA). None compares whole masks, with the predictions bilinearly
            resized to the target size.
        generator: optional torch.Generator for the points. Points are drawn per batch element in
            order (none for an element without targets), so a batched call equals per-sample calls
            that share one generator.

    Returns:
        A list of B pairs (pred_idx, tgt_idx) of int64 tensors on the CPU, with
        len(pred_idx) = len(tgt_idx) = min(Q, N) and pred_idx sorted: prediction pred_idx[k] is
        assigned to target tgt_idx[k]. Unassigned predictions are "no object".

    The cost of prediction q and target n is
        w_cls * -softmax(pred_logits)[q, label_n] + w_bce * BCE(q, n) + w_dice * dice(q, n),
    with BCE averaged over the points (over all T * P values for video). The loss uses the
    negative log-likelihood instead of -p; as DETR notes, -p stands for 1 - p and "the 1 is a
    constant that doesn't change the matching". The cost is computed in float32 even under
    autocast (Mask2Former matcher.py).
    """
    batch_size, num_queries = pred_logits.shape[:2]
    if pred_masks.dim() not in (4, 5) or pred_masks.shape[:2] != (batch_size, num_queries):
        raise ValueError(
            f"pred_masks must be (B, Q, h, w) or (B, Q, T, h, w) with B, Q = {batch_size}, "
            f"{num_queries} from pred_logits, got shape {tuple(pred_masks.shape)}"
        )
    if len(targets) != batch_size:
        raise ValueError(f"expected {batch_size} targets (one per batch element), got "
                         f"{len(targets)}")
    for b, target in enumerate(targets):
        _check_target(b, target, pred_logits, pred_masks)
        if target["masks"].shape[-2:] != targets[0]["masks"].shape[-2:]:
            raise ValueError(f"targets[{b}]['masks'] is {tuple(target['masks'].shape[-2:])} in H, "
                             f"W and targets[0]'s {tuple(targets[0]['masks'].shape[-2:])}: pad "
                             f"them to one size in the collate function")
    sizes = [len(t["labels"]) for t in targets]
    indices = [(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))] * batch_size
    has = [b for b, n in enumerate(sizes) if n]  # elements without targets draw no points
    if not has:
        return indices
    # DETR's batched matcher: one cost matrix between the queries of every element and the targets
    # of all elements, cut into each element's block; the other blocks are never used.
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        pred = pred_masks[has].float()
        # (B', Q, T, h, w)
        pred = pred if pred.dim() == 5 else rearrange(pred, "b q h w -> b q 1 h w")
        tgt = torch.cat([_as_tubes(targets[b]["masks"], "masks") for b in has])  # (N, T, H, W)
        tgt = tgt.to(pred.device, torch.float32)
        tgt_batch = torch.cat([torch.full((sizes[b],), i)
                               for i, b in enumerate(has)]).to(pred.device)  # (N,)
        pred, tgt = _shared_point_masks(pred, tgt, tgt_batch,
                                        num_points, generator)  # (B', Q, T*P), (N, T*P)
        pred = rearrange(pred, "b q p -> (b q) p")  # (B'*Q, T*P)
        prob = pred_logits[has].float().softmax(-1).flatten(0, 1)  # (B'*Q, C)
        labels = torch.cat([targets[b]["labels"] for b in has]).to(prob.device)  # (N,)
        cost_cls = -prob[:, labels]  # (B'*Q, N)
        cost = w_cls * cost_cls + w_bce * batch_sigmoid_bce_cost(pred, tgt) \
            + w_dice * batch_dice_cost(pred, tgt)
    cost = rearrange(cost, "(b q) n -> b q n", q=num_queries).cpu()  # (B', Q, N)
    for i, (b, c) in enumerate(zip(has, cost.split([sizes[b] for b in has], -1))):
        c = c[i]  # (Q, N_b): element b's queries against its own targets
        if not torch.isfinite(c).all():
            raise ValueError(f"matching cost of batch element {b} is not finite: the predictions "
                             f"hold NaN or inf")
        pred_idx, tgt_idx = linear_sum_assignment(c.numpy())  # pred_idx comes back sorted
        indices[b] = (torch.from_numpy(pred_idx).long(), torch.from_numpy(tgt_idx).long())
    return indices


# ------------------------------------------------------------------------------- losses
def matched_pred_index(indices):
    """(batch_idx, pred_idx) that index the matched predictions as `pred[batch_idx, pred_idx]`.

    DETR detr.py `_get_src_permutation_idx`; both are (M,) with M the total number of matches.
    """
    # (M,)
    batch_idx = torch.cat([torch.full_like(pred_idx, b) for b, (pred_idx, _) in enumerate(indices)])
    pred_idx = torch.cat([pred_idx for pred_idx, _ in indices])  # (M,)
    return batch_idx, pred_idx


def matched_masks(pred_masks, targets, indices):
    """Matched pairs: (M, [T,] h, w) predicted mask logits and (M, [T,] H, W) float target masks.

    Targets of all batch elements must share H, W (pad them in the collate function).
    """
    batch_idx, pred_idx = matched_pred_index(indices)
    # (M, [T,] h, w)
    preds = pred_masks[batch_idx.to(pred_masks.device), pred_idx.to(pred_masks.device)]
    # (M, [T,] H, W)
    tgts = torch.cat([t["masks"][tgt_idx] for t, (_, tgt_idx) in zip(targets, indices)])
    return preds, tgts.to(preds.device, torch.float32)


def sigmoid_bce_loss(logits, targets, num_masks):
    """Sigmoid BCE of (N, P) logits against (N, P) targets in [0, 1]: mean over points, sum over
    masks, divided by num_masks (the number of target masks in the batch; Mask2Former criterion.py
    `sigmoid_ce_loss`)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() \
        / num_masks


def dice_loss(logits, targets, num_masks):
    """Dice loss 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask, p = sigmoid(logits), on (N, P)
    inputs, summed over masks and divided by num_masks (Mask2Former criterion.py `dice_loss`)."""
    probs = logits.sigmoid()  # (N, P)
    numerator = 2 * (probs * targets).sum(-1)  # (N,)
    denominator = probs.sum(-1) + targets.sum(-1)  # (N,)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def mask_losses(
    pred_masks,
    tgt_masks,
    num_masks,
    *,
    num_points=12544,
    oversample_ratio=3.0,
    importance_ratio=0.75,
    generator=None,
):
    """Unweighted {"bce": ..., "dice": ...} of matched pairs of masks.

    Args:
        pred_masks: (N, h, w) or (N, T, h, w) mask logits, already matched to `tgt_masks`.
        tgt_masks: (N, H, W) or (N, T, H, W) target masks, bool or float in [0, 1].
        num_masks: normaliser, the number of target masks in the batch, at least 1.
        num_points: points per mask (per frame for video), chosen by importance sampling on the
            predictions (Mask2Former criterion.py `loss_masks`). None uses whole masks, with the
            predictions bilinearly resized to the target size.
        generator: optional torch.Generator for the points.

    For video the points are sampled per (object, frame) and an object's frames are concatenated,
    so BCE and dice are taken over its whole tube, (N, T*P) (VITA vita_criterion.py).
    """
    pred = _as_tubes(pred_masks, "pred_masks")  # (N, T, h, w)
    tgt = _as_tubes(tgt_masks, "tgt_masks").to(pred.device, torch.float32)  # (N, T, H, W)
    if pred.shape[:2] != tgt.shape[:2]:
        raise ValueError(
            f"pred_masks {tuple(pred_masks.shape)} and tgt_masks {tuple(tgt_masks.shape)} must "
            f"agree in N and T"
        )
    num_frames = pred.shape[1]
    pred_frames = rearrange(pred, "n t h w -> (n t) 1 h w")  # (N*T, 1, h, w)
    tgt_frames = rearrange(tgt, "n t h w -> (n t) 1 h w")  # (N*T, 1, H, W)
    if num_points is None:
        logits = F.interpolate(pred_frames, tgt.shape[-2:], mode="bilinear",
                               align_corners=False)  # (N*T, 1, H, W)
        logits = rearrange(logits, "(n t) 1 h w -> n (t h w)", t=num_frames)  # (N, T*H*W)
        labels = rearrange(tgt_frames, "(n t) 1 h w -> n (t h w)", t=num_frames)  # (N, T*H*W)
    else:
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                pred_frames.float(),
                num_points,
                oversample_ratio=oversample_ratio,
                importance_ratio=importance_ratio,
                generator=generator,
            )  # (N*T, P, 2)
            labels = point_sample(tgt_frames, coords)  # (N*T, 1, P)
        logits = point_sample(pred_frames, coords)  # (N*T, 1, P)
        logits = rearrange(logits, "(n t) 1 p -> n (t p)", t=num_frames)  # (N, T*P)
        labels = rearrange(labels, "(n t) 1 p -> n (t p)", t=num_frames)  # (N, T*P)
    logits = logits.float()
    return {"bce": sigmoid_bce_loss(logits, labels, num_masks),
            "dice": dice_loss(logits, labels, num_masks)}


def classification_loss(pred_logits, targets, indices, *, no_object_weight):
    """Cross-entropy of (B, Q, C) class logits; matched queries take their target's label, the
    others the no-object class (the last one), whose weight is `no_object_weight`.

    The result is the weighted mean of F.cross_entropy(..., weight): sum_i w[y_i] * CE_i divided
    by sum_i w[y_i] over all B * Q queries (DETR/Mask2Former `loss_labels` with `empty_weight`).
    """
    batch_size, num_queries, num_classes = pred_logits.shape
    batch_idx, pred_idx = matched_pred_index(indices)
    device = pred_logits.device
    # (M,)
    matched_labels = torch.cat([t["labels"][tgt_idx] for t, (_, tgt_idx) in zip(targets, indices)])
    classes = torch.full((batch_size, num_queries), num_classes - 1, dtype=torch.long,
                         device=device)  # (B, Q)
    classes[batch_idx.to(device), pred_idx.to(device)] = matched_labels.to(device)
    weight = torch.ones(num_classes, device=device)  # (C,)
    weight[-1] = no_object_weight
    return F.cross_entropy(rearrange(pred_logits.float(), "b q c -> b c q"), classes, weight=weight)


# ------------------------------------------------------------------------------- the set loss
def set_losses(outputs, targets, *, w_cls, w_bce, w_dice, no_object_weight, num_points, num_masks):
    """Mask2Former's set loss with deep supervision, for image masks (Q, h, w) and video tubes
    (Q, T, h, w) alike: for the final prediction of `outputs` and each of its "aux_outputs",
    Hungarian matching (cost weights w_*), then CE, BCE and dice (Mask2Former criterion.py).
    Returns ({"ce", "bce", "dice"} each summed over the predictions, unweighted; the final
    prediction's matching)."""
    terms = {"ce": 0.0, "bce": 0.0, "dice": 0.0}
    for i, out in enumerate([outputs, *outputs["aux_outputs"]]):
        indices = hungarian_match(out["pred_logits"], out["pred_masks"], targets, w_cls=w_cls,
                                  w_bce=w_bce,
                                  w_dice=w_dice, num_points=num_points)
        if i == 0:
            final_indices = indices
        terms["ce"] = terms["ce"] + classification_loss(out["pred_logits"], targets, indices,
                                                        no_object_weight=no_object_weight)
        # (M, [T,] h, w), (M, [T,] H, W)
        preds, masks = matched_masks(out["pred_masks"], targets, indices)
        mask_terms = mask_losses(preds, masks, num_masks, num_points=num_points)
        terms["bce"], terms["dice"] = terms["bce"] + mask_terms["bce"], \
            terms["dice"] + mask_terms["dice"]
    return terms, final_indices


def visible_objects(targets):
    """Video targets [{"masks": (N, T, H, W), "labels": (N,), ...}] without the objects that
    appear in no frame of their clip (official VITA and DsHmp: `valid_bool_clip`)."""
    keep = [t["masks"].flatten(1).any(1) for t in targets]  # (N,) per clip
    return [{"masks": t["masks"][k], "labels": t["labels"][k]} for t, k in zip(targets, keep)]


def annotated_frames(outputs, frames=None):
    """The outputs of clips of which only one frame is annotated (A2D-Sentences) at that frame,
    `frames` (B,) its position in each clip, so that every loss reads only it, as ReferFormer's
    A2D training (wjn922/ReferFormer @ 06fc218, models/referformer.py: `valid_indices` keeps
    that frame's features): the video masks (B, M, T, h, w) -> (B, M, 1, h, w) of the final
    prediction and each aux_outputs, and every tensor of "frame_outputs" (per frame, (b t)
    order) -> its B annotated rows. None: `outputs` unchanged."""
    if frames is None:
        return outputs
    B, _, T = outputs["pred_masks"].shape[:3]
    frames = torch.as_tensor(frames, device=outputs["pred_masks"].device)  # (B,)
    batch = torch.arange(B, device=frames.device)  # (B,)

    def video(out):
        return {**out, "pred_masks": out["pred_masks"][batch, :, frames][:, :, None]}

    def per_frame(value):
        if isinstance(value, dict):
            return {k: per_frame(v) for k, v in value.items()}
        if isinstance(value, list):
            return [per_frame(v) for v in value]
        if value.shape[0] != B * T:
            raise ValueError(f"annotated_frames: expected frame outputs of {B} x {T} frames, got "
                             f"{tuple(value.shape)}")
        return value[batch * T + frames]  # (B, ...)

    selected = {**video(outputs), "aux_outputs": [video(a) for a in outputs["aux_outputs"]]}
    if "frame_outputs" in outputs:
        selected["frame_outputs"] = per_frame(outputs["frame_outputs"])
    return selected


def num_masks(targets, device) -> float:
    """Mask2Former's normaliser of the mask losses: the target masks of this process, averaged
    over the processes when a process group is up (all-reduced on `device`, the predictions'
    device, the one the group communicates on), at least 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n), 1.0)


def frame_targets(targets):
    """Video targets [{"masks": (N, T, H, W), "labels": (N,)}] -> per-frame targets in (b t) order,
    each holding the objects visible in that frame (a frame-level Mask2Former loss, DsHmp and VITA)
    and "objects" (N_t,), their indices among the clip's N (for VITA's similarity loss)."""
    per_frame = []
    for target in targets:
        for t in range(target["masks"].shape[1]):
            masks = target["masks"][:, t]  # (N, H, W)
            visible = masks.flatten(1).any(1)  # (N,)
            per_frame.append({"masks": masks[visible], "labels": target["labels"][visible],
                              "objects": visible.nonzero()[:, 0]})  # (N_t, H, W), (N_t,), (N_t,)
    return per_frame

