"""Toy-only stages a method needs before it can train on the toy set, where nothing is pretrained
(ours; no paper describes them). Each writes a checkpoint that later runs of the same settings
reuse, so the variants of one seed share it.

  train_toy_vita   DMVS freezes a video instance segmenter trained on the target domain (VITA).
                   On toy: a tiny VITA (TOY_VITA) trained on the toy videos in the YouTube-VIS
                   format (data.toy.write_toy_vis, classes = the shapes) with VITA's own losses
                   (common.vita.vita_losses), before DMVS freezes it.
  pretrain_toy_clip
                   VATEX's CLIP prior needs a CLIP that knows the words. On toy: a tiny CLIP
                   trained with CLIP's symmetric contrastive loss on square crops around each
                   referred object of the training images and "a photo of {main noun phrase}".
"""
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import CLIP_MEAN, CLIP_STD, CLIPEncoder
from common.datasets import YouTubeVIS, collate_vis, load_rgb
from common.engine import (Progress, autocast, barrier, is_main, read_checkpoint, reduce_dict,
                           save_checkpoint, seed_everything, to_device)
from common.run import check_finite, param_groups, resume, train_batches, wrap_ddp
from common.text import build_vocab, main_noun_phrase, word_tokenizer
from common.vita import VITA_LOSS_WEIGHTS, build_vita, vita_losses
from data.toy import VIS_FILE, write_toy_vis

# Shapes: S the toy CLIP's input size, D its joint width.


# ---------------------------------------------------------------------------------- toy VITA
# PixelLevel.tiny's Swin and pixel decoder, 3 Mask2Former layers, 2 + 3 VITA layers, windows of 4
# frames; the widths and query counts come from the method's Config
TOY_VITA = dict(embed_dim=32, depths=(1, 1, 1, 1), swin_heads=(1, 2, 2, 4), window=4,
                pixel_decoder_layers=1, pixel_decoder_heads=4, pixel_decoder_ffn=64,
                dec_layers=3, enc_layers=2, vita_dec_layers=3, enc_window=4)


def toy_vita_sizes(cfg) -> dict:
    """common.vita.build_vita's sizes of the toy VITA for a Config with dim, heads, ffn_dim and the
    vita_* query and class counts."""
    return {**TOY_VITA, "conv_dim": cfg.dim, "mask_dim": cfg.dim, "hidden": cfg.dim,
            "heads": cfg.heads, "ffn": cfg.ffn_dim, "num_classes": cfg.vita_classes,
            "frame_queries": cfg.vita_frame_queries, "video_queries": cfg.vita_video_queries}


def toy_vita_path(cfg) -> Path:
    """The toy VITA's checkpoint: --vita-weights, else runs/vita-toy/last.pt (seed 0) or
    runs/vita-toy-seed<S>/last.pt, so each seed of the toy table has its own VITA."""
    if cfg.vita_weights:
        return Path(cfg.vita_weights)
    return Path("runs") / ("vita-toy" + (f"-seed{cfg.seed}" if cfg.seed else "")) / "last.pt"


