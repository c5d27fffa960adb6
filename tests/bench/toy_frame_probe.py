"""Do DsHmp's frame tokens keep the look-alikes apart? On every motion-only expression of the toy
split, Mask2Former runs on each frame with the expression's static queries (what HMP receives);
in each frame where a target and one of its look-alikes are both visible, a frame query
"separates" the target if its mask covers at least half of the target and less than half of every
look-alike, and the other way round. Reports, averaged over the expressions: the share of such
frames with a query separating the target, with one separating a look-alike, and what the
best-scoring query holds. If the frame queries held both look-alikes as one object, HMP could not
see either one move; if they keep them apart, the motion is lost after them.

Run from the repository root:
    python tests/bench/toy_frame_probe.py --checkpoint runs/dshmp-toy/last.pt
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dshmp  # noqa: E402
from common.datasets import MeViS  # noqa: E402
from common.run import load_trained  # noqa: E402
from data.toy import look_alikes  # noqa: E402
from toy_probe import object_masks  # noqa: E402


def frame_shares(model, frames, expression, targets, look_alikes):
    """frames (T, 3, H, W) at the masks' size; targets / look_alikes: {obj_id: (T, H, W) bool}.
    Returns the four per-frame shares of one expression, or None when no frame shows both kinds."""
    T, (H, W) = len(frames), frames.shape[-2:]
    with torch.no_grad():
        text = model.encode_text([expression])
        queries = model.static_queries(text)  # (1, Q, C)
        frame_text = dshmp.Text(*(x.expand(T, *x.shape[1:]) for x in text))
        out, _ = model.segment_frames(frames, queries.expand(T, -1, -1), frame_text)
    masks = F.interpolate(out["pred_masks"], size=(H, W), mode="bilinear") > 0  # (T, Q, H, W)
    scores = out["pred_logits"].softmax(-1)[..., 0]  # (T, Q)
    counts, n = np.zeros(4), 0
    for t in range(T):
        def best_cover(objects):  # (Q,) the most any visible one of `objects` is covered
            seen = [m[t] for m in objects.values() if m[t].sum() > 10]
            return torch.stack([(masks[t] & m).flatten(1).sum(1) / m.sum() for m in seen]).amax(0) \
                if seen else None
        target, alike = best_cover(targets), best_cover(look_alikes)
        if target is None or alike is None:
            continue
        top = scores[t].argmax()
        counts += [bool(((target > 0.5) & (alike < 0.5)).any()), bool(((alike > 0.5) & (target < 0.5)).any()),
                   bool(target[top] > 0.5 and alike[top] < 0.5), bool(target[top] > 0.5 and alike[top] > 0.5)]
        n += 1
    return counts / n if n else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default="data/toy/mevis")
    parser.add_argument("--split", default="valid_u")
    args = parser.parse_args(argv)
    model, cfg = load_trained(Path(args.checkpoint), dshmp.Config, dshmp.build_model, torch.device("cpu"))
    model.eval()
    root = Path(args.data_root) / args.split
    read = lambda name: json.loads((root / name).read_text())
    meta, objects, rles = read("meta_expressions.json")["videos"], read("toy_objects.json")["videos"], \
        read("mask_dict.json")
    dataset = MeViS(args.data_root, args.split, train=False, short_side=cfg.short_side, max_size=cfg.max_size)
    index = {(s["video"], s["exp_id"]): i for i, s in enumerate(dataset.samples)}
    shares = []
    for video, exp_ids in read("motion_only.json")["motion_only"].items():
        for exp_id in exp_ids:
            expression = meta[video]["expressions"][exp_id]
            item = dataset[index[(video, exp_id)]]
            size = tuple(item["frames"].shape[-2:])
            masks = object_masks(rles, objects[video], item["orig_size"])  # {obj_id: (T, H0, W0)}
            def gt(i):  # (T, h, w) bool at the model's input size
                return F.interpolate(torch.as_tensor(masks[i])[:, None].float(), size=size)[:, 0] > 0.5
            targets = set(expression["obj_id"])
            alike = [o["obj_id"] for o in look_alikes(objects[video], targets) if o["obj_id"] not in targets]
            share = frame_shares(model, item["frames"], expression["exp"], {t: gt(t) for t in targets},
                                 {a: gt(a) for a in alike})
            if share is not None:
                shares.append(share)
    mean = np.mean(shares, 0)
    summary = {"checkpoint": args.checkpoint, "expressions": len(shares),
               "frames_with_a_query_separating_the_target": float(mean[0]),
               "frames_with_a_query_separating_a_look_alike": float(mean[1]),
               "best_query_holds_the_target_only": float(mean[2]),
               "best_query_holds_target_and_look_alike": float(mean[3])}
    out = Path(args.checkpoint).parent / "frame_probe.json"
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), f"-> {out}")


if __name__ == "__main__":
    main()
