"""DsHmp: Decoupling Static and Hierarchical Motion Perception for Referring Video Segmentation.
Shuting He and Henghui Ding, CVPR 2024. Official code: github.com/heshuting555/DsHmp @ d0c3a39.

Implements Sec. 3.1 (static and motion cues, injected into N_s static queries before Mask2Former,
Eq. 1, and N_m motion queries before the Motion Decoder, Eq. 2), Sec. 3.2 (Hierarchical Motion
Perception: Hungarian matching of adjacent frames' object tokens, Eq. 3; blocks of temporal
self-attention, hierarchical cross-attention over L stages, Eqs. 4-7, and FFN; the Motion
Decoder's video tokens, each dotted with every frame's mask features), Sec. 3.3 (memory bank of
per-target centroids, contrastive loss, Eqs. 8-9), Sec. 3.4 (frame- and video-level set losses),
Sec. 4.2 (recipe; inference: the union of the video tokens scoring > 0.5 on MeViS, the best token
on Ref-YouTube-VOS and Ref-DAVIS17, whose one target is always there, as their official codes do).

Deviations from the paper (and from the official code, which the paper does not describe):
  - Static/motion split: the rule-based common.text (verbs and adverbs -> motion) approximates the
    spaCy VERB/ADV tags of the official code; the paper names a scene-graph parser [46].
  - Sentence embedding: masked mean of the RoBERTa words (official: RoBERTa's pooler, which
    roberta-base does not ship, so it is random and frozen; DsHmp issue #13). --no-ds feeds all
    words to both injections; the paper's baseline feeds the sentence embedding.
  - Eq. (3) applies the matched permutation (official: its inverse, right only for swaps) once
    before the blocks; the tokens stay in trajectory order (official: every block, then unsorted).
  - Eqs. (4)-(7): to_q projects the tokens at every stage (official: stage 1 only); Eq. (6) merges
    with the Eq. (5) weights, as the paper says (official: a plain mean, DsHmp issue #21); Eq. (7)
    sums all L stages back onto the frames, then a LayerNorm (official: the last stage only,
    through a tanh gate, no norm).
  - Sec. 3.3 as the paper: one memory-bank centroid per target (official: per expression),
    InfoNCE at temperature 0.07 on normalised features with K = 100 negatives from iteration
    10,000, momentum 0.2 (official: QDTrack's multi-positive loss without temperature plus an L2
    term, 100 samples in all, weight ramped over 2,000 iterations, momentum 0.1); the loss reads
    the bank before this step's update (official: after).
  - Text in the pixels and the decoder layers (official code; the paper is silent): LAVT's PWAM
    after every Swin stage's blocks, its output the stage's feature map (common.lavt). The
    official code also builds LAVT's tanh gate that would feed it into the next stage, but
    zero-initialises both of its layers (mask2former/modeling/backbone/swin.py, MMBasicLayer), so
    the gate's gradient is zero and it stays shut: we build no gate. Word cross-attention in
    every Mask2Former layer (static cues) and Motion-Decoder layer (motion cues, query positions
    added to the queries; official: all words, no positions) and no BiAttention block.
  - No VITA similarity loss (official, weight 1.0); object tokens from the last Mask2Former layer
    only (official: the last 3 as extra batch entries in training); the same non-shifted windows
    in training and test (official: odd blocks shifted at test, from VITA).
  - Frames resized to short side 360 / long side <= 640 in training and test (Sec. 4.2; official:
    multi-scale crops, 448 at test); a flip swaps "left"/"right" in the expression (official: no
    swap). The frozen RoBERTa runs in eval mode (official: dropout on). Mixed precision on CUDA:
    bf16 autocast without a gradient scaler (official: fp16 AMP), the pixel decoder in fp32 (as
    official).
  - RefCOCO/+/g pre-training before Ref-YouTube-VOS / A2D (Sec. 4.2, 300,000 iterations,
    "following" ReferFormer and MTTR): --data refcoco|refcoco+|refcocog, one set a run, each image
    a pseudo-video by VITA's recipe (ours, common.datasets.PseudoVideo; ReferFormer pre-trains on
    single images of the three sets at once); the main stage starts from it with --init.
  - A2D-Sentences / JHMDB-Sentences (Table 5): the image Swin-T backbone (the rows: Video-Swin-T/B);
    ReferFormer's clips, losses on the one annotated frame; scored as ReferFormer scores its
    queries, each token's mask with its target score (the official code has no A2D evaluation).

Run (every option: --help):
  python dshmp.py --data toy --train                     # toy data generated if missing; CPU
  python dshmp.py --data toy-refcoco --train             # toy pre-training (pseudo-videos), then
  python dshmp.py --data toy --train --init runs/dshmp-toy-refcoco/last.pt
  torchrun --nproc_per_node 8 dshmp.py --data mevis --train  # paper configuration, data/mevis
  python dshmp.py --data toy --predict FRAMES_DIR --text "the red circle moving to the left"
  ablations (paper Table 1): --no-ds, --no-hmp, --no-cl
  diagnostic (ours, not the paper's): --token-position, each token O + where its mask lies
"""

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from scipy.optimize import linear_sum_assignment
from transformers import RobertaModel

from common.backbones import (PixelLevel, TextEncoder, load_mask2former, parameter_report,
                              roberta_base_config, swin_tiny_coco_config)
from common.datasets import (A2DSentences, JHMDBSentences, MeViS, RefDAVIS17, RefYouTubeVOS,
                             collate_video)
