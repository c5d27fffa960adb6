"""DsHmp: Decoupling Static and Hierarchical Motion Perception for Referring Video Segmentation.
Shuting He and Henghui Ding, CVPR 2024. Official code: github.com/heshuting555/DsHmp @ d0c3a39.

Implements (paper sections and equations):
  Sec. 3.1  expression decoupling into static and motion cues; Eq. (1) static cues injected into
            N_s learnable static queries before Mask2Former; Eq. (2) motion cues injected into
            N_m learnable motion queries before the Motion Decoder.
  Sec. 3.2  Hierarchical Motion Perception: Hungarian matching of adjacent frames' object tokens
            (Eq. 3), HMP blocks of temporal self-attention, hierarchical cross-attention with L
            stages (frame attention Eq. 4, frame weights Eq. 5, weighted merging Eq. 6, stages
            combined Eq. 7) and FFN; the Motion Decoder turns motion-aware object tokens into
            video tokens, whose masks are dot products with each frame's mask features.
  Sec. 3.3  contrastive learning: projection head, memory bank of per-target centroids (Eq. 8),
            InfoNCE with same-video negatives first (Eq. 9), started after a warm-up.
  Sec. 3.4  frame-level Mask2Former loss + video-level loss (Hungarian matching, deep supervision).
  Sec. 4.2  training recipe; inference keeps every video token with score > 0.5 (union of masks).

Deviations from the paper (and from the official code, which the paper does not describe):
  - The static/motion split uses the rule-based common.text (verbs and adverbs -> motion), which
    reproduces the spaCy VERB/ADV tags the official code uses; the paper names a scene-graph parser [46].
  - Sentence embedding: masked mean of the RoBERTa word features. The official code uses RoBERTa's
    pooler, which roberta-base does not ship, so it is random and frozen (DsHmp issue #13).
  - Eq. (3) applies the matched permutation; the official code applies its inverse (correct only for
    swaps), and it re-matches inside every HMP block, where the paper matches once before the blocks.
  - Eq. (6) merges neighbouring frames weighted by the frame weights of Eq. (5), as the paper says;
    the official code takes a plain mean (DsHmp issue #21).
  - Eq. (7) sums all L stages, expanded back to the frames; the official code adds only the last
    stage, through a tanh gate.
  - Sec. 3.3 as in the paper: one memory-bank centroid per target (official: one per expression),
    momentum 0.2 on the old centroid (official 0.1), InfoNCE with temperature 0.07 on L2-normalised
    features and K = 100 negatives (official: QDTrack's multi-positive loss without temperature plus
    an L2 term, positives + negatives = 100), computed after 10,000 iterations (official: weight
    ramped from 0 over 2,000). The loss uses the bank before this step's update (official: after).
  - The paper does not describe how text reaches the pixels and the decoder layers; as in the
    official code, the words are fused into the output of every Swin stage by LAVT's pixel-word
    attention (PWAM, `PixelWordAttention`), every Mask2Former layer cross-attends to the static
    cues and every Motion-Decoder layer to the motion cues (official `cross_test`). Differences:
    the official PWAM also feeds a tanh-gated copy back into stages 1-3 before patch merging
    (here the stage outputs are fused after transformers' Swin, which we do not rewrite); the
    official layers attend to all words, not the decoupled cues; the official BiAttention block in
    every decoder layer (GLIP-style pixel-word fusion) is left out. Without PWAM our toy models
    learned to segment every object whatever the sentence (valid_u J&F 0.49-0.53 over ten
    settings); with it they ground the words (0.61-0.63 over three runs of the toy preset).
  - No VITA similarity loss (official, weight 1.0, not in the paper); object tokens come from the
    last Mask2Former layer only (official: the last 3 layers as extra batch entries in training).
  - Temporal self-attention uses the same non-shifted windows in training and test (official
    shifts odd blocks at test only, inherited from VITA).
  - Frames are resized to short side 360 / long side <= 640 in training and test (Sec. 4.2); the
    official code uses multi-scale crops in training and short side 448 at test. A horizontal flip
    swaps "left"/"right" in the expression (the official code flips without swapping).
  - The frozen RoBERTa runs in eval mode (the official code leaves its dropout on).

Run:
  python dshmp.py --data toy --train                    # toy data is generated if missing; CPU, minutes
  python dshmp.py --data mevis --train                  # paper configuration, MeViS in data/mevis
  torchrun --nproc_per_node 8 dshmp.py --data mevis --train
  python dshmp.py --data mevis --eval --eval_split valid # submission tree + zip for the online server
  python dshmp.py --data toy --predict FRAMES_DIR --text "the red circle moving to the left"
  python dshmp.py --count-params                        # paper configuration, random init
  ablations (paper Table 1): --no-ds, --no-hmp, --no-cl
"""

import argparse
import json
import math
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import RobertaConfig, RobertaModel

from common.backbones import PixelLevel, TextEncoder, load_mask2former, parameter_report, swin_tiny_coco_config
from common.datasets import MeViS, RefDAVIS17, RefYouTubeVOS, collate_video, load_rgb, normalize, resize_clip
from common.engine import (Progress, all_gather_cat, all_gather_object, autocast, barrier, cleanup_distributed,
                           denormalize, is_main, load_checkpoint, read_checkpoint, reduce_dict, reduce_mean,
                           save_checkpoint, save_overlays, seed_everything, setup_distributed, to_device, unwrap)
from common.mask2former import MLP, MaskedAttentionDecoder, decoder_kwargs_from_hf, load_decoder_weights
from common.matching import classification_loss, hungarian_match, mask_losses, matched_masks
from common.metrics import VideoMetrics
from common.text import batch_static_motion_token_masks, build_vocab, word_tokenizer
from data.toy import make_toy, toy_ready

# Shapes: B clips, T frames, N_s static queries = object tokens per frame, N_m motion queries =
# video tokens, L text tokens (+1 for the appended sentence embedding), C channels, H W input
# size, h w mask-feature size (H/4, W/4), W window length, P trajectories in a clip, S stage length,
# D contrastive embedding size, K negatives.


