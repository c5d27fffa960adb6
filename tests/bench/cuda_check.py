"""Each method's paper configuration on a GPU: 2 training steps under bf16 autocast and the
evaluation of one clip (one image for the image methods), with the step time and peak memory, and
DMVS / DsHmp as ratios against the DMVS paper's Table 8.

Per method, in its own process: the model of the paper configuration with random weights (nothing
downloaded; `build_model(..., pretrained=False)`), random pixels at the paper's input size, one
referred object, and each method's own batch per GPU: DsHmp one clip of 8 frames (official:
8 GPUs x 1 clip, SAMPLING_FRAME_NUM 8), DMVS one clip of 10 (Sec. 4.2: T = 10; batch as LMPM),
VATEX 4 images with their expression, positive and negative captions (official: batch 8 on 2
GPUs), MRaCL 4 samples and their verb phrases (LAVT: batch 32 on 8 GPUs). Video frames are
360 x 640 (DsHmp and DMVS Sec. 4.2), VATEX's images 480 x 640 (short side 480), MRaCL's
480 x 480 (LAVT). Two AdamW steps of the trainable parameters on the sum of the method's loss
terms (the weights change neither time nor memory), under `common.engine.autocast` (bf16 on
CUDA); then the inference rule on one clip / image. The time of a training step is the second
step's (the first includes CUDA's start-up); memory is `torch.cuda.max_memory_allocated`
(on CPU: the process's peak resident memory).

Table 8 of the DMVS paper: DsHmp 17 h / 22 GB, DMVS 7 h / 6 GB on MeViS, whole runs of 50,000
and 40,000 steps (DsHmp Sec. 4.2, DMVS Sec. 4.2), so about 1.9x the time per step and 3.7x the
memory for DsHmp.

Run from the repository root on a machine with a GPU (a few minutes):
    python tests/bench/cuda_check.py
On CPU at toy size, with CPU bf16 autocast standing in for CUDA's (what tests/test_cuda_check.py
runs): python tests/bench/cuda_check.py --device cpu --toy --cpu-autocast --same-process
"""
import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from common.engine import autocast, seed_everything  # noqa: E402
from common.run import parse_config  # noqa: E402
METHODS = ("dshmp", "dmvs", "vatex", "mracl")
DATA = {"dshmp": "mevis", "dmvs": "mevis", "vatex": "refcoco", "mracl": "refcocog"}
PER_GPU = {"dshmp": 1, "dmvs": 1, "vatex": 4, "mracl": 4}  # clips or images per GPU, see above
SIZE = {"dshmp": (360, 640), "dmvs": (360, 640), "vatex": (480, 640), "mracl": (480, 480)}
TABLE_8 = {"time": (17 / 50_000) / (7 / 40_000), "memory": 22 / 6}  # DsHmp / DMVS, per step
EXPRESSION = "the man in a red shirt walking to the left"