from common.engine import (Progress, all_gather_cat, autocast, cleanup_distributed, is_main,
                           reduce_dict, save_checkpoint, seed_everything,
                           setup_distributed, to_device, unwrap)
from common.lavt import LanguageAwareSwin
from common.mask2former import (MLP, MaskedAttentionDecoder, PositionEmbedding, c2_xavier_fill_,
                                decoder_kwargs_from_hf, load_decoder_weights, mask_position,
                                xavier_init_)
from common.matching import (annotated_frames, frame_targets, num_masks, set_losses,
                             visible_objects)
from common.run import (PSEUDO_VIDEO_SETS, RunConfig, check_finite, cli_errors, data_root,
                        evaluate_video, init_weights, load_trained, param_groups, parse_config,
                        predict_files, pseudo_videos, resume, run_dir, toy_vocab,
                        train_batches, video_query_masks, wrap_ddp)
from common.text import batch_static_motion_token_masks, word_tokenizer
from common.vita import ObjectDecoder
from data.toy import ensure_toy, toy_video_evaluation

# Shapes: B clips, T frames, Q object tokens per frame (the N_s static queries), M video tokens
# (the N_m motion queries), L text tokens (+1: the sentence embedding appended), C channels, H W
# frame size, h w mask-feature size (H/4, W/4), n windows of K frames, P trajectories (n*Q per
# clip), S tokens per trajectory at a hierarchical stage, D contrastive width, A anchors,
# E negatives, G memory-bank targets.


# ------------------------------------------------------------------------------------ config
@dataclass
class Config(RunConfig):
    data: str = "mevis"  # mevis | ytvos | davis | a2d | jhmdb (paper configuration) | toy (CPU)
    eval_split: str = "valid_u"  # MeViS: valid_u (J&F) or valid (submission); toy: valid_u
    # ablations, paper Table 1
    ds: bool = True  # Sec. 3.1 decoupling; --no-ds feeds the whole sentence to both injections
    hmp: bool = True  # Sec. 3.2; --no-hmp keeps the temporal self-attention only
    cl: bool = True  # Sec. 3.3; --no-cl drops the contrastive loss
    token_position: bool = False  # (ours) a diagnostic: frame_tokens, O + where its mask lies
    # model
    weights: str = "facebook/mask2former-swin-tiny-coco-instance"  # Sec. 4.4 Swin-T; COCO: official
    text_weights: str = "FacebookAI/roberta-base"  # paper Sec. 4.2
    dim: int = 256  # official (Mask2Former hidden size)
    heads: int = 8  # official
    ffn_dim: int = 2048  # official
    num_static_queries: int = 20  # N_s, paper Sec. 4.2
    num_motion_queries: int = 10  # N_m, paper Sec. 4.2
    m2f_layers: int = 9  # official (Mask2Former DEC_LAYERS 10 = 9 layers + the initial prediction)
    hmp_blocks: int = 6  # official (VITA ENC_LAYERS); paper silent
    hmp_stages: int = 3  # L, paper Sec. 4.2 / Table 2b
    window: int = 8  # K, official (ENC_WINDOW_SIZE); paper silent
    decoder_layers: int = 3  # Motion Decoder, official (VITA DEC_LAYERS); paper silent
    inject_scale: float = 0.1  # official Q = Q_0 + 0.1 * MHA(Q_0, F); Eqs. (1)-(2) lost in the text
    toy_text_dim: int = 64  # toy only: width of the tiny RoBERTa (ours)
    # contrastive learning, Sec. 3.3
    cl_negatives: int = 100  # E (K in the paper), paper Sec. 4.2 / Table 2c
    cl_start: int = 10_000  # inferred from Sec. 4.2's values (their symbols are lost; Sec. 3.3)
    cl_momentum: float = 0.2  # Eq. (8) update speed, inferred from Sec. 4.2's values
    cl_temperature: float = 0.07  # Eq. (9) temperature, inferred from Sec. 4.2's values
    cl_dim: int = 256  # D, official (contrastive_embed output)
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
    weight_decay: float = 0.05  # official; none on norms, embeddings, Swin position tables
    grad_clip: float = 0.01  # official (full-model L2 norm)
    batch_size: int = 8  # clips per step over all processes; official: 8 GPUs x 1
    num_frames: int = 8  # official (SAMPLING_FRAME_NUM); paper silent
    frame_range: int = 10  # official (SAMPLING_FRAME_RANGE); a2d: ReferFormer's clips, not this
    short_side: int = 360  # paper Sec. 4.2
    max_size: int = 640  # paper Sec. 4.2
    score_threshold: float = 0.5  # paper Sec. 4.2 (official TEST_OUTPUT_THRESHOLD)
    top1: bool = False  # the best video token instead of the union (Ref-YouTube-VOS, Ref-DAVIS17)
    eval_chunk: int = 18  # official: frames per chunk through Mask2Former at test