# ---------------------------------------------------------------------------------- config
@dataclass
class Config:
    # what to run
    data: str = "mevis"  # mevis | ytvos | davis (paper configuration) | toy (tiny model, CPU)
    data_root: str = ""  # default: data/toy/mevis, data/mevis, data/ref-youtube-vos, data/ref-davis17
    out: str = ""  # default: runs/dshmp-<data>[-no-ds][-no-hmp][-no-cl]
    train: bool = False
    resume: bool = False  # continue from <out>/last.pt
    eval: bool = False
    eval_split: str = "valid_u"  # MeViS: valid_u (J&F) or valid (submission); toy: valid_u
    checkpoint: str = ""  # default: <out>/last.pt
    predict: str = ""  # a folder of frames or one image
    text: str = ""  # the expression for --predict
    count_params: bool = False
    # ablations, paper Table 1
    ds: bool = True  # Sec. 3.1 decoupling; --no-ds feeds the whole sentence to both injections
    hmp: bool = True  # Sec. 3.2; --no-hmp keeps the temporal self-attention only
    cl: bool = True  # Sec. 3.3; --no-cl drops the contrastive loss
    # model
    weights: str = "facebook/mask2former-swin-tiny-coco-instance"  # paper Sec. 4.4 (Swin-T); COCO init: official
    text_weights: str = "FacebookAI/roberta-base"  # paper Sec. 4.2
    dim: int = 256  # official (Mask2Former hidden size)
    heads: int = 8  # official
    ffn_dim: int = 2048  # official
    num_static_queries: int = 20  # N_s, paper Sec. 4.2
    num_motion_queries: int = 10  # N_m, paper Sec. 4.2
    m2f_layers: int = 9  # official (Mask2Former DEC_LAYERS 10 = 9 layers + the initial prediction)
    hmp_blocks: int = 6  # official (VITA ENC_LAYERS); paper silent
    hmp_stages: int = 3  # L, paper Sec. 4.2 / Table 2b
    window: int = 8  # official (ENC_WINDOW_SIZE); paper silent
    decoder_layers: int = 3  # Motion Decoder, official (VITA DEC_LAYERS); paper silent
    inject_scale: float = 0.1  # official: Q = Q_0 + 0.1 * CrossAttn(Q_0, F); Eq. (1)-(2) bodies lost in the paper text
    toy_text_dim: int = 64  # toy only: width of the tiny RoBERTa (ours)
    # contrastive learning, Sec. 3.3
    cl_negatives: int = 100  # K, paper Sec. 4.2 / Table 2c
    cl_start: int = 10_000  # paper Sec. 3.3 / 4.2: "computed after 10,000 iterations"
    cl_momentum: float = 0.2  # paper Sec. 4.2 (Eq. 8 update speed)
    cl_temperature: float = 0.07  # paper Sec. 4.2 (Eq. 9)
    cl_dim: int = 256  # official (contrastive_embed output)
    # losses, Sec. 3.4 (weights: official, Mask2Former's COCO recipe)
    w_cls: float = 2.0
    w_bce: float = 5.0
    w_dice: float = 5.0
    w_cl: float = 0.3  # official loss_con_sim weight
    no_object_weight: float = 0.1  # official
    num_points: int = 12544  # official (Mask2Former point sampling); 0 = whole masks
    # optimisation, Sec. 4.2
    steps: int = 50_000  # paper (official: 55,000)
    lr: float = 5e-5  # paper
    lr_drop: int = 40_000  # official (x0.1)
    backbone_lr_mult: float = 0.1  # official
    weight_decay: float = 0.05  # official
    grad_clip: float = 0.01  # official (full-model L2 norm)
    batch_size: int = 8  # clips per step over all processes; official: 8 GPUs x 1
    num_frames: int = 8  # official (SAMPLING_FRAME_NUM); paper silent
    frame_range: int = 10  # official (SAMPLING_FRAME_RANGE)
    short_side: int = 360  # paper Sec. 4.2
    max_size: int = 640  # paper Sec. 4.2
    score_threshold: float = 0.5  # paper Sec. 4.2 (official TEST_OUTPUT_THRESHOLD)
    eval_chunk: int = 18  # official: frames per chunk through Mask2Former at test
    workers: int = 4
    seed: int = 0
    log_every: int = 20
    save_every: int = 1000


PRESETS = {  # per-dataset deltas from the paper configuration above
    # toy: a tiny model that trains on 2 CPU cores in minutes (ours); cl_start keeps the paper's
    # ratio 10,000 / 50,000 of the schedule. Everything starts from random init, so the backbone
    # gets the full lr; 8 clips x 4 frames (not 4 x 8) puts twice the sentences in a step at the
    # same cost and grounded the words faster (valid_u J&F 0.606 / 0.614 over seeds 0 / 1, against
    # 0.612 / 0.546 with 4 x 8).
    "toy": dict(dim=64, heads=4, ffn_dim=256, m2f_layers=3, hmp_blocks=2, num_points=1024, steps=1500,
                lr=1e-3, lr_drop=1200, backbone_lr_mult=1.0, grad_clip=1.0, cl_start=300, cl_dim=64,
                batch_size=8, num_frames=4, short_side=64, max_size=96, eval_chunk=32, workers=1,
                log_every=10, save_every=250),
    "mevis": dict(),
    "ytvos": dict(eval_split="valid"),
    "davis": dict(eval_split="valid"),
}
DATA_ROOTS = {"toy": "data/toy/mevis", "mevis": "data/mevis", "ytvos": "data/ref-youtube-vos", "davis": "data/ref-davis17"}


def get_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description="DsHmp (CVPR'24) for referring video segmentation")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --train / --no-train, --hmp / --no-hmp, ...
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=f.type, default=None)
    cli = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    data = cli.get("data", Config.data)
    if data not in PRESETS:
        parser.error(f"--data must be one of {sorted(PRESETS)}, got {data!r}")
    return replace(Config(), **{**PRESETS[data], **cli})


# ---------------------------------------------------------------------------------- Sec. 3.1 decoupling
class CueInjection(nn.Module):
    """Eqs. (1)-(2): inject language cues into learnable queries by cross-attention,
    Q = Q_0 + scale * LN(Q_0 + MHA(Q_0, F, F)) (post-norm layer and scale from the official code)."""

    def __init__(self, *, dim, heads, scale, dropout=0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.scale = scale

    def forward(self, queries, words, word_mask):
        # queries (B, Q, C), words (B, L, C), word_mask (B, L) True = attend
        cues = self.attn(queries, words, words, key_padding_mask=~word_mask)[0]  # (B, Q, C)
        return queries + self.scale * self.norm(queries + cues)


class PixelWordAttention(nn.Module):
    """Language fusion into the backbone (official code: LAVT's PWAM after every Swin stage; the
    paper is silent). Each pixel attends to the words; the attended language feature multiplies the
    pixel feature element-wise: x (B, C, H, W), words (B, L, C_w), word_mask (B, L) -> (B, C, H, W)."""

    def __init__(self, *, dim, word_dim):
        super().__init__()
        self.vis = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())
        self.query = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.InstanceNorm2d(dim))
        self.key, self.value = nn.Linear(word_dim, dim), nn.Linear(word_dim, dim)
        self.out = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.InstanceNorm2d(dim))
        self.mm = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())

    def forward(self, x, words, word_mask):
        logits = einsum(self.query(x), self.key(words), "b c h w, b l c -> b h w l") / math.sqrt(x.shape[1])
        attn = logits.masked_fill(~word_mask[:, None, None], float("-inf")).softmax(-1)  # (B, H, W, L)
        lang = self.out(einsum(attn, self.value(words), "b h w l, b l c -> b c h w"))  # (B, C, H, W)
        return self.mm(self.vis(x) * lang)


