"""DMVS: "Decoupled Motion Expression Video Segmentation". Hao Fang, Runmin Cong, Xiankai Lu,
Xiaofei Zhou, Sam Kwong, Wei Zhang, CVPR 2025. No official code is public.

DMVS splits referring video segmentation in two: a frozen video instance segmenter finds, segments
and tracks every object (VITA, Sec. 3.1, common/vita.py), and a small trainable part picks the
objects the expression refers to from VITA's queries (Sec. 3.2):
  - Motion Expression Encoder, Eqs. (1)-(4): the static cues enrich VITA's frame queries, the
    motion cues its video queries, and the sentence embedding reads both in turn -> F_me;
  - Motion Query Initialization, Eq. (7): the N_m video queries VITA scores highest (Eq. (5),
    random, and Eq. (6), the repeated sentence, are Table 5's alternatives, --mqi);
  - Motion Query Decoder, Eq. (8): per layer, cross-attention to the words F_w, cross-attention
    to F_me, self-attention, FFN;
  - heads, Eqs. (9)-(10): a target score and a mask embedding dotted with VITA's mask features;
    loss, Eq. (11); inference (Sec. 3.3): the union of the queries scoring > sigma = 0.7 on MeViS,
    the best query on Ref-YouTube-VOS and Ref-DAVIS17.
Only the DMVS part learns (12.7M parameters in Table 8; --count-params); VITA stays in eval mode
without gradients, RoBERTa is frozen (Sec. 4.2).

Where the paper is silent (no official code to follow; "(VITA)", "(LMPM)", "(DsHmp)" mark the
sibling code whose choice is taken, "(ours)" our own):
  - Eqs. (1)-(4) are written without projections; each is one multi-head attention with a residual
    and a LayerNorm after it (VITA's CrossAttentionLayer), no FFN (an FFN per step would exceed the
    12.7M of Table 8). The sentence embedding joins both cue sets, so neither is empty (DsHmp).
  - Q_f in Eqs. (1) and (3) are Mask2Former's frame queries as Sec. 3.1 defines them (before
    VITA's Object Encoder); Q_v are the decoder-normed video queries of VITA's last layer. S_v of
    Eq. (7) is a query's largest class probability other than no-object (ours; VITA itself ranks
    (query, class) pairs at test time and multiplies them by a mask score). TopK returns the N_m
    queries best first, so motion query i (and its learnable position) is VITA's i-th best.
  - F_se pools the RoBERTa words (masked mean, common.backbones.TextEncoder); words and sentence
    have their own Linear + LayerNorm resizer (LMPM); with two, the count matches Table 8.
  - Table 3's Baseline and Table 5's random / text rows "interact with text features and video
    queries in the decoder": with --mqi random|text the second cross-attention reads [F_me; Q_v];
    without MEE (--no-mee) it reads F_se in place of F_me. The motion queries get a learnable
    position, added to queries and keys as VITA does.
  - Loss (VITA/LMPM): Hungarian matching of the motion queries to the referred objects (one target
    per object), CE over target / no object (no-object weight 0.1), BCE and dice on 12,544
    sampled points, every decoder layer supervised. Weights: Eq. (11) gives lambda_cls = 2 and
    L_mask = BCE + dice, whose plain reading is 2 : 1 : 1; we take LMPM's 2 / 5 / 5 over it.
    Optimiser (LMPM): AdamW, weight decay 0.05, gradient clip 0.01, 8 clips a step. Attention and
    FFN layers xavier-initialised (VITA).
  - Ref-YouTube-VOS trains jointly with Ref-COCO+/g pseudo-videos "follow[ing] VITA" (Sec. 4.2):
    VITA's recipe for COCO images (common.datasets.PseudoVideo) on the train refs of both sets,
    mixed as VITA mixes COCO with YouTube-VIS 2019: DATASET_RATIO 1.0 (images) : 0.75 (videos)
    (VITA; its OVIS configs: 0.25, YouTube-VIS 2021: 0.8), --pseudo-videos, --video-ratio.

Deviations from the paper:
  - N_f: the OVIS Swin-L VITA checkpoint has 200 frame queries (Sec. 4.2 says 100); we follow the
    weights. VITA's frame queries come from Mask2Former's last layer (official VITA: the last 3 in
    training); frozen, VITA runs as at test (shifted windows on odd encoder layers).
  - Static and motion cues (Sec. 3.2, `decoupled_cues`): the paper's word classes read off the
    rule-based tagger of common.text (the paper names a scene-graph parser [37]); where its rule
    and its example disagree (a preposition after a verb), the example is followed.
  - Pseudo-videos, where VITA's recipe differs: one referred object and its expression per clip
    (VITA: every COCO instance), the run's one resize (VITA: a short side drawn per clip), the
    ratio exact in every epoch (VITA: drawn per item); common.datasets.PseudoVideo, MixedClips.
  - Toy (ours): a tiny VITA is first trained on the toy videos (YouTube-VIS format, classes =
    shapes) with VITA's losses, then frozen (data/toy_pretrain.py); the tiny text encoder is
    trained (nothing is pretrained on toy).

Run (every option: --help):
  python dmvs.py --data toy --train          # toy VITA stage (or reuse), then DMVS; CPU
  torchrun --nproc_per_node 8 dmvs.py --data mevis --train --vita-weights vita_swin_ovis.pth
  python dmvs.py --count-params              # learnable / frozen parameters, paper configuration
  ablations: --mqi random|text (Table 5), --no-mee (Table 3), --no-static-cues, --no-motion-cues
  (Table 4); Table 3's Baseline is --mqi random --no-mee
  diagnostic (ours, outside the paper's equations): --token-position adds to each video query an
  embedding of its track (its mask's displacement from the first frame it is seen in) and to each
  frame query one of its mask's centre, before the MEE
"""

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from einops import einsum, rearrange, repeat
from transformers import RobertaModel

