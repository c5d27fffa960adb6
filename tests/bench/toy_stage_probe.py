"""Where does DsHmp lose whether an object moves? The same probe at each stage of the video path.

On the motion-only expressions of the toy split, the model runs as at test time. Mask2Former's
frame tokens O are put into trajectories by HMP's own Eq. (3) alignment; a trajectory, or a video
token, "holds" an object when its masks over the clip cover at least half of that object and less
than half of every other (toy_probe.held_object). For every trajectory or video token holding
one object that clearly moves or clearly stays still (toy_probe.held_moving: a question that
needs no arrow of time), a class-balanced logistic regression is fitted on the train split's
expressions and scored on this split (AUC, 0.5 = chance), from:
  frame tokens, mean over frames    what O holds, pooled over time
  frame tokens, std over frames     how much O changes over the clip (a summary of ours: it
                                    measures whether the motion is there to be read at all)
  HMP output, mean over frames      what HMP hands the Motion Decoder, pooled over time
  HMP output, std over frames
  video tokens                      the class head's input (as toy_probe's moving probe)
and, as a check of capacity rather than of training, a fresh HMP of the same size trained
directly on moving / still from the frozen frame tokens (`fit_hmp`). A motion is a change of
position, so it also asks whether a per-frame token (before and after HMP) says where its object
is: a ridge regression to the object's centroid, R^2 on this split (`position_r2`).
If the frame tokens' change tells moving from still and the later stages do not, the motion is
in what HMP receives and lost in HMP and the Motion Decoder. Writes <checkpoint folder>/stage_probe.json.

Run from the repository root:
    python tests/bench/toy_stage_probe.py --checkpoint runs/dshmp-toy/last.pt
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
from common.run import load_trained  # noqa: E402
from toy_probe import auc, fit_logistic, held_moving, held_object, object_masks  # noqa: E402

STAGES = ("frame_tokens_mean", "frame_tokens_std", "hmp_mean", "hmp_std", "video_tokens")


def masks_at(logits, size):
    """(N, T, h, w) mask logits -> (N, T, H, W) bool at the ground truth's size."""
    return F.interpolate(logits, size=size, mode="bilinear") > 0


@torch.no_grad()
def stage_features(model, frames, expression, orig_size):
    """One expression through DsHmp.infer's steps (the toy clip is one chunk). Returns, per stage,
    a list of (feature, mask tube (T, H0, W0) bool) pairs: one per trajectory, one per video token;
    and under "inputs" what HMP receives (the aligned tokens (T, Q, C), the words and motion mask)
    and what it returns ("hmp", (T, Q, C))."""
    text = model.encode_text([expression])
    T = len(frames)
    frame_text = dshmp.Text(*(x.expand(T, *x.shape[1:]) for x in text))
    out, feats = model.segment_frames(frames, model.static_queries(text).expand(T, -1, -1), frame_text)
    tokens = out["query_embeds"][-1][None]  # (1, T, Q, C): O
    perm = dshmp.align_tokens(tokens)[0]  # (T, Q), Eq. (3)
    aligned = torch.gather(tokens[0], 1, perm[..., None].expand(-1, -1, tokens.shape[-1]))  # (T, Q, C)
    tubes = torch.gather(out["pred_masks"], 1, perm[..., None, None].expand(-1, -1, *out["pred_masks"].shape[-2:]))
    tubes = masks_at(tubes.transpose(0, 1), orig_size).numpy()  # (Q, T, H0, W0), trajectory order
    hmp_in = model.frame_tokens(out)[None]  # O, plus its position with --token-position
    hmp = model.motion_perception(hmp_in, text.cues, text.motion_mask)[0]  # (T, Q, C), trajectory order
    captured = []
    hook = model.class_head.register_forward_hook(lambda m, inputs, output: captured.append(inputs[0]))
    video = model.decode_video(hmp_in, feats[None], text)
    hook.remove()
    video_tubes = masks_at(video["pred_masks"][0], orig_size).numpy()  # (M, T, H0, W0)
    per_traj = lambda x: [x[:, q] for q in range(x.shape[1])]  # noqa: E731
    inputs = {"tokens": aligned, "words": text.cues[0], "motion_mask": text.motion_mask[0], "hmp": hmp}
    stages = {"frame_tokens_mean": list(zip([a.mean(0) for a in per_traj(aligned)], tubes)),
              "frame_tokens_std": list(zip([a.std(0) for a in per_traj(aligned)], tubes)),
              "hmp_mean": list(zip([h.mean(0) for h in per_traj(hmp)], tubes)),
              "hmp_std": list(zip([h.std(0) for h in per_traj(hmp)], tubes)),
              "video_tokens": list(zip(captured[-1][0], video_tubes))}
    return inputs, stages