PRESETS = {  # per-dataset deltas from the paper configuration above
    # toy (ours): a tiny model for 2 CPU cores; cl_start keeps the paper's 10,000 / 50,000 ratio;
    # random init, so the backbone gets the full lr; 8 clips x 4 frames (twice the sentences of
    # 4 x 8 in a step at the same cost); no loader worker (it competes with torch's threads).
    "toy": dict(dim=64, heads=4, ffn_dim=256, m2f_layers=3, hmp_blocks=2, num_points=1024,
                steps=1500, lr=1e-3, lr_drop=1200, backbone_lr_mult=1.0, grad_clip=1.0,
                cl_start=300, cl_dim=64, batch_size=8, num_frames=4, short_side=64, max_size=96,
                eval_chunk=32, workers=0, log_every=10, save_every=250),
    "mevis": dict(),
    "ytvos": dict(eval_split="valid", top1=True),  # one target, always there: official codes' top-1
    "davis": dict(eval_split="valid", top1=True),
    "a2d": dict(eval_split="test", top1=True),  # Table 5; the window: num_frames (ReferFormer: 5)
    "jhmdb": dict(eval_split="test", top1=True),  # Table 5: zero-shot, --checkpoint of --data a2d
    # pre-training (Sec. 4.2), pseudo-videos (ours), no evaluation; lr drop at 0.8 of it as the
    # main stage's 40,000 / 50,000 (ours); toy-refcoco: the toy image set, toy's model and recipe
    **{name: dict(steps=300_000, lr_drop=240_000) for name in ("refcoco", "refcoco+", "refcocog")},
}
PRESETS["toy-refcoco"] = PRESETS["toy"]
ABLATIONS = ("ds", "hmp", "cl", "token_position")  # name the run folder


# ------------------------------------------------------------------------ Sec. 3.1 decoupling
class Text(NamedTuple):
    """The expression as the model uses it (`DsHmp.encode_text`), batch-first."""
    cues: torch.Tensor  # (B, L+1, C) the word features and the sentence embedding, projected
    static_mask: torch.Tensor  # (B, L+1) True on the static cues and the sentence
    motion_mask: torch.Tensor  # (B, L+1) True on the motion cues and the sentence
    encoder_words: torch.Tensor  # (B, L, C_text) the text encoder's own features (for PWAM)
    encoder_mask: torch.Tensor  # (B, L) True on the text encoder's real tokens


class CueInjection(nn.Module):
    """Eqs. (1)-(2): inject language cues into learnable queries by cross-attention,
    Q = Q_0 + scale * LN(Q_0 + MHA(Q_0, F, F)) (post-norm, scale, dropout and xavier
    initialisation from the official code's CrossAttentionLayer)."""

    def __init__(self, *, dim, heads, scale, dropout=0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.scale = scale
        xavier_init_(self)

    def forward(self, queries, words, word_mask):
        # queries (B, Q, C), words (B, L, C), word_mask (B, L) True = attend
        cues = self.attn(queries, words, words, key_padding_mask=~word_mask)[0]  # (B, Q, C)
        return queries + self.scale * self.norm(queries + cues)


# -------------------------------------------------------------------------------- Sec. 3.2 HMP
@torch.no_grad()
def align_tokens(tokens):
    """Eq. (3): Hungarian matching of adjacent frames' object tokens, as in MinVIS [20].

    tokens (B, T, Q, C) -> perm (B, T, Q) with tokens[b, t, perm[b, t, i]] the token of trajectory
    i in frame t. Frame 0 is the reference; every frame is matched to the already aligned previous
    frame with cost 1 - cosine similarity. (The official code applies the inverse permutation.)
    """
    B, T, Q, _ = tokens.shape
    unit = F.normalize(tokens.float(), dim=-1).cpu()  # (B, T, Q, C)
    perm = torch.arange(Q).repeat(B, T, 1)  # (B, T, Q)
    for b in range(B):
        for t in range(1, T):
            previous = unit[b, t - 1, perm[b, t - 1]]  # (Q, C), aligned
            cost = 1 - previous @ unit[b, t].T  # (Q, Q): rows trajectories, columns this frame
            rows, cols = linear_sum_assignment(cost.float().numpy())  # float: under autocast too
            perm[b, t, torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(tokens.device)


def merge_neighbours(x, weights, valid):
    """Eq. (6): merge frames 2j and 2j+1 into one token, averaged with the frame weights of Eq. 5.

    x (..., S, C), weights (..., S), valid (..., S) -> (..., S/2, C), (..., S/2). An odd S gets one
    zero-weight frame appended; padded frames carry zero weight, so they never enter a merge.
    """
    if x.shape[-2] % 2:
        x = F.pad(x, (0, 0, 0, 1))  # (..., S+1, C)
        weights, valid = F.pad(weights, (0, 1)), F.pad(valid, (0, 1))
    x = rearrange(x, "... (s two) c -> ... s two c", two=2)  # (..., S/2, 2, C)
    weights = rearrange(weights, "... (s two) -> ... s two", two=2)  # (..., S/2, 2)
    merged = einsum(weights, x, "... s two, ... s two c -> ... s c")  # (..., S/2, C)
    merged = merged / (weights.sum(-1, keepdim=True) + 1e-8)
    return merged, rearrange(valid, "... (s two) -> ... s two", two=2).any(-1)  # (..., S/2)


def frame_attention(q, k, v, valid, word_mask):
    """Eqs. (4)-(5): trajectories q (B, P, S, C), motion cues k, v (B, L, C), valid (B, P, S),
    word_mask (B, L) -> (the cues each token reads (B, P, S, C), frame weights w^h (B, P, S))."""
    logits = einsum(q, k, "b p s c, b l c -> b p s l") / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~valid[..., None], -math.inf)  # (B, P, S, L)
    attn = logits.softmax(dim=2) * word_mask[:, None, None, :]  # Eq. (4): over frames
    weights = attn.sum(-1)  # (B, P, S), Eq. (5): frame weights w^h
    attn = attn / (weights[..., None] + 1e-8)
    return einsum(attn, v, "b p s l, b l c -> b p s c"), weights


class HierarchicalCrossAttention(nn.Module):
    """Sec. 3.2, Eqs. (4)-(7): each object trajectory attends to the motion cues at L scales.

    Stage h: frame attention A^h = softmax over frames of q k^T / sqrt(C) (Eq. 4); frame weights
    w^h = sum of A^h over the words and motion-enriched tokens (Eq. 5); weighted merging of
    neighbouring frames (Eq. 6). The merged tokens of all stages, expanded back to the frames, are
    added to the trajectory (Eq. 7). Single-head with k, v shared by the stages (official code).
    """

    def __init__(self, *, dim, num_stages):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_stages))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_stages))
        self.norm = nn.LayerNorm(dim)

    def forward(self, traj, valid, words, word_mask):
        # traj (B, P, K, C) one trajectory per row, valid (B, P, K); words (B, L, C); word_mask
        k, v = self.to_k(words), self.to_v(words)  # (B, L, C)
        x, stage_valid, stages = traj, valid, []
        for proj, norm in zip(self.proj, self.norms):
            attended, weights = frame_attention(self.to_q(x), k, v, stage_valid, word_mask)
            enriched = norm(x + proj(attended))  # Eq. (5)
            x, stage_valid = merge_neighbours(enriched, weights, stage_valid)  # Eq. (6): S -> S/2
            span = 2 ** (len(stages) + 1)  # frames per merged token at this stage
            stages.append(x.repeat_interleave(span, dim=2)[:, :, : traj.shape[2]])  # (B, P, K, C)
        return self.norm(traj + sum(stages))  # Eq. (7)


