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

Run from the repository root:
    python tests/bench/toy_probe.py --checkpoint runs/dshmp-toy/last.pt
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


def coverage(pred: np.ndarray, obj: np.ndarray) -> float:
    """Share of the object's pixels (over all frames) inside the prediction; NaN for an empty object."""
    return float((pred & obj).sum() / obj.sum()) if obj.any() else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dshmp")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default="data/toy/mevis")
    parser.add_argument("--split", default="valid_u")
    args = parser.parse_args(argv)
    method = importlib.import_module(args.method)
    model, cfg = load_trained(args.checkpoint, method.Config, method.build_model, torch.device("cpu"))
    root, split_dir = Path(args.data_root), Path(args.data_root) / args.split
    read = lambda name: json.loads((split_dir / name).read_text())
    masks, objects = read("mask_dict.json"), read("toy_objects.json")["videos"]
    meta, motion_only = read("meta_expressions.json")["videos"], read("motion_only.json")["motion_only"]
    dataset = method.make_dataset(cfg, root, args.split, train=False)
    index = {(s["video"], s["exp_id"]): i for i, s in enumerate(dataset.samples)}
    rows = []
    for video, exp_ids in motion_only.items():
        look = {o["obj_id"]: (o["shape"], o["colour"], o["size"]) for o in objects[video]}
        obj_masks = {o["obj_id"]: np.stack([np.zeros(dataset[0]["orig_size"], bool) if r is None else
                                            rle_decode(r).astype(bool) for r in masks[o["anno_id"]]])
                     for o in objects[video]}
        for exp_id in exp_ids:
            item = dataset[index[video, exp_id]]
            pred = method.predict_masks(model, item["frames"], item["expression"], item["orig_size"],
                                        threshold=cfg.score_threshold, chunk=cfg.eval_chunk).numpy()
            targets = set(meta[video]["expressions"][exp_id]["obj_id"])
            wrong = [o for o in look if o not in targets and look[o] in {look[t] for t in targets}]
            target_mask = np.any([obj_masks[t] for t in targets], axis=0)  # (T, H0, W0)
            wrong_mask = np.any([obj_masks[o] for o in wrong], axis=0)
            target_cov, wrong_cov = coverage(pred, target_mask), coverage(pred, wrong_mask)
            tokens = []
            if hasattr(model, "infer"):  # every video token's own mask, kept or not
                logits, masks_t = model.infer(item["frames"], item["expression"], chunk=cfg.eval_chunk)
                H, W = item["frames"].shape[-2:]
                up = torch.nn.functional.interpolate(masks_t, size=(H + -H % 32, W + -W % 32), mode="bilinear")
                up = torch.nn.functional.interpolate(up[..., :H, :W], size=tuple(item["orig_size"]), mode="bilinear")
                for m, score in zip((up > 0).numpy(), logits.softmax(-1)[:, 0].tolist()):
                    tokens.append({"score": score, "target": coverage(m, target_mask), "look_alikes": coverage(m, wrong_mask)})
            kind = {(True, False): "target only", (True, True): "both", (False, True): "look-alike only",
                    (False, False): "neither"}[(target_cov >= 0.5, wrong_cov >= 0.5)]
            separating = [t for t in tokens if t["target"] >= 0.5 and t["look_alikes"] < 0.5]
            rows.append({"key": f"{video}/{exp_id}", "expression": item["expression"], "target": target_cov,
                         "look_alikes": wrong_cov, "kind": kind, "separating_tokens": len(separating),
                         "best_separating_score": max((t["score"] for t in separating), default=None),
                         "tokens": tokens})
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("target only", "both", "look-alike only", "neither")}
    summary = {"checkpoint": args.checkpoint, "expressions": len(rows), "counts": counts,
               "mean_target_coverage": float(np.nanmean([r["target"] for r in rows])),
               "mean_look_alike_coverage": float(np.nanmean([r["look_alikes"] for r in rows])),
               "expressions_with_a_separating_token": sum(r["separating_tokens"] > 0 for r in rows),
               "separating_tokens_kept": sum(r["best_separating_score"] is not None and
                                             r["best_separating_score"] > cfg.score_threshold for r in rows)}
    out = Path(args.checkpoint).parent / "probe.json"
    out.write_text(json.dumps({**summary, "per_expression": rows}, indent=1))
    print(json.dumps(summary, indent=1), f"-> {out}")


if __name__ == "__main__":
    main()