from common.backbones import TextEncoder, parameter_report, roberta_base_config
from common.datasets import MeViS, MixedClips, RefDAVIS17, RefYouTubeVOS, collate_video
from common.engine import (Progress, autocast, cleanup_distributed, is_main, read_checkpoint,
                           reduce_dict, save_checkpoint, seed_everything,
                           setup_distributed, to_device, unwrap)
from common.mask2former import MLP, PositionEmbedding, mask_position, xavier_init_
from common.matching import num_masks, set_losses, visible_objects
from common.run import (RunConfig, check_finite, cli_errors, data_root, evaluate_video,
                        init_weights, load_trained, param_groups, parse_config, predict_files,
                        pseudo_videos, resume, run_dir, toy_vocab, train_batches,
                        video_query_masks, wrap_ddp)
from common.text import batch_static_motion_token_masks, tag_words, word_tokenizer
from common.vita import SWIN_L_OVIS, build_vita, load_official_vita_checkpoint
from data.toy import ensure_toy, toy_video_evaluation
from data.toy_pretrain import toy_vita_sizes, train_toy_vita

# Shapes: B clips, T frames, Q frame queries per frame (N_f), V video queries (N_v), M motion
# queries (N_m), L text tokens (+1: the sentence embedding appended), C channels, C_m mask-feature
# channels, H W frame size, h w mask-feature size (H/4, W/4).