# ---------------------------------------------------------------------------------- Sec. 3.2 HMP
@torch.no_grad()
def align_tokens(tokens):
    """Eq. (3): Hungarian matching of adjacent frames' object tokens, as in MinVIS [20].

    tokens (B, T, N, C) -> perm (B, T, N) with tokens[b, t, perm[b, t, i]] the token of trajectory i
    in frame t. Frame 0 is the reference; every frame is matched to the already aligned previous
    frame with cost 1 - cosine similarity.
    """
    B, T, N, _ = tokens.shape
    unit = F.normalize(tokens.float(), dim=-1).cpu()  # (B, T, N, C)
    perm = torch.arange(N).repeat(B, T, 1)  # (B, T, N)
    for b in range(B):
        for t in range(1, T):
            previous = unit[b, t - 1, perm[b, t - 1]]  # (N, C), aligned
            cost = 1 - previous @ unit[b, t].T  # (N, N): rows trajectories, columns this frame's tokens
            rows, cols = linear_sum_assignment(cost.numpy())
            perm[b, t, torch.as_tensor(rows)] = torch.as_tensor(cols)  # the official code uses the inverse
    return perm.to(tokens.device)


def merge_neighbours(x, weights, valid):
    """Eq. (6): merge frames 2j and 2j+1 into one token, averaged with the frame weights of Eq. (5).

    x (..., S, C), weights (..., S), valid (..., S) -> (..., S/2, C), (..., S/2). An odd S gets one
    zero-weight frame appended; padded frames carry zero weight, so they never enter a merge.
    """
    if x.shape[-2] % 2:
        x = F.pad(x, (0, 0, 0, 1))  # (..., S+1, C)
        weights, valid = F.pad(weights, (0, 1)), F.pad(valid, (0, 1))
    x = rearrange(x, "... (s two) c -> ... s two c", two=2)  # (..., S/2, 2, C)
    weights = rearrange(weights, "... (s two) -> ... s two", two=2)  # (..., S/2, 2)
    merged = einsum(weights, x, "... s two, ... s two c -> ... s c") / (weights.sum(-1, keepdim=True) + 1e-8)
    return merged, rearrange(valid, "... (s two) -> ... s two", two=2).any(-1)  # (..., S/2, C), (..., S/2)


class HierarchicalCrossAttention(nn.Module):
    """Sec. 3.2, Eqs. (4)-(7): each object trajectory attends to the motion cues at L temporal scales.

    Stage h: frame attention A^h = softmax over frames of q k^T / sqrt(C) (Eq. 4); frame weights
    w^h = sum of A^h over the words and motion-enriched tokens (Eq. 5); weighted merging of
    neighbouring frames (Eq. 6). The merged tokens of all stages, expanded back to the frames, are
    added to the trajectory (Eq. 7). Single-head with k, v shared by the stages (official code).
    """

    def __init__(self, *, dim, num_stages):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_stages))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_stages))
        self.norm = nn.LayerNorm(dim)

    def forward(self, traj, valid, words, word_mask):
        # traj (B, P, W, C) one trajectory per row, valid (B, P, W), words (B, L, C), word_mask (B, L)
        k, v = self.to_k(words), self.to_v(words)  # (B, L, C)
        x, stage_valid, stages = traj, valid, []
        for proj, norm in zip(self.proj, self.norms):
            logits = einsum(self.to_q(x), k, "b p s c, b l c -> b p s l") / math.sqrt(x.shape[-1])  # (B, P, S, L)
            logits = logits.masked_fill(~stage_valid[..., None], float("-inf"))
            attn = logits.softmax(dim=2) * word_mask[:, None, None, :]  # Eq. (4): softmax over frames
            weights = attn.sum(-1)  # (B, P, S), Eq. (5): frame weights w^h
            cues = einsum(attn / (weights[..., None] + 1e-8), v, "b p s l, b l c -> b p s c")  # (B, P, S, C)
            enriched = norm(x + proj(cues))  # Eq. (5): motion-enriched tokens
            x, stage_valid = merge_neighbours(enriched, weights, stage_valid)  # Eq. (6), (B, P, S/2, C)
            span = traj.shape[2] // x.shape[2] if traj.shape[2] % x.shape[2] == 0 else 2 ** len(stages) * 2
            stages.append(x.repeat_interleave(span, dim=2)[:, :, : traj.shape[2]])  # (B, P, W, C)
        return self.norm(traj + sum(stages))  # Eq. (7)


class HMPBlock(nn.Module):
    """One HMP block (Sec. 3.2, Fig. 3): temporal self-attention over all object tokens of a
    window, hierarchical cross-attention with the motion cues, FFN; post-norm residuals."""

    def __init__(self, *, dim, heads, ffn_dim, num_stages, hierarchical):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross = HierarchicalCrossAttention(dim=dim, num_stages=num_stages) if hierarchical else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, valid, words, word_mask):
        # x (B, n, W, N, C) object tokens in n windows of W frames, valid (B, n, W)
        B, n, W, N, _ = x.shape
        tokens = rearrange(x, "b n w q c -> (b n) (w q) c")  # (B*n, W*N, C)
        padding = repeat(~valid, "b n w -> (b n) (w q)", q=N)  # (B*n, W*N)
        tokens = self.norm1(tokens + self.self_attn(tokens, tokens, tokens, key_padding_mask=padding)[0])
        x = rearrange(tokens, "(b n) (w q) c -> b n w q c", b=B, q=N)  # (B, n, W, N, C)
        if self.cross is not None:
            traj = rearrange(x, "b n w q c -> b (n q) w c")  # (B, P, W, C), P = n*N trajectories
            traj_valid = repeat(valid, "b n w -> b (n q) w", q=N)  # (B, P, W)
            traj = self.cross(traj, traj_valid, words, word_mask)  # (B, P, W, C)
            x = rearrange(traj, "b (n q) w c -> b n w q c", q=N)  # (B, n, W, N, C)
        return self.norm2(x + self.ffn(x))