def padded(x):
    """Zero-pad the last two dimensions to multiples of 32 (as the collate functions do)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % 32, 0, -h % 32))


def video_batch(cfg, size, device, generator):
    """One clip of cfg.num_frames random frames and one referred object in its middle."""
    T, (h, w) = cfg.num_frames, size
    frames = padded(torch.randn(1, T, 3, h, w, generator=generator)).to(device)  # (1, T, 3, Hp, Wp)
    masks = torch.zeros(1, T, *frames.shape[-2:], dtype=torch.bool)
    masks[..., h // 4: h // 2, w // 4: w // 2] = True
    return frames, [{"masks": masks.to(device), "labels": torch.zeros(1, dtype=torch.long, device=device)}]


def image_batch(n, size, device, generator):
    """n random images of `size` with one referred object each, as collate_image builds a batch."""
    h, w = size
    images = padded(torch.randn(n, 3, h, w, generator=generator)).to(device)  # (n, 3, Hp, Wp)
    pad_mask = torch.ones(n, *images.shape[-2:], dtype=torch.bool)
    pad_mask[:, :h, :w] = False
    mask = torch.zeros(*images.shape[-2:], dtype=torch.bool)
    mask[h // 4: h // 2, w // 4: w // 2] = True
    targets = [{"masks": mask[None].to(device), "labels": torch.zeros(1, dtype=torch.long, device=device)}
               for _ in range(n)]
    return {"images": images, "pad_mask": pad_mask, "image_sizes": [(h, w)] * n, "targets": targets,
            "expression": [EXPRESSION] * n}


def training_step(module, method, model, cfg, inputs, device):
    """The method's forward and loss terms on `inputs`; returns (loss, the output masks' dtype)."""
    if method in ("dshmp", "dmvs"):
        frames, targets = inputs
        outputs = model(frames, [EXPRESSION])
        if method == "dshmp":  # Sec. 3.3's memory bank with one target
            bank = module.MemoryBank(target_video=torch.zeros(1, dtype=torch.long, device=device), dim=cfg.cl_dim,
                                     momentum=cfg.cl_momentum)
            terms = module.compute_losses(cfg, outputs, targets, bank=bank,
                                          bank_targets=torch.zeros(1, dtype=torch.long, device=device))[0]
        else:
            terms = module.compute_losses(cfg, outputs, targets)
        return sum(terms.values()), outputs["pred_masks"].dtype
    batch = inputs
    if method == "vatex":  # per image its expression, a positive and a negative caption (Sec. 3.3)
        n = len(batch["expression"])
        batch = {**batch, "positive": ["the man walking to the left"] * n, "negative": ["the dog on the right"] * n,
                 "negative_mask": [t["masks"][0] for t in batch["targets"]]}
        texts, image_index, targets, triplets = module.captions_of(batch)
        outputs = model(batch["images"], batch["image_sizes"], texts, image_index.to(device))
        terms = module.compute_losses(cfg, outputs, targets, triplets=triplets.to(device))
        return sum(terms.values()), outputs["pred_masks"].dtype
    n = len(batch["expression"])  # mracl: every sample with its verb phrase as partner
    batch = {**batch, "partner": ["man walking to the left"] * n, "is_phrase": [False] * n,
             "ann_id": list(range(n)), "image_id": list(range(n)), "category_id": [1] * n}
    index, texts = module.with_partners(cfg, batch)
    outputs = model(batch["images"][index], texts, pad_mask=batch["pad_mask"].to(device)[index], samples=n)
    terms = module.compute_losses(cfg, outputs, batch["targets"], pad_mask=batch["pad_mask"].to(device),
                                  pairs=module.contrastive_pairs(cfg, batch, index))
    return sum(terms.values()), outputs["pred_masks"].dtype


def measure(method: str, *, device: str, toy: bool, cpu_autocast: bool, steps: int = 2) -> dict:
    """One method: build, `steps` training steps, one evaluation; timings, memory, losses."""
    module = __import__(method)
    cfg = parse_config(module.Config, module.PRESETS, ["--data", "toy" if toy else DATA[method], "--count-params"])
    per_gpu = 1 if toy else PER_GPU[method]  # reduced size: 2 frames, one image
    if toy and method in ("dshmp", "dmvs"):
        cfg = type(cfg)(**{**cfg.__dict__, "num_frames": 2})
    device = torch.device(device)
    size = (64, 96) if toy else SIZE[method]
    seed_everything(0)
    vocab = EXPRESSION.split() + ["dog", "on", "right", "."]  # the toy models' word tokenizer
    model = module.build_model(cfg, vocab=vocab, pretrained=False).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    if method in ("dshmp", "dmvs"):
        inputs = video_batch(cfg, size, device, generator)
    else:
        inputs = image_batch(per_gpu, size, device, generator)

    def precision():
        if device.type == "cpu" and cpu_autocast:  # stands in for CUDA's bf16 autocast on CPU
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return autocast(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with precision():
            loss, dtype = training_step(module, method, model, cfg, inputs, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    train_memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with precision():  # the inference rule (its own autocast is CUDA's; this adds CPU's for the check)
        if method in ("dshmp", "dmvs"):
            pred = module.predict_masks(model, inputs[0][0], EXPRESSION, size, cfg)  # (T, H, W)
        elif method == "vatex":
            image = inputs["images"][:1, :, :size[0], :size[1]]
            pred = module.predict_masks(model, image, EXPRESSION, size, cfg)[0]  # (H, W)
        else:
            image = inputs["images"][:1, :, :size[0], :size[1]]
            pred = module.predict_masks(model, image, EXPRESSION, size)  # (H, W)
    sync()
    eval_seconds = time.perf_counter() - start
    eval_memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"method": method, "data": cfg.data, "device": device.type, "per_gpu": per_gpu,
            "frames": cfg.num_frames if method in ("dshmp", "dmvs") else None, "size": list(size),
            "trainable": sum(p.numel() for p in params), "losses": losses, "output_dtype": str(dtype),
            "step_seconds": seconds[-1], "first_step_seconds": seconds[0], "train_peak_gib": train_memory,
            "eval_seconds": eval_seconds, "eval_peak_gib": eval_memory, "eval_shape": list(pred.shape),
            "memory": "max_memory_allocated" if device.type == "cuda" else "peak resident (ru_maxrss)"}


def report(rows) -> dict:
    """Print the table and the DMVS / DsHmp ratios; return the ratios."""
    print("| method | config | batch per GPU | frames | size | trainable | s/step | train peak GiB | "
          "eval s | eval peak GiB | losses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['data']} | {r['per_gpu']} | {r['frames'] or ''} | {r['size'][0]}x{r['size'][1]} | "
              f"{r['trainable'] / 1e6:.1f}M | {r['step_seconds']:.3f} | {r['train_peak_gib']:.2f} | "
              f"{r['eval_seconds']:.3f} | {r['eval_peak_gib']:.2f} | {', '.join(f'{v:.3g}' for v in r['losses'])} |")
    by = {r["method"]: r for r in rows}
    ratios = {}
    if "dshmp" in by and "dmvs" in by:
        d, h = by["dmvs"], by["dshmp"]
        ratios = {"time": d["step_seconds"] / h["step_seconds"], "memory": d["train_peak_gib"] / h["train_peak_gib"]}
        print(f"DMVS / DsHmp per training step: time {ratios['time']:.2f} (Table 8: {1 / TABLE_8['time']:.2f}), "
              f"peak memory {ratios['memory']:.2f} (Table 8: {1 / TABLE_8['memory']:.2f}); "
              f"{rows[0]['memory']} on {rows[0]['device']}")
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--toy", action="store_true", help="the toy presets (tiny models, 64x96, 2 frames, 1 image)")
    parser.add_argument("--cpu-autocast", action="store_true", help="on CPU: bf16 autocast as on CUDA")
    parser.add_argument("--same-process", action="store_true", help="every method in this process")
    parser.add_argument("--out", default="runs/cuda-check.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: this method only
    args = parser.parse_args(argv)
    options = dict(device=args.device, toy=args.toy, cpu_autocast=args.cpu_autocast)
    if args.one:
        return print(json.dumps(measure(args.one, **options)))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_check: no CUDA device here (pass --device cpu to run it on the CPU)")
    rows = []
    for method in args.methods.split(","):
        if args.same_process:
            rows.append(measure(method, **options))
            continue
        command = [sys.executable, __file__, "--one", method, "--device", args.device,
                   *(["--toy"] if args.toy else []), *(["--cpu-autocast"] if args.cpu_autocast else [])]
        print(" ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    bad = [r["method"] for r in rows if not all(math.isfinite(v) for v in r["losses"])]
    ratios = report(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "ratios": ratios, "table_8": TABLE_8}, indent=1))
    print(f"written to {args.out}")
    if bad:
        raise SystemExit(f"cuda_check: non-finite losses in {bad}")
    return rows, ratios


if __name__ == "__main__":
    main()