class HMPBlock(nn.Module):
    """One HMP block (Sec. 3.2, Fig. 3): temporal self-attention over all object tokens of a
    window, hierarchical cross-attention with the motion cues, FFN; post-norm residuals. The
    self-attention and FFN are xavier-initialised, the hierarchical cross-attention keeps
    PyTorch's default (official)."""

    def __init__(self, *, dim, heads, ffn_dim, num_stages, hierarchical):
        super().__init__()
        self.self_attn = xavier_init_(nn.MultiheadAttention(dim, heads, batch_first=True))
        self.norm1 = nn.LayerNorm(dim)
        self.cross = HierarchicalCrossAttention(dim=dim, num_stages=num_stages) if hierarchical \
            else None
        self.ffn = xavier_init_(nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(),
                                              nn.Linear(ffn_dim, dim)))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, valid, words, word_mask):
        # x (B, n, K, Q, C) object tokens in n windows of K frames, valid (B, n, K)
        B, n, K, Q, _ = x.shape
        tokens = rearrange(x, "b n k q c -> (b n) (k q) c")  # (B*n, K*Q, C)
        padding = repeat(~valid, "b n k -> (b n) (k q)", q=Q)  # (B*n, K*Q)
        attended = self.self_attn(tokens, tokens, tokens, key_padding_mask=padding)[0]
        x = rearrange(self.norm1(tokens + attended), "(b n) (k q) c -> b n k q c", b=B, q=Q)
        if self.cross is not None:
            traj = rearrange(x, "b n k q c -> b (n q) k c")  # (B, P, K, C), P = n*Q trajectories
            traj_valid = repeat(valid, "b n k -> b (n q) k", q=Q)  # (B, P, K)
            traj = self.cross(traj, traj_valid, words, word_mask)  # (B, P, K, C)
            x = rearrange(traj, "b (n q) k c -> b n k q c", q=Q)  # (B, n, K, Q, C)
        return self.norm2(x + self.ffn(x))


class HierarchicalMotionPerception(nn.Module):
    """HMP (Sec. 3.2): object tokens O (B, T, Q, C) -> motion-aware tokens, in windows of K
    frames (a length that is not a multiple of K is zero-padded and masked). No temporal position
    (the paper names none, the official code adds none): a clip played backwards gives the same
    tokens in reverse order, so "moving left" and "moving right" look alike
    (tests/test_dshmp.py::test_a_clip_played_backwards_gets_the_same_scores)."""

    def __init__(self, *, dim, heads, ffn_dim, num_blocks, num_stages, window, hierarchical):
        super().__init__()
        self.window, self.hierarchical = window, hierarchical
        block = dict(dim=dim, heads=heads, ffn_dim=ffn_dim, num_stages=num_stages,
                     hierarchical=hierarchical)
        self.blocks = nn.ModuleList(HMPBlock(**block) for _ in range(num_blocks))

    def forward(self, tokens, words, word_mask):
        (B, T, _, C), K = tokens.shape, self.window
        if self.hierarchical:  # trajectories for the hierarchical merging (Table 2d)
            perm = align_tokens(tokens)  # Eq. (3), (B, T, Q)
            tokens = torch.gather(tokens, 2, repeat(perm, "b t q -> b t q c", c=C))  # (B, T, Q, C)
        pad = -T % K  # the last window is zero-padded and masked
        x = rearrange(F.pad(tokens, (0, 0, 0, 0, 0, pad)), "b (n k) q c -> b n k q c", k=K)
        valid = repeat(torch.arange(T + pad, device=tokens.device) < T, "(n k) -> b n k", k=K, b=B)
        # x (B, n, K, Q, C): n windows of K frames; valid (B, n, K): False on the padding
        for block in self.blocks:
            x = block(x, valid, words, word_mask)
        return rearrange(x, "b n k q c -> b (n k) q c")[:, :T]  # (B, T, Q, C)