class HMP(nn.Module):
    """Hierarchical Motion Perception (Sec. 3.2): object tokens O (B, T, N_s, C) -> motion-aware
    tokens, in windows of W frames (a length that is not a multiple of W is zero-padded and masked)."""

    def __init__(self, *, dim, heads, ffn_dim, num_blocks, num_stages, window, hierarchical):
        super().__init__()
        self.window, self.hierarchical = window, hierarchical
        self.blocks = nn.ModuleList(
            HMPBlock(dim=dim, heads=heads, ffn_dim=ffn_dim, num_stages=num_stages, hierarchical=hierarchical)
            for _ in range(num_blocks)
        )

    def forward(self, tokens, words, word_mask):
        B, T, N, _ = tokens.shape
        if self.hierarchical:  # trajectories for the hierarchical merging; Table 2d: without it, -2.6 J&F
            perm = align_tokens(tokens)  # Eq. (3), (B, T, N)
            tokens = torch.gather(tokens, 2, repeat(perm, "b t q -> b t q c", c=tokens.shape[-1]))  # (B, T, N, C)
        pad = -T % self.window
        x = rearrange(F.pad(tokens, (0, 0, 0, 0, 0, pad)), "b (n w) q c -> b n w q c", w=self.window)  # (B, n, W, N, C)
        valid = rearrange(torch.arange(T + pad, device=tokens.device) < T, "(n w) -> n w", w=self.window)  # (n, W)
        valid = repeat(valid, "n w -> b n w", b=B)  # (B, n, W)
        for block in self.blocks:
            x = block(x, valid, words, word_mask)
        return rearrange(x, "b n w q c -> b (n w) q c")[:, :T]  # (B, T, N, C)


# ---------------------------------------------------------------------------------- Motion Decoder
class MotionDecoderLayer(nn.Module):
    """Cross-attention to the object tokens, cross-attention to the motion cues, self-attention, FFN
    (post-norm). The paper does not describe the layer; this is the official one without its
    BiAttention block (official: dshmp_decoder.py, VITA's decoder plus `cross_test` word attention)."""

    def __init__(self, *, dim, heads, ffn_dim):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.word_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, queries, query_pos, memory, memory_pos, words, word_mask):
        # queries, query_pos (B, N_m, C); memory, memory_pos (B, T*N_s, C); words (B, L, C), word_mask (B, L)
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory)[0]  # (B, N_m, C)
        queries = self.norms[0](queries + attended)
        cues = self.word_attn(queries + query_pos, words, words, key_padding_mask=~word_mask)[0]  # (B, N_m, C)
        queries = self.norms[1](queries + cues)
        q = queries + query_pos
        queries = self.norms[2](queries + self.self_attn(q, q, queries)[0])
        return self.norms[3](queries + self.ffn(queries))