def collect(model, cfg, root, split, limit=None):
    """Over the motion-only expressions of `split` (its first `limit` videos): {stage: [(feature,
    moving)]}; per expression HMP's inputs with each trajectory's label (1 / 0, -1: none); and
    {"frame_tokens" / "hmp": [(per-frame token, (x, y) of the held object's centroid in [0, 1])]}."""
    split_dir = Path(root) / split
    read = lambda name: json.loads((split_dir / name).read_text())  # noqa: E731
    rles, objects = read("mask_dict.json"), read("toy_objects.json")["videos"]
    motion_only = read("motion_only.json")["motion_only"]
    dataset = dshmp.make_dataset(cfg, root, split, train=False)
    index = {(s["video"], s["exp_id"]): i for i, s in enumerate(dataset.samples)}
    pairs, expressions, positions = {stage: [] for stage in STAGES}, [], {"frame_tokens": [], "hmp": []}
    for video, exp_ids in list(motion_only.items())[:limit]:
        size = tuple(dataset[index[video, exp_ids[0]]]["orig_size"])
        obj_masks = object_masks(rles, objects[video], size)
        for exp_id in exp_ids:
            item = dataset[index[video, exp_id]]
            inputs, stages = stage_features(model, item["frames"], item["expression"], size)
            tubes = [tube for _, tube in stages["hmp_mean"]]
            trajectories = [held_moving(tube, obj_masks) for tube in tubes]  # (Q,)
            for q, tube in enumerate(tubes):  # where the held object is, frame by frame
                held = held_object(tube, obj_masks)
                for t in range(len(tube)) if held is not None else ():
                    if held[t].any():
                        ys, xs = np.nonzero(held[t])
                        where = (xs.mean() / size[1], ys.mean() / size[0])
                        positions["frame_tokens"].append((inputs["tokens"][t, q].numpy(), where))
                        positions["hmp"].append((inputs["hmp"][t, q].numpy(), where))
            for stage, rows in stages.items():
                labels = trajectories if stage != "video_tokens" else [held_moving(t, obj_masks) for _, t in rows]
                pairs[stage] += [(f.numpy(), y) for (f, _), y in zip(rows, labels) if y is not None]
            expressions.append({**inputs, "labels": torch.tensor([-1 if y is None else y for y in trajectories])})
    return pairs, expressions, positions