# ------------------------------------------------------------------------------------ config
@dataclass
class Config(RunConfig):
    data: str = "mevis"  # mevis | ytvos | davis (paper configuration) | toy (tiny model, CPU)
    eval_split: str = "valid_u"  # MeViS: valid_u (J&F) or valid (submission); toy: valid_u
    # ablations, paper Tables 3-5
    mqi: str = "video"  # motion query init: video (Eq. 7) | random (Eq. 5) | text (Eq. 6), Table 5
    mee: bool = True  # Motion Expression Encoder, Eqs. (1)-(4); --no-mee: Table 3 without MEE
    static_cues: bool = True  # Eq. (1); --no-static-cues: Table 4, Q_f in place of Q'_f in Eq. (3)
    motion_cues: bool = True  # Eq. (2); --no-motion-cues: Table 4, Q_v in place of Q'_v in Eq. (4)
    # (ours, not in the paper) a diagnostic: each video query gets an embedding of its track (its
    # mask's displacement over the clip), each frame query one of its mask's centre, before the MEE
    token_position: bool = False
    # the frozen VITA, Sec. 3.1 / 4.2
    vita_weights: str = ""  # official VITA .pth/.pkl (paper: Swin-L, OVIS); toy: toy_vita_path
    vita_classes: int = 25  # OVIS (VITA config); the YouTube-VIS models of Table 7 have 40
    vita_frame_queries: int = 200  # N_f of the OVIS Swin-L checkpoint (paper Sec. 4.2: 100)
    vita_video_queries: int = 100  # N_v, paper Sec. 4.2
    # model
    text_weights: str = "FacebookAI/roberta-base"  # paper Sec. 4.2, frozen
    dim: int = 256  # C, VITA's width
    heads: int = 8  # (VITA)
    ffn_dim: int = 2048  # (VITA)
    num_motion_queries: int = 20  # N_m, paper Sec. 4.2 / Table 6
    decoder_layers: int = 6  # Motion Query Decoder, paper Sec. 4.2
    toy_text_dim: int = 64  # toy only: width of the tiny RoBERTa (ours)
    # loss, Eq. (11): lambda_cls = 2 (paper); L_mask = BCE + dice, each weighted 5 (LMPM's choice
    # over the paper's plain 2 : 1 : 1), matching as VITA / LMPM
    w_cls: float = 2.0
    w_bce: float = 5.0
    w_dice: float = 5.0
    no_object_weight: float = 0.1  # (VITA)
    num_points: int = 12544  # (VITA) points sampled per mask; 0 = whole masks
    # optimisation, Sec. 4.2
    steps: int = 40_000  # paper
    lr: float = 5e-5  # paper
    lr_drop: int = 40_000  # x0.1 at this step; the paper names no schedule (ours: none)
    weight_decay: float = 0.05  # (LMPM)
    grad_clip: float = 0.01  # (LMPM, VITA: full-model L2 norm)
    batch_size: int = 8  # clips per step over all processes (LMPM: 8 GPUs x 1)
    num_frames: int = 10  # T, paper Sec. 4.2
    frame_range: int = 10  # (DsHmp) frames are drawn within +-10 of a reference frame
    short_side: int = 360  # paper Sec. 4.2
    max_size: int = 640  # paper Sec. 4.2
    score_threshold: float = 0.7  # sigma, paper Sec. 4.2
    top1: bool = False  # the best motion query instead of the union (Ref-YouTube-VOS, Ref-DAVIS17)
    eval_chunk: int = 18  # (VITA TEST_RUN_CHUNK_SIZE) frames per chunk through Mask2Former
    # joint training with pseudo-videos (Sec. 4.2: Ref-COCO+/g with Ref-YouTube-VOS, as VITA)
    pseudo_videos: str = ""  # refer sets, comma-separated (ytvos: refcoco+,refcocog); "": none
    refer_root: str = ""  # their RefCOCO tree (data/README.md); default data/refer
    video_ratio: float = 0.75  # (VITA) video clips per pseudo-video, DATASET_RATIO [1.0, 0.75]
    # toy only: the VITA stage (VITA's losses and weights; recipe ours, as the toy DsHmp)
    vita_steps: int = 0  # 0: VITA is not trained here (paper: the official weights)
    vita_lr: float = 1e-3
    vita_num_frames: int = 4  # (VITA trains on clips as long as its window)


PRESETS = {  # per-dataset deltas from the paper configuration above
    # toy (ours): VITA's and DMVS's widths as the toy DsHmp; N_m / N_v as the paper's 20 / 100;
    # 8-frame clips (the paper's T = 10, scaled) cost little, VITA runs without gradients.
    "toy": dict(vita_classes=4, vita_frame_queries=10, vita_video_queries=10, dim=64, heads=4,
                ffn_dim=256, num_motion_queries=5, decoder_layers=3, num_points=1024, steps=1500,
                lr=1e-3, lr_drop=1200, grad_clip=1.0, num_frames=8, short_side=64, max_size=96,
                eval_chunk=32, vita_steps=1000, workers=0, log_every=10, save_every=250),
    "mevis": dict(),
    "ytvos": dict(eval_split="valid", top1=True,  # one target, always there: top-1 (Sec. 3.3)
                  pseudo_videos="refcoco+,refcocog"),  # joint training, Sec. 4.2
    "davis": dict(eval_split="valid", top1=True),
}
# named in the run folder: runs/dmvs-toy-mqi-random, runs/dmvs-toy-token-position
ABLATIONS = ("mqi", "mee", "static_cues", "motion_cues", "token_position")