class MotionDecoder(nn.Module):
    """Sec. 3.2: motion queries (after Eq. 2) attend to the motion-aware object tokens; returns the
    decoder-normed video tokens of every layer (deep supervision). Object tokens carry a learnable
    embedding of their slot (trajectory) as key position (official `fq_pos`)."""

    def __init__(self, *, dim, heads, ffn_dim, num_layers, num_slots):
        super().__init__()
        self.slot_pos = nn.Embedding(num_slots, dim)
        self.layers = nn.ModuleList(MotionDecoderLayer(dim=dim, heads=heads, ffn_dim=ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, query_pos, tokens, words, word_mask):
        # queries, query_pos (B, N_m, C); tokens (B, T, N_s, C); words (B, L, C), word_mask (B, L)
        memory = rearrange(tokens, "b t q c -> b (t q) c")  # (B, T*N_s, C)
        memory_pos = repeat(self.slot_pos.weight, "q c -> b (t q) c", b=tokens.shape[0], t=tokens.shape[1])
        video_tokens = []
        for layer in self.layers:
            queries = layer(queries, query_pos, memory, memory_pos, words, word_mask)  # (B, N_m, C)
            video_tokens.append(self.norm(queries))  # V in the paper
        return video_tokens


# ---------------------------------------------------------------------------------- model
class DsHmp(nn.Module):
    """frames (B, T, 3, H, W) + expressions -> outputs dict:
      pred_logits (B, N_m, 2) target / no-object, pred_masks (B, N_m, T, h, w), aux_outputs (earlier
      Motion-Decoder layers), embeds (B, N_m, D) contrastive projections (when cl), and
      frame_outputs: Mask2Former's per-frame outputs (pred_logits (B*T, N_s, 2), pred_masks, aux_outputs)."""

    def __init__(self, *, pixel_level, decoder, text_encoder, dim, heads, ffn_dim, num_motion_queries,
                 hmp_blocks, hmp_stages, window, decoder_layers, inject_scale, cl_dim, decouple=True,
                 hierarchical=True, contrastive=True):
        super().__init__()
        self.decouple = decouple
        self.pixel_level = pixel_level  # Swin + multi-scale deformable pixel decoder (transformers)
        self.decoder = decoder  # Mask2Former's masked-attention decoder; query_feat is Q_s^0 of Eq. (1)
        self.text_encoder = text_encoder  # RoBERTa, frozen in the paper configuration
        # official FeatureResizer: words and sentence share it
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.hidden_size, dim), nn.LayerNorm(dim, eps=1e-12), nn.Dropout(0.1))
        self.fusion = nn.ModuleList(PixelWordAttention(dim=c, word_dim=text_encoder.hidden_size)  # official PWAM
                                    for c in pixel_level.backbone.channels)
        self.static_injection = CueInjection(dim=dim, heads=heads, scale=inject_scale)  # Eq. (1)
        self.motion_injection = CueInjection(dim=dim, heads=heads, scale=inject_scale)  # Eq. (2)
        self.motion_queries = nn.Embedding(num_motion_queries, dim)  # Q_m^0 in the paper
        self.motion_query_pos = nn.Embedding(num_motion_queries, dim)
        self.hmp = HMP(dim=dim, heads=heads, ffn_dim=ffn_dim, num_blocks=hmp_blocks, num_stages=hmp_stages,
                       window=window, hierarchical=hierarchical)
        self.motion_decoder = MotionDecoder(dim=dim, heads=heads, ffn_dim=ffn_dim, num_layers=decoder_layers,
                                            num_slots=decoder.num_queries)
        self.motion_mask_proj = nn.Conv2d(pixel_level.mask_channels, dim, 1)  # official vita_mask_features
        self.class_head = nn.Linear(dim, 2)
        self.mask_embed = MLP(dim, dim, dim, num_layers=3)
        self.contrastive_head = MLP(dim, dim, cl_dim, num_layers=3) if contrastive else None  # Sec. 3.3

    def encode_text(self, expressions):
        """dict: words (B, L+1, C) word features with the sentence embedding appended; static and
        motion (B, L+1) where the static / motion cues are; raw (B, L, C_text) and raw_mask (B, L),
        the text encoder's own features and attention mask, for the backbone fusion."""
        text = self.text_encoder(expressions)
        words = self.text_proj(torch.cat([text["word_feats"], text["sentence"][:, None]], 1))  # (B, L+1, C)
        static, motion = batch_static_motion_token_masks(expressions, text["offsets"])  # (B, L) each
        if not self.decouple:  # Table 1 without DS: the whole sentence feeds both injections
            static = motion = text["word_mask"]
        sentence = torch.ones_like(static[:, :1])  # the sentence embedding joins both cue sets (Sec. 3.1)
        return {"words": words, "static": torch.cat([static.to(words.device), sentence], 1),
                "motion": torch.cat([motion.to(words.device), sentence], 1),
                "raw": text["word_feats"], "raw_mask": text["attn_mask"].to(words.device)}

    def static_queries(self, text):
        q0 = repeat(self.decoder.query_feat.weight, "q c -> b q c", b=text["words"].shape[0])  # (B, N_s, C)
        return self.static_injection(q0, text["words"], text["static"])  # Eq. (1)

    def segment_frames(self, frames, queries, text):
        """Mask2Former on every frame: frames (B*T, 3, H, W), queries (B*T, N_s, C), text: encode_text's
        dict repeated over the frames (B*T, ...). The backbone stages are fused with the words (PWAM),
        the decoder's word attention reads the static cues."""
        def fuse(stages):  # official: res2-res5 are the PWAM outputs
            return [pwam(x, text["raw"], text["raw_mask"]) for pwam, x in zip(self.fusion, stages)]

        pixels = self.pixel_level(frames, fuse=fuse)
        out = self.decoder(pixels["features"], pixels["pos"], pixels["mask_features"], queries=queries,
                           words=text["words"], word_mask=text["static"])
        return out, self.motion_mask_proj(pixels["mask_features"])  # (B*T, C, h, w)

    def identify(self, tokens, mask_feats, text):
        """HMP + Motion Decoder + heads: tokens O (B, T, N_s, C), mask_feats (B, T, C, h, w)."""
        words, motion = text["words"], text["motion"]
        tokens = self.hmp(tokens, words, motion)  # (B, T, N_s, C)
        q0 = repeat(self.motion_queries.weight, "q c -> b q c", b=tokens.shape[0])  # (B, N_m, C)
        queries = self.motion_injection(q0, words, motion)  # Eq. (2)
        query_pos = repeat(self.motion_query_pos.weight, "q c -> b q c", b=tokens.shape[0])
        video_tokens = self.motion_decoder(queries, query_pos, tokens, words, motion)  # L x (B, N_m, C)
        preds = [{"pred_logits": self.class_head(v),  # (B, N_m, 2)
                  "pred_masks": einsum(self.mask_embed(v), mask_feats, "b q c, b t c h w -> b q t h w")}
                 for v in video_tokens]
        out = {**preds[-1], "aux_outputs": preds[:-1]}
        if self.contrastive_head is not None:
            out["embeds"] = self.contrastive_head(video_tokens[-1])  # (B, N_m, D)
        return out

    def forward(self, frames, expressions):
        B, T = frames.shape[:2]
        text = self.encode_text(expressions)
        queries = self.static_queries(text).repeat_interleave(T, 0)  # (B*T, N_s, C)
        frame_text = {k: v.repeat_interleave(T, 0) for k, v in text.items()}  # (B*T, ...)
        frame_out, mask_feats = self.segment_frames(rearrange(frames, "b t c h w -> (b t) c h w"), queries, frame_text)
        tokens = rearrange(frame_out["query_embeds"][-1], "(b t) q c -> b t q c", b=B)  # O in the paper
        out = self.identify(tokens, rearrange(mask_feats, "(b t) c h w -> b t c h w", b=B), text)
        return {**out, "frame_outputs": frame_out}

    @torch.no_grad()
    def infer(self, frames, expression, *, chunk):
        """Inference on a whole video (Sec. 4.2): frames (T, 3, H, W) go through Mask2Former in
        chunks, HMP and the Motion Decoder run once. Returns pred_logits (N_m, 2), pred_masks (N_m, T, h, w)."""
        text = self.encode_text([expression])
        queries = self.static_queries(text)  # (1, N_s, C)
        tokens, mask_feats = [], []
        for part in frames.split(chunk):
            t = len(part)
            out, feats = self.segment_frames(part, queries.expand(t, -1, -1), {k: v.expand(t, *v.shape[1:]) for k, v in text.items()})
            tokens.append(out["query_embeds"][-1])  # (t, N_s, C)
            mask_feats.append(feats)  # (t, C, h, w)
        out = self.identify(torch.cat(tokens)[None], torch.cat(mask_feats)[None], text)
        return out["pred_logits"][0], out["pred_masks"][0]


# ---------------------------------------------------------------------------------- Sec. 3.3 contrastive learning
class MemoryBank:
    """One centroid per target (the set of referred objects of a video) of the projected video
    tokens (Sec. 3.3); the centroids M live outside the model and travel in the checkpoint.
    target_video (num_targets,) long: the video of each target, for same-video negatives first."""

    def __init__(self, *, num_targets, dim, target_video, momentum, generator=None):
        self.centroids = F.normalize(torch.randn(num_targets, dim, generator=generator), dim=-1)  # M in the paper
        self.target_video = target_video
        self.momentum = momentum

    def to(self, device):
        self.centroids, self.target_video = self.centroids.to(device), self.target_video.to(device)
        return self

    @torch.no_grad()
    def update(self, anchors, targets):
        """Eq. (8): M[k] <- m * M[k] + (1 - m) * anchor, in order (a target may occur twice)."""
        for anchor, k in zip(F.normalize(anchors.float(), dim=-1), targets.tolist()):
            self.centroids[k] = F.normalize(self.momentum * self.centroids[k] + (1 - self.momentum) * anchor, dim=-1)

    def negatives(self, target, k, generator=None):
        """Up to k negative target indices for `target`: other targets of the same video first
        (Sec. 3.3: the hardest, same category in the same video; MeViS has one category), then random ones."""
        index = torch.arange(len(self.centroids), device=self.target_video.device)
        same = self.target_video == self.target_video[target]
        same_video = index[same & (index != target)]
        others = index[~same]
        same_video = same_video[torch.randperm(len(same_video), generator=generator)[:k].to(index.device)]
        others = others[torch.randperm(len(others), generator=generator)[: k - len(same_video)].to(index.device)]
        return torch.cat([same_video, others])  # (<= k,)