def position_r2(train, test, ridge=1.0):
    """How well a linear read-out of a per-frame token gives where its object is: ridge regression
    from the standardised token to the (x, y) centroid, fitted on `train`, R^2 on `test` (mean of
    x and y; 0 = no better than the mean position, below 0 worse), and R^2 on `train`."""
    x, y = np.stack([f for f, _ in train]), np.array([p for _, p in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    design = np.c_[(x - mean) / std, np.ones(len(x))]
    w = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ y)
    x_test, y_test = np.stack([f for f, _ in test]), np.array([p for _, p in test])
    pred = np.c_[(x_test - mean) / std, np.ones(len(x_test))] @ w
    r2 = lambda p, t: 1 - ((p - t) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)  # noqa: E731, (2,)
    test_r2 = r2(pred, y_test)
    return {"train": len(x), "test": len(x_test), "train_r2": float(r2(design @ w, y).mean()),
            "r2": float(test_r2.mean()), "r2_x": float(test_r2[0]), "r2_y": float(test_r2[1])}


def fit_hmp(cfg, train, test, *, epochs, seed=0):
    """Can HMP itself turn the frame tokens' change into a feature that survives pooling over
    time? A fresh HMP of the run's size, with a linear head on its output averaged over the
    frames, trained directly on moving / still (class-balanced BCE on the labelled trajectories of
    each train expression, Adam, lr 1e-3) from the frozen model's aligned frame tokens and words.
    Returns its AUC on the train expressions and on the test ones."""
    torch.manual_seed(seed)
    hmp = dshmp.HierarchicalMotionPerception(dim=cfg.dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim,
                                             num_blocks=cfg.hmp_blocks, num_stages=cfg.hmp_stages,
                                             window=cfg.window, hierarchical=True)
    head = torch.nn.Linear(cfg.dim, 1)
    optimizer = torch.optim.Adam([*hmp.parameters(), *head.parameters()], lr=1e-3)
    labels = torch.cat([e["labels"] for e in train])
    pos_weight = (labels == 0).sum() / (labels == 1).sum().clamp(min=1)

    def logits(e):  # (Q,) one score per trajectory of one expression
        out = hmp(e["tokens"][None], e["words"][None], e["motion_mask"][None])  # (1, T, Q, C)
        return head(out[0].mean(0))[:, 0]

    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(train), generator=order).tolist():
            keep = train[i]["labels"] >= 0
            if keep.any():
                loss = F.binary_cross_entropy_with_logits(logits(train[i])[keep], train[i]["labels"][keep].float(),
                                                          pos_weight=pos_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    hmp.eval()
    result = {"epochs": epochs}
    for name, expressions in (("train_auc", train), ("auc", test)):
        with torch.no_grad():
            scores = torch.cat([logits(e) for e in expressions]).numpy()
        truth = torch.cat([e["labels"] for e in expressions]).numpy()
        result[name] = auc(scores[truth == 1], scores[truth == 0])
    return result


def probe_checkpoint(checkpoint, args):
    """Every probe on one trained model; writes and returns its stage_probe.json."""
    model, cfg = load_trained(Path(checkpoint), dshmp.Config, dshmp.build_model, torch.device("cpu"))
    if not cfg.hmp:
        raise SystemExit(f"{checkpoint}: toy_stage_probe needs a model with HMP (trained without --no-hmp)")
    model.eval()
    train, train_expressions, train_positions = collect(model, cfg, args.data_root, "train", limit=args.probe_videos)
    test, test_expressions, test_positions = collect(model, cfg, args.data_root, args.split)
    summary = {"checkpoint": str(checkpoint)}
    for stage in STAGES:
        x, y = np.stack([f for f, _ in train[stage]]), np.array([m for _, m in train[stage]])
        probe = fit_logistic(x, y)
        logits, truth = probe(np.stack([f for f, _ in test[stage]])), np.array([m for _, m in test[stage]], bool)
        fitted = probe(x)
        summary[stage] = {"train": len(y), "train_moving": int(y.sum()), "test": len(truth),
                          "test_moving": int(truth.sum()), "train_auc": auc(fitted[y == 1], fitted[y == 0]),
                          "auc": auc(logits[truth], logits[~truth])}
    for stage in ("frame_tokens", "hmp"):
        summary[f"{stage}_position_r2"] = position_r2(train_positions[stage], test_positions[stage])
    if args.hmp_epochs:
        summary["fresh_hmp_trained_on_moving"] = fit_hmp(cfg, train_expressions, test_expressions,
                                                         epochs=args.hmp_epochs)
    out = Path(checkpoint).parent / "stage_probe.json"
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), f"-> {out}", flush=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, nargs="+", help="one or more runs' last.pt")
    parser.add_argument("--data-root", default="data/toy/mevis")
    parser.add_argument("--split", default="valid_u")
    parser.add_argument("--probe-videos", type=int, default=120, help="train videos the probes are fitted on")
    parser.add_argument("--hmp-epochs", type=int, default=5, help="epochs of the fresh HMP (0: skip it)")
    args = parser.parse_args(argv)
    runs = [probe_checkpoint(c, args) for c in args.checkpoint]
    if len(runs) > 1:  # mean ± std over the runs, one line per probe
        for key in [*STAGES, "fresh_hmp_trained_on_moving", "frame_tokens_position_r2", "hmp_position_r2"]:
            for name in ("train_auc", "auc", "train_r2", "r2"):
                values = [r[key][name] for r in runs if name in r.get(key, {})]
                if values:
                    print(f"{key} {name}: {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} "
                          f"({' / '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