# ------------------------------------------------------------------------ Sec. 3.2 text
class Text(NamedTuple):
    """The expression as DMVS uses it (`DMVS.encode_text`), batch-first."""
    words: torch.Tensor  # (B, L, C) F_w, projected
    word_mask: torch.Tensor  # (B, L) True on the words (not padding, not <s> </s>)
    sentence: torch.Tensor  # (B, 1, C) F_se, projected
    cues: torch.Tensor  # (B, L+1, C) the words and F_se: the keys of Eqs. (1)-(2)
    static_mask: torch.Tensor  # (B, L+1) True on the static cues F_s and F_se
    motion_mask: torch.Tensor  # (B, L+1) True on the motion cues F_m and F_se


def decoupled_cues(expression):
    """Sec. 3.2's text decoupler: [(start, end, "static" | "motion" | None)] for each word (tags:
    common.text.tag_words). Adjectives, prepositions and nouns are static cues, adverbs and verbs
    motion cues; a preposition or particle attached to a verb (right after it, or after it and
    its adverbs) joins the motion cue, as in the paper's example "Cat turning around and playing
    with toy": static {cat, toy}, motion {turning around, playing with}. Determiners,
    conjunctions, auxiliaries, pronouns, numbers, particles and punctuation are in neither set."""
    cues, previous = [], None
    for _, start, end, pos, _ in tag_words(expression):
        if pos in ("VERB", "ADV"):
            kind = "motion"
        elif pos == "ADP":
            kind = "motion" if previous == "motion" else "static"
        else:
            kind = "static" if pos in ("NOUN", "ADJ") else None
        cues.append((start, end, kind))
        previous = kind
    return cues


def resizer(width, dim):
    """(LMPM FeatureResizer) text width -> C: Linear, LayerNorm, dropout."""
    return nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim, eps=1e-12), nn.Dropout(0.1))