# ------------------------------------------------------------------------------------- model
class DsHmp(nn.Module):
    """frames (B, T, 3, H, W) + expressions -> outputs dict: pred_logits (B, M, 2) target /
    no-object, pred_masks (B, M, T, h, w), aux_outputs (earlier Motion-Decoder layers), embeds
    (B, M, D) contrastive projections (when contrastive), and frame_outputs: Mask2Former's
    per-frame outputs (pred_logits (B*T, Q, 2), pred_masks, aux_outputs)."""

    def __init__(self, *, pixel_level, decoder, text_encoder, dim, heads, ffn_dim,
                 num_motion_queries, hmp_blocks, hmp_stages, window, decoder_layers, inject_scale,
                 cl_dim, decouple=True, hierarchical=True, contrastive=True,
                 token_position=False):
        super().__init__()
        self.decouple = decouple
        self.pixel_level = pixel_level  # Swin + multi-scale deformable pixel decoder (transformers)
        self.decoder = decoder  # Mask2Former's decoder; its query_feat is Q_s^0 of Eq. (1)
        self.text_encoder = text_encoder  # RoBERTa, frozen in the paper configuration
        width = text_encoder.hidden_size
        self.text_proj = nn.Sequential(  # official FeatureResizer: words and sentence share it
            nn.Linear(width, dim), nn.LayerNorm(dim, eps=1e-12), nn.Dropout(0.1))
        self.fusion = LanguageAwareSwin(  # PWAM, no gate: the official one never opens
            channels=pixel_level.backbone.channels, word_dim=width, feedback=False)
        self.static_injection = CueInjection(dim=dim, heads=heads, scale=inject_scale)  # Eq. (1)
        self.motion_injection = CueInjection(dim=dim, heads=heads, scale=inject_scale)  # Eq. (2)
        self.motion_perception = HierarchicalMotionPerception(
            dim=dim, heads=heads, ffn_dim=ffn_dim, num_blocks=hmp_blocks, num_stages=hmp_stages,
            window=window, hierarchical=hierarchical)
        self.motion_decoder = ObjectDecoder(  # Sec. 3.2 Motion Decoder: VITA's, with word attention
            dim=dim, heads=heads, ffn_dim=ffn_dim, num_layers=decoder_layers, word_attention=True,
            num_queries=num_motion_queries, num_frame_queries=decoder.num_queries)
        self.motion_mask_proj = c2_xavier_fill_(  # official vita_mask_features
            nn.Conv2d(pixel_level.mask_channels, dim, 1))
        self.class_head = nn.Linear(dim, 2)
        self.mask_embed = MLP(dim, dim, dim, num_layers=3)
        self.contrastive_head = MLP(dim, dim, cl_dim, num_layers=3) if contrastive else None
        # --token-position (ours, a diagnostic), built last so every other module starts the same
        self.token_position = PositionEmbedding(3, dim) if token_position else None

    def forward(self, frames, expressions):
        B, T = frames.shape[:2]
        text = self.encode_text(expressions)
        queries = self.static_queries(text).repeat_interleave(T, 0)  # (B*T, Q, C)
        frame_text = Text(*(x.repeat_interleave(T, 0) for x in text))  # (B*T, ...)
        frames = rearrange(frames, "b t c h w -> (b t) c h w")
        frame_out, mask_feats = self.segment_frames(frames, queries, frame_text)
        tokens = rearrange(self.frame_tokens(frame_out), "(b t) q c -> b t q c", b=B)  # O
        mask_feats = rearrange(mask_feats, "(b t) c h w -> b t c h w", b=B)
        return {**self.decode_video(tokens, mask_feats, text), "frame_outputs": frame_out}

    def encode_text(self, expressions) -> Text:
        """Sec. 3.1: word features, the sentence embedding, and where the static and the motion
        cues are (the sentence embedding joins both sets)."""
        encoded = self.text_encoder(expressions)
        words = torch.cat([encoded["word_feats"], encoded["sentence"][:, None]], 1)  # (B, L+1, C_t)
        static, motion = batch_static_motion_token_masks(expressions, encoded["offsets"])  # (B, L)
        if not self.decouple:  # Table 1 without DS: the whole sentence feeds both injections
            static = motion = encoded["word_mask"]
        sentence = torch.ones_like(static[:, :1])  # (B, 1)
        static, motion = torch.cat([static, sentence], 1), torch.cat([motion, sentence], 1)
        return Text(cues=self.text_proj(words), static_mask=static.to(words.device),
                    motion_mask=motion.to(words.device), encoder_words=encoded["word_feats"],
                    encoder_mask=encoded["attn_mask"].to(words.device))

    def static_queries(self, text: Text):
        q0 = repeat(self.decoder.query_feat.weight, "q c -> b q c", b=len(text.cues))  # (B, Q, C)
        return self.static_injection(q0, text.cues, text.static_mask)  # Eq. (1)

    def segment_frames(self, frames, queries, text: Text):
        """Mask2Former on every frame: frames (B*T, 3, H, W), queries (B*T, Q, C), text repeated
        over the frames. The Swin stages are language-aware (LAVT, official), the decoder's word
        attention reads the static cues. Returns Mask2Former's outputs and the mask features
        (B*T, C, h, w) of the video head."""
        def encode(backbone, pixel_values):  # official: res2-res5 are the PWAM outputs
            return self.fusion(backbone, pixel_values, text.encoder_words, text.encoder_mask)

        pixels = self.pixel_level(frames, encode=encode)
        out = self.decoder(pixels["features"], pixels["pos"], pixels["mask_features"],
                           queries=queries, words=text.cues, word_mask=text.static_mask)
        return out, self.motion_mask_proj(pixels["mask_features"])  # (B*T, C, h, w)

    def frame_tokens(self, frame_out):
        """The object tokens O (N, Q, C) of N frames: the frame decoder's last-layer queries; with
        --token-position (ours, a diagnostic) plus an embedding of where each one's mask lies."""
        tokens = frame_out["query_embeds"][-1]
        if self.token_position is not None:
            tokens = tokens + self.token_position(mask_position(frame_out["pred_masks"]))
        return tokens

    def decode_video(self, tokens, mask_feats, text: Text):
        """Object tokens O (B, T, Q, C) -> HMP -> Motion Decoder -> video tokens V -> class scores
        and video masks (each V dotted with every frame's mask features (B, T, C, h, w))."""
        words, motion = text.cues, text.motion_mask
        tokens = self.motion_perception(tokens, words, motion)  # (B, T, Q, C)
        q0 = repeat(self.motion_decoder.query_feat.weight, "m c -> b m c", b=len(tokens))  # Q_m^0
        queries = self.motion_injection(q0, words, motion)  # Eq. (2), (B, M, C)
        video_tokens = self.motion_decoder(tokens, queries, words, motion)  # V, layers x (B, M, C)
        preds = [{"pred_logits": self.class_head(v),  # (B, M, 2)
                  "pred_masks": einsum(self.mask_embed(v), mask_feats,
                                       "b m c, b t c h w -> b m t h w")}  # (B, M, T, h, w)
                 for v in video_tokens]
        out = {**preds[-1], "aux_outputs": preds[:-1]}
        if self.contrastive_head is not None:
            out["embeds"] = self.contrastive_head(video_tokens[-1])  # (B, M, D)
        return out

    @torch.no_grad()
    def infer(self, frames, expression, *, chunk):
        """A whole video (Sec. 4.2): frames (T, 3, H, W) through Mask2Former in chunks padded to
        multiples of 32, then HMP and the Motion Decoder once -> (M, 2), (M, T, Hp/4, Wp/4)."""
        text = self.encode_text([expression])
        queries = self.static_queries(text)  # (1, Q, C)
        tokens, mask_feats = [], []
        for part in frames.split(chunk):
            t, (H, W) = len(part), part.shape[-2:]
            part = F.pad(part, (0, -W % 32, 0, -H % 32))  # (t, 3, Hp, Wp)
            chunk_text = Text(*(x.expand(t, *x.shape[1:]) for x in text))
            out, feats = self.segment_frames(part, queries.expand(t, -1, -1), chunk_text)
            tokens.append(self.frame_tokens(out))  # (t, Q, C)
            mask_feats.append(feats)  # (t, C, h, w)
        out = self.decode_video(torch.cat(tokens)[None], torch.cat(mask_feats)[None], text)
        return out["pred_logits"][0], out["pred_masks"][0]