def train_toy_vita(cfg, ddp, root) -> Path:
    """VITA trained on the toy videos under `root` (the MeViS-layout toy folder) with its own losses
    (VITA Sec. 3.3), or reused when its checkpoint (`toy_vita_path`) has finished (resumed when
    not). The recipe is the toy DsHmp's: AdamW at cfg.vita_lr for cfg.vita_steps steps of
    cfg.batch_size clips of cfg.vita_num_frames frames, lr x 0.1 at 4/5. Returns the path."""
    path, sizes = toy_vita_path(cfg), toy_vita_sizes(cfg)
    done = path.is_file() and read_checkpoint(path)
    if done and done["extra"].get("sizes") != sizes:
        raise SystemExit(f"the toy VITA at {path} has other sizes than this configuration; "
                         f"delete it or pass --vita-weights")
    if done and done["step"] >= cfg.vita_steps:
        if is_main():
            print(f"reusing the toy VITA at {path} ({done['step']} steps); delete it to retrain")
        return path
    if is_main():
        write_toy_vis(root)
        print(f"training the toy VITA ({cfg.vita_steps} steps) -> {path}", flush=True)
    barrier()
    seed_everything(cfg.seed)
    dataset = YouTubeVIS(root / "train" / VIS_FILE, root / "train" / "JPEGImages", train=True,
                         num_frames=cfg.vita_num_frames, frame_range=cfg.frame_range,
                         short_side=cfg.short_side, max_size=cfg.max_size, seed=cfg.seed + ddp.rank)
    if len(dataset.classes) != cfg.vita_classes:
        raise SystemExit(f"{len(dataset.classes)} classes in the toy VIS file, "
                         f"--vita-classes {cfg.vita_classes}")
    vita = build_vita(sizes).to(ddp.device)
    optimizer = torch.optim.AdamW(param_groups(vita, lr=cfg.vita_lr, weight_decay=cfg.weight_decay),
                                  lr=cfg.vita_lr)
    milestones = [cfg.vita_steps * 4 // 5]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    step = resume(path, model=vita, optimizer=optimizer, scheduler=scheduler)[0] if done else 0
    batches = train_batches(dataset, batch_size=cfg.batch_size, collate=collate_vis, ddp=ddp,
                            seed=cfg.seed, workers=cfg.workers, start_step=step)
    vita = wrap_ddp(vita, ddp)
    log_path = path.parent / "log.jsonl"
    with Progress(total=cfg.vita_steps, initial=step, log_path=log_path) as progress:
        while step < cfg.vita_steps:
            batch = next(batches)
            frames, targets = to_device((batch["frames"], batch["targets"]), ddp.device)
            with autocast(ddp.device):
                outputs = vita(frames)
            terms = vita_losses(outputs, targets, num_points=cfg.num_points or None)
            loss = sum(VITA_LOSS_WEIGHTS[k] * v for k, v in terms.items())
            check_finite(loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vita.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.vita_steps:
                progress.log(step, reduce_dict({"loss": loss, **terms}),
                             lr=max(scheduler.get_last_lr()))
            if (step % cfg.save_every == 0 or step == cfg.vita_steps) and is_main():
                save_checkpoint(path, model=vita, optimizer=optimizer, scheduler=scheduler,
                                step=step, config=asdict(cfg), extra={"sizes": sizes})
    barrier()
    return path


# ---------------------------------------------------------------------------------- toy CLIP
def tiny_clip(vocab, image_size) -> CLIPEncoder:
    """The toy CLIP: two layers, 64 wide, patches of 8, a word tokenizer over `vocab`."""
    return CLIPEncoder.tiny(word_tokenizer(vocab), hidden=64, layers=2, heads=2, embed_dim=64,
                            image_size=image_size, patch_size=8, freeze=False)


def pretrain_toy_clip(cfg, dataset, path):
    """The toy CLIP trained for cfg.toy_clip_steps steps on the RefCOCO-layout training set
    `dataset.base` (crops 1.5-3x each referred object's box, resized to cfg.clip_image_size), its
    word vocabulary the training expressions' and the prompt's, kept in `path` and reused (its
    vocabulary too) by every run with the same data, seed, steps and size. Returns (the CLIP, its
    vocabulary)."""
    key = {"data": str(Path(dataset.base.image_root).resolve()), "seed": cfg.seed,
           "steps": cfg.toy_clip_steps, "size": cfg.clip_image_size}
    if Path(path).is_file() and read_checkpoint(path)["extra"].get("key") == key:
        print(f"reusing the toy CLIP {path}")
    elif is_main():  # trained once, on the main process; every process loads the file
        vocab = build_vocab([s["expression"] for s in dataset.samples] + ["a photo of ."])
        _train_toy_clip(cfg, dataset, vocab, path, key)
    barrier()
    state = read_checkpoint(path)
    clip = tiny_clip(state["extra"]["vocab"], cfg.clip_image_size)
    clip.load_state_dict(state["model"])
    return clip, state["extra"]["vocab"]


def _train_toy_clip(cfg, dataset, vocab, path, key):
    base, g, size = dataset.base, torch.Generator().manual_seed(cfg.seed), cfg.clip_image_size
    images = {s["file_name"]: load_rgb(base.image_root / s["file_name"]) for s in base.samples}
    prompts = [f"a photo of {main_noun_phrase(s['expression'])}" for s in base.samples]
    mean, std = (torch.tensor(v)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    clip = tiny_clip(vocab, size)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    optimizer = torch.optim.AdamW([*clip.parameters(), scale], lr=1e-3, weight_decay=0.1)
    with Progress(total=cfg.toy_clip_steps, log_path=None, desc="toy CLIP") as progress:
        for step in range(1, cfg.toy_clip_steps + 1):
            picked = torch.randperm(len(prompts), generator=g)[:64].tolist()
            crops = []
            for i in picked:
                x, y, w, h = base.annotations[base.samples[i]["ann_id"]]["bbox"]
                side = max(w, h) * float(torch.empty(()).uniform_(1.5, 3.0, generator=g))
                x0, y0 = max(0, int(x + w / 2 - side / 2)), max(0, int(y + h / 2 - side / 2))
                crop = images[base.samples[i]["file_name"]][:, y0:y0 + int(side) + 1,
                                                            x0:x0 + int(side) + 1]  # uint8
                crop = F.interpolate(crop[None].float() / 255, size=(size, size), mode="bilinear",
                                     antialias=True)[0]  # (3, S, S)
                crops.append((crop - mean) / std)
            texts = [prompts[i] for i in picked]
            image_embeds = clip.encode_image(torch.stack(crops))["cls"]  # (64, D)
            image_embeds = F.normalize(image_embeds, dim=-1)
            text_embeds = F.normalize(clip.encode_text(texts), dim=-1)  # (64, D)
            logits = scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (64, 64)
            same = torch.tensor([[a == b for b in texts] for a in texts]).float()  # equal prompts
            labels = same / same.sum(1, keepdim=True)  # duplicates are not negatives
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                progress.log(step, {"clip_loss": float(loss)}, lr=1e-3)
    save_checkpoint(path, model=clip, step=cfg.toy_clip_steps, config=asdict(cfg),
                    extra={"vocab": vocab, "key": key})
