"""What DMVS can reach with its frozen VITA: J&F on the toy valid_u when an oracle picks the
video queries instead of DMVS. A video query counts as on target when it predicts a non-empty tube
of which more than half lies in the expression's ground truth; the oracle's prediction is the
union of the on-target queries among all V video queries, and among the N_m that Eq. (7) keeps
(TopK by VITA's class score), which is all DMVS can choose from. Also: how often an expression
has an on-target query at all, and DMVS's own score on the same expressions.

Run from the repository root, after a toy run:
    python tests/bench/dmvs_oracle.py --checkpoint runs/dmvs-toy/last.pt
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dmvs  # noqa: E402
from common.metrics import VideoMetrics  # noqa: E402
from common.run import load_trained, video_query_masks  # noqa: E402
from data.toy import motion_only_keys  # noqa: E402


class Selected(torch.nn.Module):
    """`video_query_masks`'s model: the given video queries' masks, the chosen ones scored 1."""

    def __init__(self, masks, chosen):
        super().__init__()
        self.masks, self.chosen = masks, chosen

    def infer(self, frames, expression, *, chunk):
        logits = torch.stack([self.chosen.float() * 20 - 10, torch.zeros(len(self.chosen))], 1)
        return logits, self.masks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/dmvs-toy/last.pt")
    parser.add_argument("--data-root", default="data/toy/mevis")
    parser.add_argument("--split", default="valid_u")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, cfg = load_trained(args.checkpoint, dmvs.Config, dmvs.build_model, torch.device("cpu"))
    dataset = dmvs.make_dataset(cfg, Path(args.data_root), args.split, train=False)
    motion_only = motion_only_keys(args.data_root, args.split).get("motion_only", set())
    names = ("all V queries", f"TopK N_m = {cfg.num_motion_queries}", "DMVS")
    metrics = {name: {"all": VideoMetrics(), "motion_only": VideoMetrics()} for name in names}
    reachable = {"all V queries": 0, names[1]: 0}
    cache = {}
    for i in range(len(dataset)):
        item = dataset[i]
        frames, size = item["frames"], item["orig_size"]
        if item["video"] not in cache:  # VITA's queries depend on the video only
            fq, fm, mf = [], [], []
            for part in frames.split(cfg.eval_chunk):
                H, W = part.shape[-2:]
                out, feats = model.vita.segment_frames(torch.nn.functional.pad(part, (0, -W % 32, 0, -H % 32)))
                fq.append(out["query_embeds"][-1])
                fm.append(out["pred_masks"])
                mf.append(feats)
            out = model.vita.decode_video(torch.cat(fq)[None], torch.cat(mf)[None])
            found = model.instances(torch.cat(fq)[None], torch.cat(fm)[None], out)
            masks = out["pred_masks"][0]  # (V, T, h, w)
            tubes = [video_query_masks(Selected(masks, torch.arange(len(masks)) == q), frames, "", size, threshold=0.5,
                                   chunk=cfg.eval_chunk) for q in range(len(masks))]  # V x (T, H0, W0)
            topk = found.scores[0].topk(cfg.num_motion_queries).indices
            cache = {item["video"]: (masks, tubes, torch.isin(torch.arange(len(masks)), topk))}
        masks, tubes, in_topk = cache[item["video"]]
        gt = item["gt"]
        on_target = torch.tensor([bool(t.any()) and (t & gt).sum() > 0.5 * t.sum() for t in tubes])
        key = f"{item['video']}/{item['exp_id']}"
        predictions = {"all V queries": on_target, names[1]: on_target & in_topk}
        for name, chosen in predictions.items():
            reachable[name] += bool(chosen.any())
            pred = video_query_masks(Selected(masks, chosen), frames, "", size, threshold=0.5, chunk=cfg.eval_chunk)
            for subset in ("all", "motion_only") if key in motion_only else ("all",):
                metrics[name][subset].add(pred, gt, key)
        pred = dmvs.predict_masks(model, frames, item["expression"], size, cfg)
        for subset in ("all", "motion_only") if key in motion_only else ("all",):
            metrics["DMVS"][subset].add(pred, gt, key)
    result = {name: {subset: m.summary() for subset, m in per.items()} for name, per in metrics.items()}
    result["expressions_with_an_on_target_query"] = {k: f"{v}/{len(dataset)}" for k, v in reachable.items()}
    print(json.dumps(result, indent=1))
    out = Path(args.checkpoint).parent / "oracle.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