def contrastive_loss(anchors, bank, targets, *, num_negatives, temperature, generator=None):
    """Eq. (9): InfoNCE of each anchor (A, D) against its target's centroid and K negatives."""
    anchors = F.normalize(anchors.float(), dim=-1)  # (A, D)
    losses = []
    for anchor, k in zip(anchors, targets.tolist()):
        samples = torch.cat([bank.centroids[k : k + 1], bank.centroids[bank.negatives(k, num_negatives, generator)]])  # (1+K, D)
        logits = samples @ anchor / temperature  # (1+K,), the positive first
        losses.append(-logits.log_softmax(0)[0])
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------- Sec. 3.4 losses
def set_losses(outputs, targets, *, w_cls, w_bce, w_dice, no_object_weight, num_points, num_masks):
    """Mask2Former's set loss with deep supervision, for frame masks (Q, h, w) and video masks
    (Q, T, h, w) alike: Hungarian matching (cost weights w_*), then CE, BCE and dice, each summed
    over the final and every auxiliary prediction. Returns the unweighted terms and the final
    prediction's matching."""
    terms = {"ce": 0.0, "bce": 0.0, "dice": 0.0}
    for i, out in enumerate([outputs, *outputs["aux_outputs"]]):
        indices = hungarian_match(out["pred_logits"], out["pred_masks"], targets, w_cls=w_cls, w_bce=w_bce,
                                  w_dice=w_dice, num_points=num_points)
        if i == 0:
            final_indices = indices  # the final prediction's matching (the contrastive anchors use it)
        terms["ce"] = terms["ce"] + classification_loss(out["pred_logits"], targets, indices, no_object_weight=no_object_weight)
        preds, masks = matched_masks(out["pred_masks"], targets, indices)  # (M, [T,] h, w), (M, [T,] H, W)
        mask_terms = mask_losses(preds, masks, num_masks, num_points=num_points)
        terms["bce"], terms["dice"] = terms["bce"] + mask_terms["bce"], terms["dice"] + mask_terms["dice"]
    return terms, final_indices


def frame_targets(targets):
    """Per-frame targets of Mask2Former's loss: the referred objects visible in each frame, in (b t) order."""
    per_frame = []
    for target in targets:
        for t in range(target["masks"].shape[1]):
            masks = target["masks"][:, t]  # (N, H, W)
            visible = masks.flatten(1).any(1)  # (N,)
            per_frame.append({"masks": masks[visible], "labels": target["labels"][visible]})
    return per_frame


def compute_losses(cfg, outputs, targets, *, bank=None, bank_targets=None):
    """All unweighted loss terms of Sec. 3.4; returns (terms, anchors for the memory bank or None)."""
    weights = dict(w_cls=cfg.w_cls, w_bce=cfg.w_bce, w_dice=cfg.w_dice, no_object_weight=cfg.no_object_weight,
                   num_points=cfg.num_points or None)
    visible = [t["masks"].flatten(1).any(1) for t in targets]  # official: an object absent from the clip is dropped
    targets = [{"masks": t["masks"][v], "labels": t["labels"][v]} for t, v in zip(targets, visible)]
    per_frame = frame_targets(targets)
    num_frame_masks = max(float(reduce_mean(torch.tensor(float(sum(len(t["labels"]) for t in per_frame))))), 1.0)
    num_masks = max(float(reduce_mean(torch.tensor(float(sum(len(t["labels"]) for t in targets))))), 1.0)
    frame_terms, _ = set_losses(outputs["frame_outputs"], per_frame, num_masks=num_frame_masks, **weights)
    video_terms, indices = set_losses(outputs, targets, num_masks=num_masks, **weights)
    terms = {f"frame_{k}": v for k, v in frame_terms.items()} | {f"video_{k}": v for k, v in video_terms.items()}
    anchors = None
    if bank is not None:  # Sec. 3.3: the anchor averages the video tokens matched to the targets (footnote)
        anchors = torch.stack([outputs["embeds"][b, pred_idx].mean(0) for b, (pred_idx, _) in enumerate(indices)])  # (B, D)
        terms["cl"] = contrastive_loss(anchors, bank, bank_targets, num_negatives=cfg.cl_negatives,
                                       temperature=cfg.cl_temperature)
    return terms, anchors


# ---------------------------------------------------------------------------------- building
def run_dir(cfg) -> Path:
    ablations = "".join(f"-no-{name}" for name in ("ds", "hmp", "cl") if not getattr(cfg, name))
    return Path(cfg.out or f"runs/dshmp-{cfg.data}{ablations}")


def data_root(cfg) -> Path:
    """The dataset folder; the toy set is generated on first use. Exits with one message when missing."""
    root = Path(cfg.data_root or DATA_ROOTS[cfg.data])
    if cfg.data == "toy" and not cfg.data_root and not toy_ready(root.parent):
        if is_main():
            print(f"dshmp: generating the toy dataset in {root.parent} (python data/toy.py --out {root.parent})")
            make_toy(root.parent)
        barrier()
    if not root.is_dir():
        raise SystemExit(f"dshmp: no {cfg.data} dataset at {root.resolve()}; download it as data/README.md "
                         f"describes, or pass --data-root DIR")
    return root


def make_dataset(cfg, root, split, *, train):
    kwargs = dict(train=train, num_frames=cfg.num_frames, frame_range=cfg.frame_range, short_side=cfg.short_side,
                  max_size=cfg.max_size, seed=cfg.seed)
    if cfg.data in ("toy", "mevis"):
        return MeViS(root, split, **kwargs)
    if cfg.data == "ytvos":
        return RefYouTubeVOS(root, split, **kwargs)
    return RefDAVIS17(root, split, **kwargs)


def toy_vocab(root):
    """Word vocabulary of the toy-size text encoder: the words of the training expressions."""
    return build_vocab([s["expression"] for s in MeViS(root, "train", train=False).samples])


