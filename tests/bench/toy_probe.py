"""What a trained toy model does on the motion-only expressions: how much of the target and how
much of its wrong look-alike(s) the prediction covers.

For every motion-only expression of the toy split (some object it does not refer to looks exactly
like a target), the method's own inference rule predicts the masks; the coverage of an object is
the share of its pixels, over all frames, that the prediction covers. Each expression is then
counted as: target only (target >= 0.5, look-alikes < 0.5), both (the model followed appearance,
not motion), look-alike only (motion read wrong) or neither. For DsHmp it also looks at every
video token, kept or not: does any token's mask hold the target without its look-alike (the mask
head can separate them, and the scores pick the wrong tokens), or none (the masks themselves
cannot)? Writes <checkpoint folder>/probe.json.

With --linear-probe (DsHmp) it also asks whether the video tokens hold what the class head would
need: a logistic regression on the final video tokens (the class head's input), fitted on the
train split's motion-only expressions to tell tokens that hold only the target (1) from tokens
that hold only a look-alike (0), then scored on this split against the class head's own scores
(AUC over tokens, and per expression whether the best target-only token outranks every
look-alike-only one). A probe that separates where the class head does not says the tokens know
which track the words mean and the training signal does not reach the score; a probe that fails
too says the tokens do not carry the match. Two more probes ask whether a token knows its own
object's motion at all: from the token to the left / right direction of the one object its mask
holds, and to whether that object moves (accuracy against the majority class).

Run from the repository root:
    python tests/bench/toy_probe.py --checkpoint runs/dshmp-toy/last.pt [--linear-probe]
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common.coco_mask import rle_decode  # noqa: E402
from common.run import load_trained  # noqa: E402
from data.toy import look_alikes  # noqa: E402


def coverage(pred: np.ndarray, obj: np.ndarray) -> float:
    """Share of the object's pixels (over all frames) inside the prediction; NaN for an empty object."""
    return float((pred & obj).sum() / obj.sum()) if obj.any() else float("nan")


def auc(positive, negative) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size)) if p.size and n.size else float("nan")


