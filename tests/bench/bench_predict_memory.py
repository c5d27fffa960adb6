"""Peak memory of DsHmp's inference rule (`common.run.video_query_masks`, 5 frames upsampled at a time)
on a long video at real resolution, against the same rule upsampling all frames at once in float32.

The model is replaced by fixed outputs of the right shapes (the rule's own memory is what is
measured): M = 10 video tokens, `--kept` of them above the threshold, mask logits at 1/4 of the
padded input. Frames are MeViS-sized: 720x1280 originals, resized to 360x640 as the paper does.
Each variant runs in a fresh process; the peak resident memory it adds (ru_maxrss after the rule
minus before) is printed, with the size of the boolean output for reference.

Run from the repository root:
    python tests/bench/bench_predict_memory.py                # 300 frames, 1 kept token
    python tests/bench/bench_predict_memory.py --frames 300 --kept 3
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from common.run import video_query_masks

frames, kept, variant = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
H0, W0, H, W = 720, 1280, 360, 640
Hp, Wp = H + (-H % 32), W + (-W % 32)


class Fixed(torch.nn.Module):  # what DsHmp.infer returns for the video
    def __init__(self):
        super().__init__()
        self.logits = torch.zeros(10, 2)
        self.logits[:kept, 0] = 5.0  # these tokens pass the 0.5 threshold
        self.masks = torch.randn(10, frames, Hp // 4, Wp // 4)

    def infer(self, padded, expression, *, chunk):
        return self.logits, self.masks


def all_at_once(model, frames, expression, orig_size, *, threshold, chunk):  # every frame at once
    h, w = frames.shape[-2:]
    padded = F.pad(frames, (0, -w % 32, 0, -h % 32))
    logits, masks = model.infer(padded, expression, chunk=chunk)
    keep = logits.float().softmax(-1)[:, 0] > threshold
    masks = F.interpolate(masks[keep].float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    masks = F.interpolate(masks[..., :h, :w], size=tuple(orig_size), mode="bilinear", align_corners=False)
    return (masks > 0).any(0)


model, video = Fixed(), torch.zeros(frames, 3, H, W)
torch.set_num_threads(2)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rule = video_query_masks if variant == "chunked" else all_at_once
out = rule(model, video, "x", (H0, W0), threshold=0.5, chunk=18)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_mib": (peak - start) / 1024, "output_mib": out.numel() * out.element_size() / 2**20,
                  "shape": list(out.shape)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--kept", type=int, default=1)
    args = parser.parse_args()
    print(f"{args.frames} frames of 720x1280 (model input 360x640), {args.kept} kept video token(s); "
          f"peak memory added by the rule, each variant in a fresh process:")
    for variant, name in (("all frames at once", "all_at_once"), ("5 frames at a time (ours)", "chunked")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(args.frames), str(args.kept), name],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {variant:28s} {result['added_mib']:8.0f} MiB   (the boolean output itself: "
              f"{result['output_mib']:.0f} MiB, {result['shape']})")


if __name__ == "__main__":
    main()
