"""DMVS vs DsHmp training cost (DMVS Table 8: DsHmp 17 h and 22 GB, DMVS 7 h and 6 GB, DMVS's
memory with one clip of T = 8 per GPU; whole runs of 50,000 and 40,000 steps, so DsHmp takes about
1.9x the time per step and 3.7x the memory), measured side by side on identical inputs: one clip
of T frames, random pixels, one referred object, the same expression. Each (method,
configuration) runs in its own process: build the model (random weights; the paper
configurations are DMVS's frozen Swin-L VITA + RoBERTa and DsHmp's Swin-T Mask2Former + RoBERTa,
nothing downloaded), then training steps (forward, the method's own losses, backward, AdamW step)
over the trainable parameters.

Reported per run: seconds per step (mean of the steps after the first), and memory: on CUDA the
peak allocated memory; on CPU the peak resident memory of the process (ru_maxrss) and its growth
over the built model (activations, gradients, optimizer state). Ratios are DsHmp / DMVS.

Run from the repository root (CPU: a few minutes; the resolution and T are printed with the table):
    python tests/bench/dmvs_efficiency.py --frames 4 --height 192 --width 320 --steps 3
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPRESSION = "the red circle moving to the left"


def measure(method: str, data: str, frames: int, height: int, width: int, steps: int) -> dict:
    """One process: build, train `steps` steps, return the timings and memory."""
    sys.path.insert(0, str(REPO))
    import torch

    from common.engine import seed_everything
    from common.run import parse_config
    module = __import__(method)
    argv = ["--data", data, "--count-params"]
    cfg = parse_config(module.Config, module.PRESETS, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(0)
    model = module.build_model(cfg, vocab=EXPRESSION.split(), pretrained=False).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    clip = torch.randn(1, frames, 3, height, width, device=device)
    masks = torch.zeros(1, frames, height, width, dtype=torch.bool, device=device)
    masks[:, :, height // 4: height // 2, width // 4: width // 2] = True
    targets = [{"masks": masks, "labels": torch.zeros(1, dtype=torch.long, device=device)}]
    bank = None
    if method == "dshmp":  # Sec. 3.3's memory bank with one target
        bank = module.MemoryBank(target_video=torch.zeros(1, dtype=torch.long, device=device), dim=cfg.cl_dim,
                                 momentum=cfg.cl_momentum)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs = model(clip, [EXPRESSION])
        if method == "dshmp":
            terms = module.compute_losses(cfg, outputs, targets, bank=bank,
                                          bank_targets=torch.zeros(1, dtype=torch.long, device=device))[0]
            loss = sum(terms.values())
        else:
            terms = module.compute_losses(cfg, outputs, targets)
            loss = cfg.w_cls * terms["ce"] + cfg.w_bce * terms["bce"] + cfg.w_dice * terms["dice"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"method": method, "data": data, "device": device.type, "trainable": sum(p.numel() for p in params),
              "seconds_per_step": sum(seconds[1:]) / max(len(seconds) - 1, 1), "first_step": seconds[0],
              "peak_rss_gib": rss_peak, "rss_growth_gib": rss_peak - rss_built}
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="T (Table 8: 8)")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run; the first is not timed")
    parser.add_argument("--configs", default="mevis,toy", help="paper (mevis) and/or toy")
    parser.add_argument("--out", default="runs/dmvs-efficiency.json")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "DATA"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        return print(json.dumps(measure(*args.one, args.frames, args.height, args.width, args.steps)))
    rows = []
    for data in args.configs.split(","):
        size = (args.height, args.width) if data != "toy" else (64, 96)  # the toy presets' frame size
        for method in ("dmvs", "dshmp"):
            command = [sys.executable, __file__, "--one", method, data, "--frames", str(args.frames),
                       "--height", str(size[0]), "--width", str(size[1]), "--steps", str(args.steps)]
            print(" ".join(command[1:]), flush=True)
            done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "size": size})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"frames": args.frames, "steps": args.steps, "rows": rows}, indent=1))
    memory = "peak_cuda_gib" if rows[0]["device"] == "cuda" else "peak_rss_gib"
    print(f"\nT = {args.frames} frames, {args.steps} steps per run ({rows[0]['device']}); ratios DsHmp / DMVS")
    print("| configuration | frame size | method | trainable | s/step | peak memory GiB | growth GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['size'][0]}x{r['size'][1]} | {r['method']} | {r['trainable'] / 1e6:.1f}M | "
              f"{r['seconds_per_step']:.2f} | {r[memory]:.2f} | {r['rss_growth_gib']:.2f} |")
    for data in args.configs.split(","):
        d, h = (next(r for r in rows if r["data"] == data and r["method"] == m) for m in ("dmvs", "dshmp"))
        print(f"{data}: time x{h['seconds_per_step'] / d['seconds_per_step']:.2f}, peak memory "
              f"x{h[memory] / d[memory]:.2f}, memory growth x{h['rss_growth_gib'] / max(d['rss_growth_gib'], 1e-6):.2f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