def fit_logistic(x, y, steps=500, weight_decay=1e-3):
    """A class-balanced logistic regression (full-batch LBFGS) on standardised features; returns
    a function from features to logits."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    pos_weight = (1 - y).sum() / y.sum().clamp(min=1)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = ((x - mean) / std) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        loss = loss + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda f: (((torch.as_tensor(f, dtype=torch.float32) - mean) / std) @ w + b).detach().numpy()


def probe_split(method, model, cfg, root, split, *, features=False, limit=None):
    """One row per motion-only expression of `split` (the first `limit` videos' when given):
    coverages of the prediction and, for DsHmp, of every video token (with the token's final
    feature when `features`)."""
    split_dir = Path(root) / split
    read = lambda name: json.loads((split_dir / name).read_text())
    masks, objects = read("mask_dict.json"), read("toy_objects.json")["videos"]
    meta, motion_only = read("meta_expressions.json")["videos"], read("motion_only.json")["motion_only"]
    dataset = method.make_dataset(cfg, root, split, train=False)
    captured = []  # with features: the class head's input, the final video tokens (1, M, C)
    hook = model.class_head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0])) \
        if features else None
    index = {(s["video"], s["exp_id"]): i for i, s in enumerate(dataset.samples)}
    rows = []
    for video, exp_ids in list(motion_only.items())[:limit]:
        obj_masks = object_masks(masks, objects[video], dataset[0]["orig_size"])
        for exp_id in exp_ids:
            item = dataset[index[video, exp_id]]
            pred = method.predict_masks(model, item["frames"], item["expression"], item["orig_size"],
                                        cfg).numpy()
            targets = set(meta[video]["expressions"][exp_id]["obj_id"])
            wrong = [o["obj_id"] for o in look_alikes(objects[video], targets) if o["obj_id"] not in targets]
            target_mask = np.any([obj_masks[t] for t in targets], axis=0)  # (T, H0, W0)
            wrong_mask = np.any([obj_masks[o] for o in wrong], axis=0)
            target_cov, wrong_cov = coverage(pred, target_mask), coverage(pred, wrong_mask)
            tokens = []
            if hasattr(model, "infer"):  # every video token's own mask, kept or not
                captured.clear()
                logits, masks_t = model.infer(item["frames"], item["expression"], chunk=cfg.eval_chunk)
                token_feats = captured[-1][0].numpy() if features else None  # (M, C)
                H, W = item["frames"].shape[-2:]
                up = torch.nn.functional.interpolate(masks_t, size=(H + -H % 32, W + -W % 32), mode="bilinear")
                up = torch.nn.functional.interpolate(up[..., :H, :W], size=tuple(item["orig_size"]), mode="bilinear")
                for k, (m, score) in enumerate(zip((up > 0).numpy(), logits.softmax(-1)[:, 0].tolist())):
                    tokens.append({"score": score, "target": coverage(m, target_mask),
                                   "look_alikes": coverage(m, wrong_mask),
                                   **({"feature": token_feats[k], "direction": held_direction(m, obj_masks),
                                       "moving": held_moving(m, obj_masks)} if features else {})})
            kind = {(True, False): "target only", (True, True): "both", (False, True): "look-alike only",
                    (False, False): "neither"}[(target_cov >= 0.5, wrong_cov >= 0.5)]
            separating = [t for t in tokens if t["target"] >= 0.5 and t["look_alikes"] < 0.5]
            rows.append({"key": f"{video}/{exp_id}", "expression": item["expression"], "target": target_cov,
                         "look_alikes": wrong_cov, "kind": kind, "separating_tokens": len(separating),
                         "best_separating_score": max((t["score"] for t in separating), default=None),
                         "tokens": tokens})
    if hook is not None:
        hook.remove()
    return rows


def object_masks(rles, objects, size):
    """{obj_id: (T, H, W) bool} the ground-truth masks of a toy video's objects (mask_dict.json's
    RLEs; an empty frame where an object is not in view)."""
    return {o["obj_id"]: np.stack([np.zeros(size, bool) if r is None else rle_decode(r).astype(bool)
                                   for r in rles[o["anno_id"]]]) for o in objects}


def held_object(mask, obj_masks):
    """The masks (T, H, W) of the one object a token's mask holds (coverage >= 0.5 of it, < 0.5 of
    every other), or None."""
    held = [o for o, m in obj_masks.items() if coverage(mask, m) >= 0.5]
    return obj_masks[held[0]] if len(held) == 1 else None


def held_direction(mask, obj_masks, min_shift=3.0):
    """The horizontal direction of the one object a token's mask holds: 1 right, 0 left (its
    centroid moves > min_shift pixels between its first and last visible frame), None otherwise
    (no single object, or no clear left/right)."""
    held = held_object(mask, obj_masks)
    if held is None:
        return None
    frames = [np.nonzero(m)[1].mean() for m in held if m.any()]  # centroid x per frame
    shift = frames[-1] - frames[0] if len(frames) > 1 else 0.0
    return None if abs(shift) <= min_shift else int(shift > 0)


def held_moving(mask, obj_masks, min_shift=3.0):
    """Whether the one object a token's mask holds moves: 1 when its centroid gets more than
    min_shift pixels away from where it first shows, 0 when it never leaves by half a pixel (a
    still toy object), None otherwise. Unlike left / right, this does not depend on time's order."""
    held = held_object(mask, obj_masks)
    if held is None:
        return None
    centroids = np.array([[np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()] for m in held if m.any()])
    reach = np.linalg.norm(centroids - centroids[0], axis=1).max()
    return 1 if reach > min_shift else 0 if reach < 0.5 else None


