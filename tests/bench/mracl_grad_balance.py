"""How hard each MRaCL training term pulls: the gradient norm (over all parameters) of LAVT's
cross-entropy and of the contrastive term, each on its own, on the same toy batches (as train()
runs them: the partners through the encoder only), at initialisation or for a trained checkpoint,
on random training batches as train() draws them. The contrastive term has a gradient only in a
batch with at least two (sentence, verb phrase) pairs (with one, its block has no negative); the
summary counts those batches and gives the ratio of the two norms on them. The norms say how the
two terms compare in the gradient the optimiser receives, unweighted (train() multiplies the
contrastive term by --w-mracl), not how far a step moves: AdamW scales each parameter's step by
its own gradient history.

Run from the repository root:
    python tests/bench/mracl_grad_balance.py [--checkpoint runs/mracl-toy/last.pt] [--batches 32]
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mracl  # noqa: E402
from common.datasets import collate_image  # noqa: E402
from common.run import load_trained, parse_config  # noqa: E402
from common.text import build_vocab  # noqa: E402
from data.toy import ensure_toy  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="a trained toy run (default: a fresh model, seed 0)")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--loss", default="mracl", help="mracl | infonce | simcse | l2")
    args = parser.parse_args(argv)
    ensure_toy()
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--data", "toy", "--train", "--loss", args.loss])
    dataset = mracl.make_dataset(cfg, "data/toy/refcoco", "train", train=True, seed=0)
    if args.checkpoint:
        model, _ = load_trained(args.checkpoint, mracl.Config, mracl.build_model, torch.device("cpu"))
    else:
        torch.manual_seed(0)
        vocab = build_vocab([s["expression"] for s in dataset.samples] + list(dataset.phrase.values()))
        model = mracl.build_model(cfg, vocab=vocab)
    model.train()
    g, rows = torch.Generator().manual_seed(0), []
    for _ in range(args.batches):  # random training batches, as train() draws them
        batch = collate_image([dataset[i] for i in torch.randint(len(dataset), (cfg.batch_size,), generator=g)])
        index, texts = mracl.with_partners(cfg, batch)
        outputs = model(batch["images"][index], texts, pad_mask=batch["pad_mask"][index],
                        samples=len(batch["expression"]))
        terms = mracl.compute_losses(cfg, outputs, batch["targets"], pad_mask=batch["pad_mask"],
                                 pairs=mracl.contrastive_pairs(cfg, batch, index) if cfg.mracl else None)
        row = {"pairs": len(index) - cfg.batch_size}
        for name, value in terms.items():
            model.zero_grad()
            norm = 0.0
            if value.requires_grad:
                value.backward(retain_graph=True)
                norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters() if p.grad is not None))
            row[name] = {"loss": round(float(value.detach()), 4), "grad_norm": round(norm, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    active = [r for r in rows if r.get("mracl", {}).get("grad_norm", 0.0) > 0]
    ratio = sorted(r["mracl"]["grad_norm"] / max(r["ce"]["grad_norm"], 1e-12) for r in active)
    print(json.dumps({"checkpoint": args.checkpoint or "init", "loss": args.loss, "batches": len(rows),
                      "batches with a non-zero contrastive gradient": len(active),
                      "contrastive / cross-entropy gradient norm on those, median":
                          round(ratio[len(ratio) // 2], 1) if ratio else None,
                      "min": round(ratio[0], 1) if ratio else None,
                      "max": round(ratio[-1], 1) if ratio else None}))

if __name__ == "__main__":
    main()
