"""What a trained toy model does on the motion-only expressions: how much of the target and how
much of its wrong look-alike(s) the prediction covers.

For every motion-only expression of the toy split (some object it does not refer to looks exactly
like a target), the method's own inference rule predicts the masks; the coverage of an object is
the share of its pixels, over all frames, that the prediction covers. Each expression is then
counted as: target only (target >= 0.5, look-alikes < 0.5), both (the model followed appearance,
not motion), look-alike only (motion read wrong) or neither. Writes <out>/probe.json.

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
            target_cov = coverage(pred, np.any([obj_masks[t] for t in targets], axis=0))
            wrong_cov = coverage(pred, np.any([obj_masks[o] for o in wrong], axis=0))
            kind = {(True, False): "target only", (True, True): "both", (False, True): "look-alike only",
                    (False, False): "neither"}[(target_cov >= 0.5, wrong_cov >= 0.5)]
            rows.append({"key": f"{video}/{exp_id}", "expression": item["expression"], "target": target_cov,
                         "look_alikes": wrong_cov, "kind": kind})
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("target only", "both", "look-alike only", "neither")}
    summary = {"checkpoint": args.checkpoint, "expressions": len(rows), "counts": counts,
               "mean_target_coverage": float(np.nanmean([r["target"] for r in rows])),
               "mean_look_alike_coverage": float(np.nanmean([r["look_alikes"] for r in rows]))}
    out = Path(args.checkpoint).parent / "probe.json"
    out.write_text(json.dumps({**summary, "per_expression": rows}, indent=1))
    print(json.dumps(summary, indent=1), f"-> {out}")


if __name__ == "__main__":
    main()