def build_model(cfg, *, vocab=None, pretrained=True) -> DsHmp:
    """The toy-size model (random init, word tokenizer) for --data toy; otherwise the paper
    configuration with COCO Mask2Former and RoBERTa weights (random init when not pretrained)."""
    if cfg.data == "toy":
        pixel_level = PixelLevel.tiny(hidden_dim=cfg.dim)
        text_encoder = TextEncoder.tiny(word_tokenizer(vocab), hidden=cfg.toy_text_dim, freeze=False)
        decoder = MaskedAttentionDecoder(hidden_dim=cfg.dim, num_queries=cfg.num_static_queries, num_layers=cfg.m2f_layers,
                                         num_heads=cfg.heads, ffn_dim=cfg.ffn_dim, num_classes=1,
                                         mask_dim=pixel_level.mask_channels, word_attention=True)
    else:
        if pretrained:
            pixel_level, decoder_state, m2f_config = load_mask2former(cfg.weights)
            text_encoder = TextEncoder.from_pretrained(cfg.text_weights, freeze=True)
        else:  # --count-params: the same modules with random weights, nothing downloaded
            m2f_config, decoder_state = swin_tiny_coco_config(), None
            pixel_level = PixelLevel(m2f_config)
            roberta = RobertaModel(RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                                 pad_token_id=1, bos_token_id=0, eos_token_id=2), add_pooling_layer=False)
            text_encoder = TextEncoder(roberta, word_tokenizer([]), freeze=True)
        decoder = MaskedAttentionDecoder(**{**decoder_kwargs_from_hf(m2f_config), "num_queries": cfg.num_static_queries,
                                            "num_classes": 1, "word_attention": True})
        if decoder_state is not None:  # the first N_s COCO queries, as the official tools/process_ckpt.py
            load_decoder_weights(decoder, decoder_state, num_queries=cfg.num_static_queries, load_class_head=False)
    return DsHmp(pixel_level=pixel_level, decoder=decoder, text_encoder=text_encoder, dim=cfg.dim, heads=cfg.heads,
                 ffn_dim=cfg.ffn_dim, num_motion_queries=cfg.num_motion_queries, hmp_blocks=cfg.hmp_blocks,
                 hmp_stages=cfg.hmp_stages, window=cfg.window, decoder_layers=cfg.decoder_layers,
                 inject_scale=cfg.inject_scale, cl_dim=cfg.cl_dim, decouple=cfg.ds, hierarchical=cfg.hmp,
                 contrastive=cfg.cl)


MODEL_FIELDS = ("dim", "heads", "ffn_dim", "num_static_queries", "num_motion_queries", "m2f_layers", "hmp_blocks",
                "hmp_stages", "window", "decoder_layers", "inject_scale", "toy_text_dim", "cl_dim", "ds", "hmp", "cl")


def load_model(cfg, root, device):
    """A trained model from --checkpoint (default <out>/last.pt), built with the model settings it
    was trained with, for evaluation or prediction."""
    checkpoint = read_checkpoint(cfg.checkpoint or run_dir(cfg) / "last.pt")
    cfg = replace(cfg, **{k: checkpoint["config"][k] for k in MODEL_FIELDS})
    model = build_model(cfg, vocab=toy_vocab(root) if cfg.data == "toy" else None)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def memory_bank_targets(samples):
    """Sec. 3.3: a target is the set of objects an expression refers to in its video. Returns the
    target of each sample (num_samples,) and the video of each target (num_targets,)."""
    keys = [(s["video"], tuple(sorted(s["obj_ids"]))) for s in samples]
    target_index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    video_index = {video: i for i, video in enumerate(dict.fromkeys(s["video"] for s in samples))}
    sample_target = torch.tensor([target_index[key] for key in keys])
    target_video = torch.tensor([video_index[video] for video, _ in target_index])
    return sample_target, target_video