# ------------------------------------------------------------ Sec. 3.3 contrastive learning
class MemoryBank:
    """One centroid per target (the set of referred objects of a video) of the projected video
    tokens (Sec. 3.3); the centroids M live outside the model and travel in the checkpoint.
    target_video (G,) long: the video of each target, for same-video negatives first; the bank
    lives on its device."""

    def __init__(self, *, target_video, dim, momentum, generator=None):
        centroids = torch.randn(len(target_video), dim, generator=generator)  # (G, D)
        self.centroids = F.normalize(centroids, dim=-1).to(target_video.device)  # M in the paper
        self.target_video = target_video
        self.momentum = momentum

    @torch.no_grad()
    def update(self, anchors, targets):
        """Eq. (8): M[g] <- m * M[g] + (1 - m) * anchor, in order (a target may occur twice)."""
        m = self.momentum
        for anchor, g in zip(F.normalize(anchors.float(), dim=-1), targets.tolist()):
            centroid = m * self.centroids[g] + (1 - m) * anchor  # Eq. (8)
            self.centroids[g] = F.normalize(centroid, dim=-1)

    def negatives(self, target, count, generator=None):
        """Up to `count` negative target indices for `target`: other targets of the same video
        first (Sec. 3.3: the hardest, same category in the same video; MeViS has one category),
        then random ones."""
        index = torch.arange(len(self.centroids), device=self.target_video.device)  # (G,)
        same = self.target_video == self.target_video[target]
        same_video, others = index[same & (index != target)], index[~same]
        same_video = same_video[torch.randperm(len(same_video), generator=generator)[:count]]
        picked = torch.randperm(len(others), generator=generator)[: count - len(same_video)]
        return torch.cat([same_video, others[picked]])  # (<= count,)


def memory_bank_targets(samples, device=None):
    """Sec. 3.3: a target is the set of objects an expression refers to in its video. Returns the
    target of each sample (num_samples,) and the video of each target (G,) on `device`."""
    keys = [(s["video"], tuple(sorted(s["obj_ids"]))) for s in samples]
    target_index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    video_index = {video: i for i, video in enumerate(dict.fromkeys(s["video"] for s in samples))}
    sample_target = torch.tensor([target_index[key] for key in keys], device=device)
    target_video = torch.tensor([video_index[video] for video, _ in target_index], device=device)
    return sample_target, target_video