# ------------------------------------------------------------- Sec. 3.2 Motion Expression Encoder
class ResidualAttention(nn.Module):
    """X' = X + softmax(X Y^T / sqrt(C)) Y (Eqs. 1-4), as multi-head attention with learned
    projections, then a LayerNorm (VITA's CrossAttentionLayer: post-norm, xavier init)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        xavier_init_(self)

    def forward(self, x, y, y_mask=None):
        # x (B, N, C) queries, y (B, K, C) keys and values, y_mask (B, K) True = attend
        padding = None if y_mask is None else ~y_mask
        return self.norm(x + self.attn(x, y, y, key_padding_mask=padding)[0])


class MotionExpressionEncoder(nn.Module):
    """Eqs. (1)-(4): frame queries (B, T*Q, C) <- static cues, video queries (B, V, C) <- motion
    cues, then the sentence reads the frame queries and the video queries in turn -> F_me (B, 1, C).
    Without static / motion cues (Table 4) the unenhanced queries feed Eqs. (3) / (4)."""

    def __init__(self, *, dim, heads, static_cues=True, motion_cues=True):
        super().__init__()
        self.static = ResidualAttention(dim, heads) if static_cues else None  # Eq. (1)
        self.motion = ResidualAttention(dim, heads) if motion_cues else None  # Eq. (2)
        self.read_frames = ResidualAttention(dim, heads)  # Eq. (3)
        self.read_videos = ResidualAttention(dim, heads)  # Eq. (4)

    def forward(self, frame_queries, video_queries, text: Text):
        if self.static is not None:
            frame_queries = self.static(frame_queries, text.cues, text.static_mask)  # Eq. (1): Q'_f
        if self.motion is not None:
            video_queries = self.motion(video_queries, text.cues, text.motion_mask)  # Eq. (2): Q'_v
        sentence = self.read_frames(text.sentence, frame_queries)  # Eq. (3): F'_se (B, 1, C)
        return self.read_videos(sentence, video_queries)  # Eq. (4): F_me (B, 1, C)


# ------------------------------------------------------------- Sec. 3.2 Motion Query Decoder
class DecoderLayer(nn.Module):
    """Eq. (8), one layer (Sec. 3.2: "two cross-attention layers, a self-attention layer and a ffn
    layer"): cross-attention to the words F_w, to the motion expression F_me, self-attention, FFN;
    post-norm residuals, query positions added to the queries, xavier init (VITA)."""

    def __init__(self, *, dim, heads, ffn_dim):
        super().__init__()
        self.word_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.motion_expr_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        xavier_init_(self)

    def forward(self, queries, query_pos, words, word_mask, motion_expr):
        # queries, query_pos (B, M, C); words (B, L, C), word_mask (B, L); motion_expr (B, K, C)
        q = queries + query_pos
        attended = self.word_attn(q, words, words, key_padding_mask=~word_mask)[0]  # (B, M, C)
        queries = self.norms[0](queries + attended)
        attended = self.motion_expr_attn(queries + query_pos, motion_expr,
                                         motion_expr)[0]  # (B, M, C)
        queries = self.norms[1](queries + attended)
        q = queries + query_pos
        queries = self.norms[2](queries + self.self_attn(q, q, queries)[0])
        return self.norms[3](queries + self.ffn(queries))


# ------------------------------------------------------------------------------------- model
class Instances(NamedTuple):
    """What the frozen VITA hands DMVS (Sec. 3.1)."""
    frame_queries: torch.Tensor  # (B, T, Q, C) Q_f, Mask2Former's last layer
    video_queries: torch.Tensor  # (B, V, C) Q_v
    scores: torch.Tensor  # (B, V) S_v: the largest class probability other than no-object
    mask_features: torch.Tensor  # (B, T, C_m, h, w) F_mask, VITA's own projection
    frame_masks: torch.Tensor = None  # (B, T, Q, h, w) the frame queries' mask logits
    video_masks: torch.Tensor = None  # (B, V, T, h, w) the video queries' mask logits


def track_displacement(video_masks):
    """(ours, the --token-position diagnostic) video_masks (B, V, T, h, w) logits -> (B, V, T, 2):
    each frame's mask centre minus the centre in the first frame where the mask is not empty
    (common.mask2former.mask_position; zero in the frames where it is empty). Detached."""
    position = mask_position(video_masks)  # (B, V, T, 3): x, y, area
    visible = position[..., 2] > 0  # (B, V, T)
    first = visible.float().argmax(-1)  # (B, V): the first visible frame (0 when none)
    start = torch.gather(position[..., :2], 2, repeat(first, "b v -> b v 1 two", two=2))
    return (position[..., :2] - start) * visible[..., None]  # (B, V, T, 2)


def select_queries(video_queries, scores, k):
    """Eq. (7): TopK(Q_v, S_v, N_m), the k video queries (B, V, C) scoring highest (B, V), best
    first (motion query i is the i-th best)."""
    index = scores.topk(k, dim=1).indices  # (B, k)
    return torch.gather(video_queries, 1, repeat(index, "b k -> b k c", c=video_queries.shape[-1]))


class DMVS(nn.Module):
    """frames (B, T, 3, H, W) + expressions -> outputs dict: pred_logits (B, M, 2) target /
    no object, pred_masks (B, M, T, h, w) of the last decoder layer, aux_outputs (the others)."""

    def __init__(self, *, vita, text_encoder, dim, heads, ffn_dim, num_motion_queries,
                 decoder_layers, mqi="video", mee=True, static_cues=True, motion_cues=True,
                 token_position=False):
        super().__init__()
        if mqi not in ("video", "random", "text"):
            raise ValueError(f"mqi must be video, random or text, got {mqi!r}")
        if num_motion_queries > vita.object_decoder.query_feat.num_embeddings:
            raise ValueError(f"N_m = {num_motion_queries} exceeds VITA's video queries")
        self.vita = vita.eval().requires_grad_(False)  # Sec. 3.1: frozen, in eval mode (see train)
        self.text_encoder = text_encoder  # RoBERTa, frozen in the paper configuration
        self.mqi, self.num_motion_queries = mqi, num_motion_queries
        width = text_encoder.hidden_size
        self.word_proj, self.sentence_proj = resizer(width, dim), resizer(width, dim)  # (LMPM)
        self.encoder = MotionExpressionEncoder(dim=dim, heads=heads, static_cues=static_cues,
                                               motion_cues=motion_cues) if mee else None
        random = nn.Embedding(num_motion_queries, dim)  # Eq. (5): N(0, 1), nn.Embedding's init
        self.random_queries = random if mqi == "random" else None
        self.query_pos = nn.Embedding(num_motion_queries, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim=dim, heads=heads, ffn_dim=ffn_dim)
                                    for _ in range(decoder_layers))
        self.norm = nn.LayerNorm(dim)  # (VITA decoder_norm) before the heads of every layer
        self.class_head = nn.Linear(dim, 2)  # Eq. (9): H_c, a single linear layer
        self.mask_embed = MLP(dim, dim, vita.mask_proj.out_channels, num_layers=3)  # Eq. (10): H_m
        # --token-position (ours, a diagnostic), built last so every other module starts the same
        self.token_position = PositionEmbedding(2, dim) if token_position else None

    def forward(self, frames, expressions):
        return self.decode(self.find_instances(frames), self.encode_text(expressions))

    @torch.no_grad()
    def find_instances(self, frames) -> Instances:
        """Sec. 3.1: the frozen VITA on frames (B, T, 3, H, W)."""
        out = self.vita(frames)
        B = frames.shape[0]
        frame_queries = rearrange(out["frame_outputs"]["query_embeds"][-1], "(b t) q c -> b t q c",
                                  b=B)  # (B, T, Q, C)
        frame_masks = rearrange(out["frame_outputs"]["pred_masks"], "(b t) q h w -> b t q h w",
                                b=B)  # (B, T, Q, h, w)
        return self.instances(frame_queries, frame_masks, out)

    @staticmethod
    def instances(frame_queries, frame_masks, vita_out) -> Instances:
        scores = vita_out["pred_logits"].float().softmax(-1)[..., :-1].amax(-1)  # (B, V): S_v
        return Instances(frame_queries, vita_out["video_queries"], scores,
                         vita_out["mask_features"], frame_masks, vita_out["pred_masks"])

    def encode_text(self, expressions) -> Text:
        """Sec. 3.2: word features F_w, the pooled sentence F_se, and the static / motion cues."""
        encoded = self.text_encoder(expressions)
        words = self.word_proj(encoded["word_feats"])  # (B, L, C)
        sentence = self.sentence_proj(encoded["sentence"])[:, None]  # (B, 1, C)
        static, motion = batch_static_motion_token_masks(expressions, encoded["offsets"],
                                                         cues=decoupled_cues)  # (B, L)
        with_sentence = torch.ones_like(static[:, :1])  # (B, 1): F_se joins both sets (DsHmp)
        word_mask = encoded["word_mask"].to(words.device)
        return Text(words=words, word_mask=word_mask, sentence=sentence,
                    cues=torch.cat([words, sentence], 1),
                    static_mask=torch.cat([static, with_sentence], 1).to(words.device),
                    motion_mask=torch.cat([motion, with_sentence], 1).to(words.device))

    def initial_queries(self, found: Instances, text: Text):
        """Motion queries Q_m (B, M, C): Eq. (7), (5) or (6)."""
        B, M = len(text.words), self.num_motion_queries
        if self.mqi == "video":
            return select_queries(found.video_queries, found.scores, M)  # Eq. (7)
        if self.mqi == "random":
            return repeat(self.random_queries.weight, "m c -> b m c", b=B)  # Eq. (5)
        return text.sentence.expand(-1, M, -1)  # Eq. (6): repeat(F_se, N_m)

    def decode(self, found: Instances, text: Text) -> dict:
        """Eqs. (1)-(4), (7)-(10) on VITA's queries -> the outputs dict."""
        if self.token_position is not None:  # (ours, a diagnostic): where the queries' masks lie
            tracks = self.token_position(track_displacement(found.video_masks))  # (B, V, T, C)
            centres = mask_position(found.frame_masks)[..., :2]  # (B, T, Q, 2)
            found = found._replace(video_queries=found.video_queries + tracks.mean(2),
                                   frame_queries=found.frame_queries + self.token_position(centres))
        frame_queries = rearrange(found.frame_queries, "b t q c -> b (t q) c")  # (B, T*Q, C)
        if self.encoder is not None:
            motion_expr = self.encoder(frame_queries, found.video_queries,
                                       text)  # F_me (B, 1, C)
        else:
            motion_expr = text.sentence  # Table 3 without MEE: F_se
        if self.mqi != "video":  # Table 5: these queries read the video queries in the decoder
            motion_expr = torch.cat([motion_expr, found.video_queries], 1)  # (B, 1 + V, C)
        queries = self.initial_queries(found, text)  # (B, M, C)
        query_pos = repeat(self.query_pos.weight, "m c -> b m c", b=len(queries))  # (B, M, C)
        preds = []
        for layer in self.layers:  # Eq. (8)
            queries = layer(queries, query_pos, text.words, text.word_mask,
                            motion_expr)  # (B, M, C)
            q = self.norm(queries)
            preds.append({"pred_logits": self.class_head(q),  # Eq. (9), (B, M, 2)
                          "pred_masks": einsum(self.mask_embed(q), found.mask_features,  # Eq. (10)
                                               "b m d, b t d h w -> b m t h w")})
        return {**preds[-1], "aux_outputs": preds[:-1]}

    @torch.no_grad()
    def infer(self, frames, expression, *, chunk):
        """A whole video (Sec. 3.3): frames (T, 3, H, W) through Mask2Former in chunks padded to
        multiples of 32, then VITA's module and DMVS once -> (M, 2), (M, T, Hp/4, Wp/4)."""
        frame_queries, frame_masks, mask_feats = [], [], []
        for part in frames.split(chunk):
            H, W = part.shape[-2:]
            out, feats = self.vita.segment_frames(nn.functional.pad(part, (0, -W % 32, 0, -H % 32)))
            frame_queries.append(out["query_embeds"][-1])  # (t, Q, C)
            frame_masks.append(out["pred_masks"])  # (t, Q, h, w)
            mask_feats.append(feats)  # (t, C_m, h, w)
        frame_queries, mask_feats = torch.cat(frame_queries)[None], torch.cat(mask_feats)[None]
        found = self.instances(frame_queries, torch.cat(frame_masks)[None],
                               self.vita.decode_video(frame_queries, mask_feats))
        out = self.decode(found, self.encode_text([expression]))
        return out["pred_logits"][0], out["pred_masks"][0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vita.eval()  # frozen: no drop path, VITA's test-time windows, in training and test
        return self


# ---------------------------------------------------------------------------------- losses
def compute_losses(cfg, outputs, targets):
    """Eq. (11)'s unweighted terms (ce, bce, dice), every decoder layer, Hungarian-matched to the
    referred objects visible in the clip."""
    targets = visible_objects(targets)  # (VITA, DsHmp)
    return set_losses(outputs, targets, w_cls=cfg.w_cls, w_bce=cfg.w_bce, w_dice=cfg.w_dice,
                      no_object_weight=cfg.no_object_weight, num_points=cfg.num_points or None,
                      num_masks=num_masks(targets, outputs["pred_masks"].device))[0]


# ---------------------------------------------------------------------------------- building
def make_dataset(cfg, root, split, *, train, seed=None):
    reader = {"toy": MeViS, "mevis": MeViS, "ytvos": RefYouTubeVOS, "davis": RefDAVIS17}[cfg.data]
    seed = cfg.seed if seed is None else seed
    videos = reader(root, split, train=train, num_frames=cfg.num_frames,
                    frame_range=cfg.frame_range, short_side=cfg.short_side,
                    max_size=cfg.max_size, seed=seed)
    if not (train and cfg.pseudo_videos):
        return videos
    images = pseudo_videos(cfg, cfg.pseudo_videos.split(","), cfg.refer_root, seed=seed)
    return MixedClips([videos, images], [cfg.video_ratio, 1.0], seed=seed)  # Sec. 4.2, VITA's mix


def build_model(cfg, *, vocab=None, pretrained=True) -> DMVS:
    """DMVS around a randomly initialised VITA of the configured sizes (train() loads its weights,
    a DMVS checkpoint holds them); RoBERTa pretrained unless not `pretrained` (--count-params), a
    tiny trainable one over `vocab` on toy."""
    sizes = toy_vita_sizes(cfg) if cfg.data == "toy" else {  # the OVIS Swin-L VITA
        **SWIN_L_OVIS, "num_classes": cfg.vita_classes, "frame_queries": cfg.vita_frame_queries,
        "video_queries": cfg.vita_video_queries}
    vita = build_vita(sizes)
    if cfg.data == "toy":
        text_encoder = TextEncoder.tiny(word_tokenizer(vocab), hidden=cfg.toy_text_dim)
    elif pretrained:
        text_encoder = TextEncoder.from_pretrained(cfg.text_weights, freeze=True)
    else:  # --count-params: nothing downloaded
        roberta = RobertaModel(roberta_base_config(), add_pooling_layer=False)
        text_encoder = TextEncoder(roberta, word_tokenizer([]), freeze=True)
    return DMVS(vita=vita, text_encoder=text_encoder, dim=cfg.dim, heads=cfg.heads,
                ffn_dim=cfg.ffn_dim, num_motion_queries=cfg.num_motion_queries,
                decoder_layers=cfg.decoder_layers, mqi=cfg.mqi, mee=cfg.mee,
                static_cues=cfg.static_cues, motion_cues=cfg.motion_cues,
                token_position=cfg.token_position)


def load_vita(cfg, ddp, root, vita) -> None:
    """Fill the frozen VITA: the official checkpoint (--vita-weights), or the toy stage's."""
    if cfg.data == "toy":  # the toy stage (data/toy_pretrain.py), trained here or reused
        vita.load_state_dict(read_checkpoint(train_toy_vita(cfg, ddp, root))["model"])
    elif not cfg.vita_weights:
        raise SystemExit("dmvs: pass --vita-weights PATH, an official VITA checkpoint (model zoo "
                         "of github.com/sukjunhwang/VITA; the paper's default: Swin-L on OVIS)")
    else:
        load_official_vita_checkpoint(vita, cfg.vita_weights)


def train(cfg, ddp, root, out):
    """Sec. 4.2 recipe; returns the trained model (unwrapped)."""
    dataset = make_dataset(cfg, root, "train", train=True, seed=cfg.seed + ddp.rank)
    vocab = toy_vocab(cfg, dataset.samples, root)
    seed_everything(cfg.seed)  # identical initial weights on every process
    model = init_weights(cfg.init, build_model(cfg, vocab=vocab)).to(ddp.device)
    load_vita(cfg, ddp, root, model.vita)
    seed_everything(cfg.seed)  # the same DMVS stage whether VITA was trained now or reused
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)  # VITA is not in them
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [cfg.lr_drop], gamma=0.1)
    step = 0
    if cfg.resume:
        step = resume(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                      config=asdict(cfg))[0]
    batches = train_batches(dataset, batch_size=cfg.batch_size, collate=collate_video, ddp=ddp,
                            seed=cfg.seed, workers=cfg.workers, start_step=step)
    model = wrap_ddp(model.train(), ddp)
    with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
        while step < cfg.steps:
            batch = next(batches)
            frames, targets = to_device((batch["frames"], batch["targets"]), ddp.device)
            with autocast(ddp.device):
                outputs = model(frames, batch["expression"])
            terms = compute_losses(cfg, outputs, targets)  # Eq. (11):
            loss = cfg.w_cls * terms["ce"] + cfg.w_bce * terms["bce"] + cfg.w_dice * terms["dice"]
            check_finite(loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                scalars = reduce_dict({"loss": loss, **terms})
                progress.log(step, scalars, lr=max(scheduler.get_last_lr()))
            if (step % cfg.save_every == 0 or step == cfg.steps) and is_main():
                save_checkpoint(out / "last.pt", model=model, optimizer=optimizer,
                                scheduler=scheduler, step=step, config=asdict(cfg),
                                extra={"vocab": vocab})
    return unwrap(model)


# ------------------------------------------------------------------------ Sec. 3.3 inference
def predict_masks(model, frames, expression, orig_size, cfg, **protocol):
    """Sec. 3.3: the union of the masks of the motion queries scoring > cfg.score_threshold
    (sigma = 0.7), or with cfg.top1 the best query's (Ref-YouTube-VOS, Ref-DAVIS17), by the rule
    DsHmp shares, common.run.video_query_masks; `protocol`: what a benchmark's scoring needs
    (probabilities). frames (T, 3, H, W) -> (T, H0, W0)."""
    return video_query_masks(model, frames, expression, orig_size, threshold=cfg.score_threshold,
                             chunk=cfg.eval_chunk, top1=cfg.top1, **protocol)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    out, ddp = run_dir(cfg, "dmvs", ABLATIONS), setup_distributed()
    checkpoint = cfg.checkpoint or out / "last.pt"

    def rule(frames, expression, orig_size):  # with this command's test-time settings
        return predict_masks(model, frames.to(ddp.device), expression, orig_size, cfg,
                             probabilities=cfg.data == "davis" and not cfg.predict)

    with cli_errors("dmvs"):
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
        else:
            toy = toy_video_evaluation(root, cfg.eval_split) if cfg.data == "toy" else {}
            evaluate_video(make_dataset(cfg, root, cfg.eval_split, train=False),
                           lambda item: rule(item["frames"], item["expression"], item["orig_size"]),
                           model=model, out=out, data=cfg.data, split=cfg.eval_split,
                           checkpoint=checkpoint, **toy)  # toy: motion-only expressions, floors
    cleanup_distributed()


if __name__ == "__main__":
    main()