def param_groups(model, cfg):
    """AdamW groups (official): backbone lr x backbone_lr_mult; no weight decay on norms, biases, embeddings."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            backbone = module_name.startswith("pixel_level.backbone")
            no_decay = p.ndim <= 1 or isinstance(module, nn.Embedding)
            key = (backbone, no_decay)
            groups.setdefault(key, {"params": [], "lr": cfg.lr * (cfg.backbone_lr_mult if backbone else 1),
                                    "weight_decay": 0.0 if no_decay else cfg.weight_decay})["params"].append(p)
    return list(groups.values())


# ---------------------------------------------------------------------------------- training
def train(cfg, ddp, root):
    """Sec. 4.2 recipe; returns the trained model (unwrapped) and the memory bank."""
    seed_everything(cfg.seed)  # identical initial weights on every process (DDP also broadcasts them)
    out = run_dir(cfg)
    if cfg.data == "davis":
        raise SystemExit("dshmp: Ref-DAVIS17 is evaluation only (paper Sec. 4.4): train with --data ytvos, then "
                         "--data davis --eval --checkpoint runs/dshmp-ytvos/last.pt")
    if cfg.batch_size % ddp.world_size:
        raise SystemExit(f"dshmp: --batch-size {cfg.batch_size} is not divisible by {ddp.world_size} processes")
    dataset = make_dataset(cfg, root, "train", train=True)
    model = build_model(cfg, vocab=toy_vocab(root) if cfg.data == "toy" else None).to(ddp.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 if s >= cfg.lr_drop else 1.0)
    sample_target, target_video = memory_bank_targets(dataset.samples)
    bank = MemoryBank(num_targets=len(target_video), dim=cfg.cl_dim, target_video=target_video,
                      momentum=cfg.cl_momentum, generator=torch.Generator().manual_seed(cfg.seed))
    step = 0
    if cfg.resume:
        state = load_checkpoint(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler)
        step, bank.centroids = state["step"], state["extra"]["memory_bank"]
        if is_main():
            print(f"dshmp: resumed from {out / 'last.pt'} at step {step}")
    bank.to(ddp.device)
    if ddp.distributed:
        model = DistributedDataParallel(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ddp.world_size, rank=ddp.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size // ddp.world_size, sampler=sampler,
                                         num_workers=cfg.workers, collate_fn=collate_video, drop_last=True,
                                         persistent_workers=cfg.workers > 0)

    def batches(epoch):  # an endless stream; a resumed run starts the epoch it stopped in again
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches(step // len(loader))
    model.train()
    with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
        while step < cfg.steps:
            batch = next(stream)
            frames, targets = batch["frames"].to(ddp.device), to_device(batch["targets"], ddp.device)
            bank_targets = sample_target[batch["index"]].to(ddp.device)  # (B,)
            with autocast(ddp.device):
                outputs = model(frames, batch["expression"])
            terms, anchors = compute_losses(cfg, outputs, targets, bank=bank if cfg.cl else None, bank_targets=bank_targets)
            w_cl = cfg.w_cl if step >= cfg.cl_start else 0.0  # Sec. 3.3: computed after cl_start iterations
            loss = (cfg.w_cls * (terms["frame_ce"] + terms["video_ce"]) + cfg.w_bce * (terms["frame_bce"] + terms["video_bce"])
                    + cfg.w_dice * (terms["frame_dice"] + terms["video_dice"]) + w_cl * terms.get("cl", 0.0))
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}: { {k: float(v) for k, v in terms.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if cfg.cl:  # Eq. (8) with the anchors of every process, so the bank stays identical everywhere
                bank.update(all_gather_cat(anchors.detach()), all_gather_cat(bank_targets))
            if step % cfg.log_every == 0 or step == cfg.steps:
                progress.log(step, reduce_dict({"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}),
                             lr=max(scheduler.get_last_lr()))  # the base lr (the backbone's is lower)
            if (step % cfg.save_every == 0 or step == cfg.steps) and is_main():
                save_checkpoint(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                                config=asdict(cfg), extra={"memory_bank": bank.centroids.cpu()})
    return unwrap(model), bank


# ---------------------------------------------------------------------------------- evaluation
def predict_masks(model, frames, expression, orig_size, *, threshold, chunk):
    """frames (T, 3, h, w) normalised -> (T, H0, W0) bool: the union of the masks of every video
    token whose target score exceeds the threshold, empty when none does (Sec. 4.2)."""
    h, w = frames.shape[-2:]
    padded = F.pad(frames, (0, -w % 32, 0, -h % 32))  # (T, 3, Hp, Wp)
    with autocast(frames.device):
        logits, masks = model.infer(padded, expression, chunk=chunk)  # (N_m, 2), (N_m, T, h/4, w/4)
    keep = logits.float().softmax(-1)[:, 0] > threshold  # (N_m,)
    if not keep.any():
        return torch.zeros(frames.shape[0], *orig_size, dtype=torch.bool, device=frames.device)
    masks = F.interpolate(masks[keep].float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)  # (K, T, Hp, Wp)
    masks = F.interpolate(masks[..., :h, :w], size=tuple(orig_size), mode="bilinear", align_corners=False)  # (K, T, H0, W0)
    return (masks > 0).any(0)  # (T, H0, W0)


def write_pngs(masks, folder, frame_names):
    folder.mkdir(parents=True, exist_ok=True)
    for mask, name in zip(masks.cpu().numpy(), frame_names):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.png")


@torch.no_grad()
def evaluate(cfg, model, root, device):
    """J, F, J&F on a split with masks (eval.json; toy: also on the motion-only expressions), or the
    submission tree <video>/<exp_id>/<frame>.png and its zip for a split without (MeViS valid,
    Ref-YouTube-VOS valid). Expressions are shared out over the processes."""
    out = run_dir(cfg)
    distributed = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    dataset = make_dataset(cfg, root, cfg.eval_split, train=False)
    submission = out / f"submission-{cfg.eval_split}"
    model.eval()
    metrics, motion_only, shown = VideoMetrics(), set(), 0
    for i in tqdm(range(rank, len(dataset), world), desc=f"eval {cfg.eval_split}", disable=not is_main()):
        item = dataset[i]
        masks = predict_masks(model, item["frames"].to(device), item["expression"], item["orig_size"],
                              threshold=cfg.score_threshold, chunk=cfg.eval_chunk)  # (T, H0, W0)
        key = f"{item['video']}/{item['exp_id']}"
        if item["gt"] is None:
            folder = submission / ("Annotations" if cfg.data == "ytvos" else "") / key
            write_pngs(masks, folder, item["frame_names"])
        else:
            metrics.add(masks, item["gt"].to(device), key=key)
            if item["motion_only"]:
                motion_only.add(key)
        if shown < 4 and is_main():  # a few overlays to look at
            frames = denormalize(F.interpolate(item["frames"], size=tuple(item["orig_size"]), mode="bilinear"))
            save_overlays(frames, masks.cpu().numpy(), out / "vis" / key.replace("/", "_"),
                          name=item["expression"].replace(" ", "_")[:60])
            shown += 1
    gathered = VideoMetrics()
    for records, keys in all_gather_object((metrics.records, sorted(motion_only))):
        gathered.extend(records)
        motion_only.update(keys)
    if not is_main():
        return None
    if not gathered.records:  # a split without masks: zip the submission tree
        archive = shutil.make_archive(str(submission), "zip", root_dir=submission)
        print(f"dshmp: wrote the submission tree {submission} and {archive}")
        return None
    result = {"split": cfg.eval_split, "checkpoint": str(cfg.checkpoint or out / "last.pt"), **gathered.summary()}
    if motion_only:
        subset = VideoMetrics()
        subset.extend([r for r in gathered.records if r["key"] in motion_only])
        result["motion_only"] = subset.summary()
    result["per_expression"] = gathered.records
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "per_expression"}
    print(f"dshmp: {json.dumps(summary)} -> {out / 'eval.json'}")
    return result


# ---------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(cfg):
    """--predict DIR_OR_IMAGE --text "...": overlay PNGs (and a GIF for a video) in <out>/vis/predict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = Path(cfg.predict)
    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if source.is_dir() else [source]
    if not paths or not paths[0].is_file():
        raise SystemExit(f"dshmp: --predict needs a folder of .jpg/.png frames or one image, got {source}")
    if not cfg.text.strip():
        raise SystemExit('dshmp: --predict needs an expression: --text "the dog running to the left"')
    model = load_model(cfg, data_root(cfg) if cfg.data == "toy" else None, device)
    raw = torch.stack([load_rgb(p) for p in paths])  # (T, 3, H0, W0) uint8
    frames = normalize(resize_clip(raw, short_side=cfg.short_side, max_size=cfg.max_size)[0])  # (T, 3, H, W)
    masks = predict_masks(model, frames.to(device), " ".join(cfg.text.lower().split()), tuple(raw.shape[-2:]),
                          threshold=cfg.score_threshold, chunk=cfg.eval_chunk)  # (T, H0, W0)
    files = save_overlays(rearrange(raw, "t c h w -> t h w c").numpy(), masks.cpu().numpy(), run_dir(cfg) / "vis" / "predict")
    print(f"dshmp: {int(masks.flatten(1).any(1).sum())} of {len(paths)} frames have a mask; wrote {files[-1].parent}")


def main(argv=None):
    cfg = get_config(argv)
    if cfg.count_params:
        print(parameter_report(build_model(cfg, vocab=["a"], pretrained=False)))
    elif cfg.predict:
        predict(cfg)
    elif cfg.train or cfg.eval:
        ddp = setup_distributed()
        root = data_root(cfg)
        model = train(cfg, ddp, root)[0] if cfg.train else load_model(cfg, root, ddp.device)
        evaluate(cfg, model, root, ddp.device)
        cleanup_distributed()
    else:
        raise SystemExit("dshmp: nothing to do; pass --train, --eval, --predict DIR --text '...' or --count-params (see --help)")


if __name__ == "__main__":
    main()