def contrastive_loss(anchors, bank, targets, *, num_negatives, temperature, generator=None):
    """Eq. (9): InfoNCE of each anchor (A, D) against its target's centroid and E negatives."""
    anchors = F.normalize(anchors.float(), dim=-1)  # (A, D)
    losses = []
    for anchor, g in zip(anchors, targets.tolist()):
        negatives = bank.centroids[bank.negatives(g, num_negatives, generator)]  # (E, D)
        samples = torch.cat([bank.centroids[g : g + 1], negatives])  # (1+E, D), the positive first
        losses.append(-(samples @ anchor / temperature).log_softmax(0)[0])  # Eq. (9)
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------- Sec. 3.4 losses
def compute_losses(cfg, outputs, targets, *, bank=None, bank_targets=None):
    """The unweighted terms of Sec. 3.4: Mask2Former's set loss on every frame (frame_*) and on
    the video masks (video_*), and Eq. (9) with the memory bank (cl). Returns (terms, the anchors
    (B, D) for the memory bank and which of them have a matched target (B,); None without one)."""
    weights = dict(w_cls=cfg.w_cls, w_bce=cfg.w_bce, w_dice=cfg.w_dice,
                   no_object_weight=cfg.no_object_weight, num_points=cfg.num_points or None)
    targets = visible_objects(targets)  # official: objects absent from the clip dropped
    per_frame, device = frame_targets(targets), outputs["pred_masks"].device
    frame_terms, _ = set_losses(outputs["frame_outputs"], per_frame,
                                num_masks=num_masks(per_frame, device), **weights)
    video_terms, indices = set_losses(outputs, targets, num_masks=num_masks(targets, device),
                                      **weights)
    terms = {**{f"frame_{k}": v for k, v in frame_terms.items()},
             **{f"video_{k}": v for k, v in video_terms.items()}}
    anchors = matched = None
    if bank is not None:  # Sec. 3.3: the anchor averages the video tokens matched to the targets
        embeds = outputs["embeds"]  # (B, M, D)
        matched = torch.tensor([len(pred) > 0 for pred, _ in indices], device=embeds.device)  # (B,)
        anchors = torch.stack([embeds[b, pred].mean(0) if len(pred) else embeds[b, 0] * 0
                               for b, (pred, _) in enumerate(indices)])  # (B, D)
        terms["cl"] = contrastive_loss(  # a clip without a visible target has no anchor
            anchors[matched], bank, bank_targets[matched], num_negatives=cfg.cl_negatives,
            temperature=cfg.cl_temperature) if matched.any() else 0 * embeds.sum()
    return terms, anchors, matched


# ---------------------------------------------------------------------------------- building
def make_dataset(cfg, root, split, *, train, seed=None):
    if cfg.data in PSEUDO_VIDEO_SETS:  # RefCOCO/+/g pre-training, Sec. 4.2
        return pseudo_videos(cfg, [cfg.data], root, seed=cfg.seed if seed is None else seed)
    reader = {"toy": MeViS, "mevis": MeViS, "ytvos": RefYouTubeVOS, "davis": RefDAVIS17,
              "a2d": A2DSentences, "jhmdb": JHMDBSentences}[cfg.data]
    return reader(root, split, train=train, num_frames=cfg.num_frames, frame_range=cfg.frame_range,
                  short_side=cfg.short_side, max_size=cfg.max_size,
                  seed=cfg.seed if seed is None else seed)


def build_model(cfg, *, vocab=None, pretrained=True) -> DsHmp:
    """The toy-size model (random init, word tokenizer over `vocab`) for --data toy; otherwise the
    paper configuration with COCO Mask2Former and RoBERTa weights (random when not pretrained)."""
    if cfg.data.startswith("toy"):  # toy, toy-refcoco
        pixel_level = PixelLevel.tiny(hidden_dim=cfg.dim)
        text_encoder = TextEncoder.tiny(word_tokenizer(vocab), hidden=cfg.toy_text_dim)
        decoder = MaskedAttentionDecoder(
            hidden_dim=cfg.dim, num_queries=cfg.num_static_queries, num_layers=cfg.m2f_layers,
            num_heads=cfg.heads, ffn_dim=cfg.ffn_dim, num_classes=1,
            mask_dim=pixel_level.mask_channels, word_attention=True)
    else:
        if pretrained:
            pixel_level, decoder_state, m2f_config = load_mask2former(cfg.weights)
            text_encoder = TextEncoder.from_pretrained(cfg.text_weights, freeze=True)
        else:  # --count-params: the same modules with random weights, nothing downloaded
            m2f_config, decoder_state = swin_tiny_coco_config(), None
            pixel_level = PixelLevel(m2f_config)
            roberta = RobertaModel(roberta_base_config(), add_pooling_layer=False)
            text_encoder = TextEncoder(roberta, word_tokenizer([]), freeze=True)
        decoder = MaskedAttentionDecoder(**{**decoder_kwargs_from_hf(m2f_config), "num_classes": 1,
                                            "num_queries": cfg.num_static_queries,
                                            "word_attention": True})
        if decoder_state is not None:  # the first N_s COCO queries (official tools/process_ckpt.py)
            load_decoder_weights(decoder, decoder_state, num_queries=cfg.num_static_queries,
                                 load_class_head=False)
    return DsHmp(pixel_level=pixel_level, decoder=decoder, text_encoder=text_encoder, dim=cfg.dim,
                 heads=cfg.heads, ffn_dim=cfg.ffn_dim, num_motion_queries=cfg.num_motion_queries,
                 hmp_blocks=cfg.hmp_blocks, hmp_stages=cfg.hmp_stages, window=cfg.window,
                 decoder_layers=cfg.decoder_layers, inject_scale=cfg.inject_scale,
                 cl_dim=cfg.cl_dim, decouple=cfg.ds, hierarchical=cfg.hmp, contrastive=cfg.cl,
                 token_position=cfg.token_position)