def motion_probe(train_rows, rows, key):
    """Does a video token know its own object's motion? A logistic regression from the final video
    token to `key` of the one object its mask holds ("direction": left / right, "moving": moves at
    all), fitted on train_rows' tokens, accuracy and AUC on rows' tokens (every token of the
    motion-only expressions, kept or not)."""
    def pairs(rs):
        return [(t["feature"], t[key]) for r in rs for t in r["tokens"] if t[key] is not None]
    train, test = pairs(train_rows), pairs(rows)
    probe = fit_logistic(np.stack([f for f, _ in train]), np.array([y for _, y in train]))
    logits = probe(np.stack([f for f, _ in test]))
    truth = np.array([y for _, y in test], dtype=bool)
    return {"train_tokens": len(train), "test_tokens": len(test), "accuracy": float(((logits > 0) == truth).mean()),
            "majority_class": float(max(truth.mean(), 1 - truth.mean())),
            "auc": auc(logits[truth], logits[~truth])}  # the probe is class-balanced: AUC 0.5 = chance


def token_label(token):
    """1: holds only the target, 0: holds only a look-alike, None: anything else."""
    if token["target"] >= 0.5 and token["look_alikes"] < 0.5:
        return 1
    if token["look_alikes"] >= 0.5 and token["target"] < 0.5:
        return 0
    return None


def linear_probe(train_rows, rows):
    """Fits the probe on train_rows' labelled tokens; compares it with the class head on rows."""
    train = [(t["feature"], token_label(t)) for r in train_rows for t in r["tokens"] if token_label(t) is not None]
    probe = fit_logistic(np.stack([f for f, _ in train]), np.array([y for _, y in train]))
    result = {"train_tokens": len(train), "train_target_only_tokens": int(sum(y for _, y in train))}
    for name, score in (("class_head", lambda ts: np.array([t["score"] for t in ts])),
                        ("linear_probe", lambda ts: probe(np.stack([t["feature"] for t in ts])))):
        pos, neg, wins, ranked = [], [], 0, 0
        for r in rows:
            s, labels = score(r["tokens"]), [token_label(t) for t in r["tokens"]]
            p = [v for v, y in zip(s, labels) if y == 1]
            n = [v for v, y in zip(s, labels) if y == 0]
            pos += p
            neg += n
            if p and n:
                ranked += 1
                wins += int(max(p) > max(n))
        result[name] = {"auc": auc(pos, neg), "best_target_token_above_every_look_alike_token": wins,
                        "expressions_with_both_kinds": ranked}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dshmp")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default="data/toy/mevis")
    parser.add_argument("--split", default="valid_u")
    parser.add_argument("--linear-probe", action="store_true", help="also fit a probe on the train split's tokens")
    parser.add_argument("--probe-videos", type=int, default=120, help="train videos the linear probe is fitted on")
    args = parser.parse_args(argv)
    method = importlib.import_module(args.method)
    model, cfg = load_trained(args.checkpoint, method.Config, method.build_model, torch.device("cpu"))
    rows = probe_split(method, model, cfg, args.data_root, args.split, features=args.linear_probe)
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("target only", "both", "look-alike only", "neither")}
    summary = {"checkpoint": args.checkpoint, "expressions": len(rows), "counts": counts,
               "mean_target_coverage": float(np.nanmean([r["target"] for r in rows])),
               "mean_look_alike_coverage": float(np.nanmean([r["look_alikes"] for r in rows])),
               "expressions_with_a_separating_token": sum(r["separating_tokens"] > 0 for r in rows),
               "separating_tokens_kept": sum(r["best_separating_score"] is not None and
                                             r["best_separating_score"] > cfg.score_threshold for r in rows)}
    if args.linear_probe:
        print("train split tokens for the linear probe ...", flush=True)
        train_rows = probe_split(method, model, cfg, args.data_root, "train", features=True,
                                 limit=args.probe_videos)
        summary["linear_probe"] = linear_probe(train_rows, rows)
        summary["direction_probe"] = motion_probe(train_rows, rows, "direction")
        summary["moving_probe"] = motion_probe(train_rows, rows, "moving")
        for r in rows:
            for t in r["tokens"]:
                for key in ("feature", "direction", "moving"):
                    t.pop(key)
    out = Path(args.checkpoint).parent / "probe.json"
    out.write_text(json.dumps({**summary, "per_expression": rows}, indent=1))
    print(json.dumps(summary, indent=1), f"-> {out}")


if __name__ == "__main__":
    main()