# ---------------------------------------------------------------------------------- training
def train(cfg, ddp, root, out):
    """Sec. 4.2 recipe; returns the trained model (unwrapped), the memory bank of Sec. 3.3 (training
    state, saved in last.pt) attached as `model.memory_bank`."""
    seed_everything(cfg.seed)  # identical initial weights on every process
    dataset = make_dataset(cfg, root, "train", train=True, seed=cfg.seed + ddp.rank)
    vocab = toy_vocab(cfg, dataset.samples, root)
    model = init_weights(cfg.init, build_model(cfg, vocab=vocab)).to(ddp.device)
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          backbone_lr_mult=cfg.backbone_lr_mult, backbone=("pixel_level.backbone",))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [cfg.lr_drop], gamma=0.1)
    sample_target, target_video = memory_bank_targets(dataset.samples, ddp.device)
    bank = MemoryBank(target_video=target_video, dim=cfg.cl_dim, momentum=cfg.cl_momentum,
                      generator=torch.Generator().manual_seed(cfg.seed))
    step = 0
    if cfg.resume:
        step, extra = resume(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                             config=asdict(cfg))
        bank.centroids = extra["memory_bank"].to(ddp.device)
    batches = train_batches(dataset, batch_size=cfg.batch_size, collate=collate_video, ddp=ddp,
                            seed=cfg.seed, workers=cfg.workers, start_step=step)
    model = wrap_ddp(model, ddp)  # in train mode since built (a frozen text encoder stays in eval)
    with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
        while step < cfg.steps:
            batch = next(batches)
            frames, targets = to_device((batch["frames"], batch["targets"]), ddp.device)
            bank_targets = sample_target[batch["index"]]  # (B,)
            with autocast(ddp.device):
                outputs = model(frames, batch["expression"])
            outputs = annotated_frames(outputs, batch.get("annotated_frame"))  # A2D: losses there
            terms, anchors, matched = compute_losses(
                cfg, outputs, targets, bank=bank if cfg.cl else None, bank_targets=bank_targets)
            w_cl = cfg.w_cl if step >= cfg.cl_start else 0.0  # Sec. 3.3: after cl_start iterations
            loss = (cfg.w_cls * (terms["frame_ce"] + terms["video_ce"])
                    + cfg.w_bce * (terms["frame_bce"] + terms["video_bce"])
                    + cfg.w_dice * (terms["frame_dice"] + terms["video_dice"])
                    + w_cl * terms.get("cl", 0))
            check_finite(loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if cfg.cl:  # Eq. (8) with every process's anchors: the bank stays the same everywhere
                keep = all_gather_cat(matched)
                bank.update(all_gather_cat(anchors.detach())[keep],
                            all_gather_cat(bank_targets)[keep])
            if step % cfg.log_every == 0 or step == cfg.steps:
                scalars = reduce_dict({"loss": loss, **terms})
                progress.log(step, scalars, lr=max(scheduler.get_last_lr()))  # the non-backbone lr
            if (step % cfg.save_every == 0 or step == cfg.steps) and is_main():
                save_checkpoint(out / "last.pt", model=model, optimizer=optimizer,
                                scheduler=scheduler, step=step, config=asdict(cfg),
                                extra={"vocab": vocab, "memory_bank": bank.centroids.cpu()})
    model = unwrap(model)
    model.memory_bank = bank
    return model


# ------------------------------------------------------------------------ Sec. 4.2 inference
def predict_masks(model, frames, expression, orig_size, cfg, **protocol):
    """Sec. 4.2: the union of the masks of the video tokens scoring > cfg.score_threshold (0.5),
    or with cfg.top1 the best token's (Ref-YouTube-VOS, Ref-DAVIS17, A2D), by the rule DMVS shares,
    common.run.video_query_masks; `protocol`: what a benchmark's scoring needs (probabilities;
    every: each token's mask and score). frames (T, 3, H, W) -> (T, H0, W0)."""
    return video_query_masks(model, frames, expression, orig_size, threshold=cfg.score_threshold,
                             chunk=cfg.eval_chunk, top1=cfg.top1, **protocol)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    out, ddp = run_dir(cfg, "dshmp", ABLATIONS), setup_distributed()
    checkpoint = cfg.checkpoint or out / "last.pt"

    def rule(frames, expression, orig_size):  # with this command's test-time settings
        return predict_masks(model, frames.to(ddp.device), expression, orig_size, cfg,
                             probabilities=cfg.data == "davis" and not cfg.predict,
                             every=cfg.data in ("a2d", "jhmdb") and not cfg.predict)

    with cli_errors("dshmp"):
        if cfg.count_params:
            return print(parameter_report(build_model(cfg, vocab=["a"], pretrained=False)))
        root = data_root(cfg, "video", make_toy=ensure_toy) if cfg.train or cfg.eval else None
        if cfg.train:
            model, trained = train(cfg, ddp, root, out), cfg
        else:
            model, trained = load_trained(checkpoint, Config, build_model, ddp.device)
        if cfg.predict:
            predict_files(cfg.predict, cfg.text, rule, model=model, out=out / "vis" / "predict",
                          short_side=trained.short_side, max_size=trained.max_size)
        elif cfg.data in PSEUDO_VIDEO_SETS:  # pre-training: scored through the main stage
            print(f"pre-trained {checkpoint}; start the main stage with --init {checkpoint}")
        else:
            toy = toy_video_evaluation(root, cfg.eval_split) if cfg.data == "toy" else {}
            evaluate_video(make_dataset(cfg, root, cfg.eval_split, train=False),
                           lambda item: rule(item["frames"], item["expression"], item["orig_size"]),
                           model=model, out=out, data=cfg.data, split=cfg.eval_split,
                           checkpoint=checkpoint, **toy)  # toy: motion-only expressions, floors
    cleanup_distributed()


if __name__ == "__main__":
    main()
