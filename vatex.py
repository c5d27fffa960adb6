"""VATEX. Hai Nguyen-Truong, E-Ro Nguyen, Tuan-Anh Vu, Minh-Triet Tran, Binh-Son Hua, Sai-Kit
Yeung, "Vision-Aware Text Features in Referring Image Segmentation: From Object Understanding to
Context Understanding", WACV 2025 (arXiv 2404.08590). The section, equation and table numbers
below are those of its earlier arXiv version, "Improving Referring Image Segmentation using
Vision-Aware Text Features" (same authors), and its supplementary. Official code:
nero1342/VATEX @ 80af16a (the files named below are under its vatex/).

Implements Sec. 3.1 (CLIP Prior: the main noun phrase in "a photo of {}", Eq. 1's normalised
cosine heatmap of frozen CLIP ViT-B/16 patch tokens, projected to C and added to the N = 5
queries), Sec. 3.2 (Contextual Multimodal Decoder: four FPN levels each with a BAT that updates
the words, Eq. 2, then the pixels, Eq. 3, and the Conv2d fusion, Eq. 4), Sec. 3.3 (vision-aware
sentence feature, Eq. 5; Meaning Consistency Constraint, Eq. 6, on triplets of expressions),
Sec. 3.4 (masked-attention decoder on the CMD's levels 1-3, masks from level 4, Eq. 7; Hungarian
matching; Eq. 8's loss; top-1 query at inference) and the Oc-IoU of Sec. 4.3 (Eqs. 9-10, in
common.run.evaluate_image).

Video (Sec. 4.2, Table 2, supplementary Tables 5-6): `VideoVATEX`, torchvision's Video-Swin-B
(Kinetics-400, ImageNet-22k init) with the official code's temporal adaptations; a test video is
one clip with one top-1 query (common.run.video_query_masks; Ref-DAVIS17: ReferFormer's protocol).
Recipe (Sec. 4.1): RefCOCO with this backbone, an image a clip of --num-frames copies (official
configs/refcoco/swin/videoswinb_joint.yaml, in the first commit 9733c4f only; one frame at test),
then Ref-YouTube-VOS --init from it, Ref-DAVIS17 zero-shot; no --init: the supplementary's start
from ImageNet (--steps 200000 --lr-drop 140000). Ours: one RefCOCO dataset (official: the three),
clips without repeated frames, short side 480 (official: 360 or 480), mask losses over the clip
(official: per frame, summed), videos over --eval-chunk frames through the Video-Swin in pieces.
Not done: the official joint training of RefCOCO/+/g and Ref-YouTube-VOS (9733c4f's
configs/youtubevos/swin/VLFormer_VideoSwinB.yaml: 16 clips of 4 frames, 250k steps).

Deviations from the paper (and from the official code, which the paper does not describe):
  - Eq. (1) as the paper: cosine similarities, the map L2-normalised (official: a plain dot
    product, no normalisation). Each caption meets its own image (official: caption k meets image
    k mod B when a GPU holds several images). As the official code (vatex_model.py): the image
    resized to 224 and centre-cropped, patch tokens without CLIP's post-LayerNorm (paper silent),
    and the CLS score dropped before the projection to C (Sec. 3.1's HW/256 + 1 tokens hold it).
  - Before the four CMD levels, as the official code (modeling/pixel_decoder/cmd.py), not
    Sec. 3.2: three early BATs on res5/res4/res3 that update only the pixels, and Mask2Former's
    deformable encoder. The CMD runs in fp32 under autocast and is initialised as there.
  - Eq. (4) at level 1 as the paper: Conv2d(V_1') (official: no conv at the first level).
  - BAT key-padding masks are bool (official: float, which PyTorch adds to the logits, so pads are
    attended).
  - The text resizer applies its dropout once (official: twice in training; in FFNLayer,
    modeling/attention/attention_layer.py, the 512 -> 256 residual add fails and its except
    branch drops out the output again).
  - Eq. (5) is a per-sample mean over the sentence's real tokens (official: a sum over pads too,
    divided by the batch's token count).
  - Eq. (6) as the paper writes it (`--mcc-loss paper`); the official symmetric InfoNCE, tau 0.1,
    is `--mcc-loss infonce`, with negatives from this process's batch (official: all-gathered).
  - A triplet whose image has no other referred object has no negative: the official code then
    trains the caption "None" towards an empty mask; we leave the negative out.
  - Eq. (8)'s class loss, "BCE" in Sec. 3.4, is a 2-way cross-entropy (target, no object) with
    no-object weight 0.1, as the official code (modeling/criterion.py).
  - Top-1 by the target probability, as the paper (official: by the raw target logit).
  - No photometric jitter or +-15 degree rotation in training (official), no AMP on CPU.
  - Toy (ours): nothing is pretrained, so a tiny CLIP is first trained on the toy images
    (data/toy_pretrain.py), then frozen as the paper freezes the real one.

Run (every option: --help):
  python vatex.py --data toy --train                     # toy data and a tiny CLIP made if missing
  torchrun --nproc_per_node 2 vatex.py --data refcoco --train    # paper configuration, data/refer
  python vatex.py --data refcoco --eval --eval-split testA --checkpoint runs/vatex-refcoco/last.pt
  python vatex.py --data toy --predict IMAGE --text "the red circle on the left"
  Table 2: vatex.py --data refcoco --video --train --out runs/vatex-refcoco-video; --data ytvos
    --train --init runs/vatex-refcoco-video/last.pt; --data davis --eval --checkpoint ...
  ablations, the rows of Table 4 (the supplementary's Table 8 has all 8 combinations):
    Baseline: --no-clip-prior --no-cmd --no-mcc    +CLIP Prior: --no-cmd --no-mcc
    +CMD: --no-clip-prior --no-mcc    +CMD +MCC: --no-clip-prior    all three: the defaults
  --no-cmd keeps the baseline's "text-guided vision features" (every BAT's Eq. 3, on the text
  encoder's words) and drops the "vision-aware text features" (no Eq. 2: the decoder's word
  attention and the queries read the text encoder's words).
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, reduce, repeat
from transformers import CLIPModel

from common.backbones import (CLIPEncoder, clip_b16_config, clip_view, deformable_encode,
                              deformable_encoder, deformable_encoder_init_, load_swin_backbone,
                              load_video_swin_b, parameter_report, sine_position_embedding,
                              sine_position_embedding_3d, swin_backbone, swin_base_22k_config,
                              tiny_video_swin, video_swin_b)
from common.datasets import (IMAGENET_MEAN, IMAGENET_STD, RefCOCO, RefDAVIS17, RefYouTubeVOS,
                             collate_image, collate_video, item_generator, resize_clip)
from common.engine import (Progress, autocast, cleanup_distributed, is_main, reduce_dict,
                           save_checkpoint, seed_everything, setup_distributed, to_device, unwrap)
from common.mask2former import (MaskedAttentionDecoder, c2_xavier_fill_, frame_masks,
                                side_by_side, xavier_init_)
from common.matching import set_losses
from common.run import (RunConfig, check_finite, cli_errors, data_root, evaluate_image,
                        evaluate_video, init_weights, load_trained, param_groups, parse_config,
                        predict_files, resume, run_dir, train_batches, video_query_masks,
                        wrap_ddp)
from common.text import main_noun_phrase, word_tokenizer
from data.toy import ensure_toy, motion_sentence_keys
from data.toy_pretrain import pretrain_toy_clip, tiny_clip

# Shapes: B images, N captions (3 per image in training: expression, positive, negative), Q the
# N = 5 queries of the paper, L words, C channels, D CLIP's joint width, N_p CLIP patch tokens,
# H W input size, h w mask features (H/4, W/4), H_c CLIP's input size, T frames of a clip.


# ------------------------------------------------------------------------------------ config
@dataclass
class Config(RunConfig):
    data: str = "refcoco"  # refcoco | refcoco+ | refcocog | ytvos | davis (paper) | toy (CPU)
    eval_split: str = "val"  # unc: val / testA / testB; umd: val / test
    split_by: str = "unc"  # refer API split scheme (refcocog: umd, official; google also read)
    # ablations, the rows of paper Table 4: Baseline --no-clip-prior --no-cmd --no-mcc;
    # +CLIP Prior --no-cmd --no-mcc; +CMD --no-clip-prior --no-mcc; +CMD +MCC --no-clip-prior;
    # all three: the defaults
    clip_prior: bool = True  # Sec. 3.1; off: the queries are the sentence feature alone
    cmd: bool = True  # Sec. 3.2; off: the BATs keep Eq. (3) on the encoder's words, no Eq. (2)
    mcc: bool = True  # Sec. 3.3
    mcc_loss: str = "paper"  # paper: Eq. (6); infonce: the official symmetric InfoNCE
    # model
    # official configs/refcoco/swin/swin_base.yaml: swin_base_patch4_window12_384_22k (the paper
    # says only "pre-trained on ImageNet", supplementary Sec. 2.5); here transformers' copy
    weights: str = "microsoft/swin-base-patch4-window12-384-in22k"  # Swin-B ImageNet-22k, official
    clip_weights: str = "openai/clip-vit-base-patch16"  # official (ViT-B/16 both towers)
    dim: int = 256  # C, paper Sec. 4.1
    heads: int = 8  # official
    ffn_dim: int = 2048  # official (decoder)
    encoder_layers: int = 6  # official (MSDeformAttn layers)
    encoder_ffn_dim: int = 1024  # official (hard-coded)
    decoder_layers: int = 9  # supplementary Sec. 1
    num_queries: int = 5  # N, supplementary Sec. 1
    clip_image_size: int = 224  # official (CLIP processor: short side 224, centre crop)
    toy_swin_dim: int = 32  # toy only (ours): width of the tiny Swin's first stage
    toy_clip_steps: int = 400  # toy only (ours): the tiny CLIP's contrastive pre-training
    video: bool = False  # Sec. 4.2 (ytvos, davis; on RefCOCO: what ytvos starts from): clips
    num_frames: int = 4  # official (9733c4f: videoswinb_joint.yaml, VLFormer_VideoSwinB.yaml)
    eval_chunk: int = 36  # (ours) frames per Video-Swin pass at test; official: the whole video
    # losses, Eq. (8) (paper Sec. 4.1; dice weight and no-object weight official)
    w_cls: float = 2.0
    w_bce: float = 5.0
    w_dice: float = 5.0
    w_mcc: float = 2.0
    no_object_weight: float = 0.1  # official
    mcc_temperature: float = 0.1  # official InfoNCE default (Eq. 6 has none)
    num_points: int = 12544  # official (point-sampled mask losses); 0 = whole masks
    # optimisation, paper Sec. 4.1 and supplementary
    steps: int = 100_000  # paper
    lr: float = 1e-4  # paper
    lr_drop: int = 66_667  # paper: x0.1 at 2/3 of training (official Swin-B: 100k of 150k)
    backbone_lr_mult: float = 0.1  # supplementary: 1e-5 for the visual encoder
    weight_decay: float = 0.05  # official
    grad_clip: float = 0.01  # official (full-model L2 norm)
    batch_size: int = 8  # images per step over all processes, official
    short_side: int = 480  # paper Sec. 4.1
    max_size: int = 1333  # official (detectron2 default)


PRESETS = {  # per-dataset deltas from the paper configuration above
    # toy (ours): a tiny model for 2 CPU cores, sized as DsHmp's toy (3 decoder layers, 1,024
    # points); random-init Swin, so the backbone gets the full lr; 4 images = ~10 captions a step
    "toy": dict(dim=64, heads=4, ffn_dim=256, encoder_layers=2, encoder_ffn_dim=128,
                decoder_layers=3, clip_image_size=48, num_points=1024, steps=1500, lr=5e-4,
                lr_drop=1000, backbone_lr_mult=1.0, grad_clip=1.0, batch_size=4, short_side=96,
                max_size=96, workers=0, log_every=10, save_every=250),
    "refcoco": dict(),
    "refcoco+": dict(),
    "refcocog": dict(split_by="umd"),
    "ytvos": dict(video=True, eval_split="valid"),  # valid: the challenge server scores it
    "davis": dict(video=True, eval_split="valid"),  # zero-shot with the ytvos model (Sec. 4.1)
}
ABLATIONS = ("clip_prior", "cmd", "mcc", "mcc_loss")


# ------------------------------------------------------------------------------ text encoder
def sine_positions_1d(mask, dim, temperature=10_000.0):
    """Normalised 1-D sine positions of the real tokens, (N, L) bool -> (N, L, dim) (official
    PositionEmbeddingSine1D, as ReferFormer)."""
    x = mask.float().cumsum(1)  # (N, L)
    x = x / (x[:, -1:] + 1e-6) * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(dim, device=mask.device) // 2) / dim)  # (dim,)
    angles = x[..., None] / freq  # (N, L, dim)
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(2)


# ---------------------------------------------------------------------- Sec. 3.1 CLIP Prior
def clip_heatmap(patch_tokens, text_embeds):
    """Eq. (1): the normalised cosine similarity of every patch token (N, N_p, D) with the text
    embedding (N, D) of "a photo of {noun phrase}" -> (N, N_p), unit L2 norm per caption."""
    similarity = einsum(F.normalize(patch_tokens, dim=-1), F.normalize(text_embeds, dim=-1),
                        "n p d, n d -> n p")  # (N, N_p)
    return F.normalize(similarity, dim=-1)  # norm(.) of Eq. (1)


# -------------------------------------------------- Sec. 3.2 Contextual Multimodal Decoder
class BAT(nn.Module):
    """Eqs. (2)-(3), the official "bi-directional attention transfer": the words attend to the
    pixels and are gated by themselves, F_w = MHA(F_w, V, V) * F_w; then the pixels attend to
    the updated words, V' = MHA(V, F_w, F_w) * V. No norm, residual or FFN (official).
    update_words=False (--no-cmd): Eq. (3) alone, on the words as given."""

    def __init__(self, *, dim, heads, update_words=True):
        super().__init__()
        # not built when unused (--no-cmd): DDP would wait for its gradients
        self.text_attn = (nn.MultiheadAttention(dim, heads, batch_first=True) if update_words
                          else None)
        self.visual_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        xavier_init_(self)  # official (cmd.py)

    def forward(self, visual, words, word_pos, word_mask):
        """visual (N, HW, C); words, word_pos (N, L, C); word_mask (N, L) True on real tokens.
        Returns (V' (N, HW, C), F_w (N, L, C))."""
        if self.text_attn is not None:
            attended = self.text_attn(words + word_pos, visual, visual, need_weights=False)[0]
            words = attended * words  # Eq. (2)
        attended = self.visual_attn(visual, words + word_pos, words, key_padding_mask=~word_mask,
                                    need_weights=False)[0]  # (N, HW, C)
        return attended * visual, words  # Eq. (3)


def conv_gn(in_channels, out_channels, kernel_size, *, bias=True, relu=False):
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                        bias=bias), nn.GroupNorm(32, out_channels)]
    return nn.Sequential(*layers, *[nn.ReLU()] * relu)


class ContextualMultimodalDecoder(nn.Module):
    """Sec. 3.2 and the supplementary's figure: the pixel decoder of VATEX, with the official
    code's early BATs and deformable encoder before its four levels; fp32 under autocast.

    forward(stages, words, word_pos, word_mask): stages = the backbone's 4 maps (N, C_s, H/s, W/s),
    s = 4, 8, 16, 32; words (N, L, C) -> dict(features: levels 1-3 [(N, C, H/32, W/32), (N, C,
    H/16, W/16), (N, C, H/8, W/8)], the decoder's keys, pos: their sine positions, mask_features
    (N, C, H/4, W/4) from level 4, words: F_4^w (N, L, C), the vision-aware words, or the
    words as given when the BATs do not update them (update_words=False, --no-cmd))."""

    def __init__(self, *, in_channels, dim, heads, encoder_layers, encoder_ffn_dim,
                 update_words=True):
        super().__init__()
        # res5, res4, res3 -> C, then an early BAT on each that updates the pixels (official)
        self.input_proj = nn.ModuleList(conv_gn(c, dim, 1) for c in in_channels[:0:-1])
        self.early_bats = nn.ModuleList(BAT(dim=dim, heads=heads, update_words=update_words)
                                        for _ in range(3))
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.encoder = deformable_encoder(dim=dim, heads=heads, layers=encoder_layers,
                                          ffn_dim=encoder_ffn_dim)  # Mask2Former's (official)
        # Eq. (4): level 1 reads the encoder's 1/32 map; levels 2-4 a lateral 1x1 conv of the
        # encoder's 1/16 and 1/8 maps and of the backbone's 1/4 map (FPN)
        self.lateral = nn.ModuleList(conv_gn(c, dim, 1, bias=False)
                                     for c in (dim, dim, in_channels[0]))
        self.bats = nn.ModuleList(BAT(dim=dim, heads=heads, update_words=update_words)
                                  for _ in range(4))
        self.fuse = nn.ModuleList(conv_gn(dim, dim, 3, bias=False, relu=True) for _ in range(4))
        self.mask_proj = nn.Conv2d(dim, dim, 1)
        # official (cmd.py): xavier input projections with zero bias, detectron2's c2_xavier_fill
        # for the lateral, fusion and mask convs
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for conv in [m[0] for m in (*self.lateral, *self.fuse)] + [self.mask_proj]:
            c2_xavier_fill_(conv)
        deformable_encoder_init_(self.encoder)
        nn.init.normal_(self.level_embed)

    def bat(self, module, feature, words, word_pos, word_mask):
        """A BAT on maps (N*T, C, h, w), T >= 1 frames per caption, all met at once (official
        cmd.py: "(b t) c h w -> (t h w) b c") -> (the maps, the words)."""
        h, w = feature.shape[-2:]
        visual = rearrange(feature, "(n t) c h w -> n (t h w) c", n=len(words))  # (N, T*hw, C)
        visual, words = module(visual, words, word_pos, word_mask)
        return rearrange(visual, "n (t h w) c -> (n t) c h w", h=h, w=w), words

    def forward(self, stages, words, word_pos, word_mask):
        # official (cmd.py): the CMD in fp32 under mixed precision, `autocast(enabled=False)`
        with torch.autocast(device_type=words.device.type, enabled=False):
            stages = [s.float() for s in stages]  # (N, C_s, H/s, W/s)
            words, word_pos = words.float(), word_pos.float()  # (N, L, C)
            maps = []
            for i, stage in enumerate(stages[:0:-1]):  # res5, res4, res3: early BATs, pixels only
                feature = self.input_proj[i](stage)  # (N, C, h_l, w_l)
                maps.append(self.bat(self.early_bats[i], feature, words, word_pos, word_mask)[0])
            encoded = deformable_encode(self.encoder, maps, self.level_embed)  # [1/32, 1/16, 1/8]
            levels, previous = [], None
            for i, feature in enumerate([encoded[0], encoded[1], encoded[2], stages[0]]):
                if i > 0:
                    feature = self.lateral[i - 1](feature)  # (N, C, h_i, w_i): V_i
                visual, words = self.bat(self.bats[i], feature, words, word_pos,
                                         word_mask)  # Eqs. (2)-(3)
                if previous is not None:  # + Ups(F_{i-1}^v)
                    visual = visual + F.interpolate(previous, size=visual.shape[-2:],
                                                    mode="bilinear", align_corners=False)
                previous = self.fuse[i](visual)  # Eq. (4): F_i^v
                levels.append(previous)
            pos = [sine_position_embedding(f, f.shape[1]) for f in levels[:3]]
            return {"features": levels[:3], "pos": pos, "mask_features": self.mask_proj(levels[3]),
                    "words": words}


# -------------------------------------------------------- Sec. 3.4 masked-attention decoder
class VatexDecoder(MaskedAttentionDecoder):
    """Mask2Former's decoder with VATEX's queries: content = the vision-aware sentence feature
    repeated N times (f_o), the learnable embeddings only as positions; the first prediction is
    made before the CLIP prior is added (official); layer 1 attends without a mask (official).
    The pixel positions are Mask2Former's 2-D sine (the official: a 3-D sine over one frame, which
    adds one constant vector per level to every key; the softmax cancels it, so the outputs agree,
    tests/test_parity.py)."""

    def __init__(self, *, hidden_dim, num_queries, num_layers, num_heads, ffn_dim):
        # official: no learnable query features; in every layer the word cross-attention beside
        # the visual one, the two summed before one LayerNorm
        super().__init__(hidden_dim=hidden_dim, num_queries=num_queries, num_layers=num_layers,
                         num_heads=num_heads, ffn_dim=ffn_dim, num_classes=1, mask_dim=hidden_dim,
                         words_beside=True, query_features=False)

    def forward(self, features, pos, mask_features, sentence, prior, words, word_pos, word_mask):
        pixel_levels, pixel_pos, sizes = self.flatten_levels(features, pos)
        queries = repeat(sentence, "n c -> n q c", q=self.num_queries)  # f_o (Sec. 3.1)
        query_pos = repeat(self.query_pos.weight, "q c -> n q c", n=len(sentence))  # (N, Q, C)
        logits, masks, _, attn_mask = self.predict(queries, mask_features, sizes[0])
        predictions = [{"pred_logits": logits, "pred_masks": masks}]
        if prior is not None:
            queries = queries + prior[:, None]  # Sec. 3.1: the heatmap, in C, added to every query
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels  # round robin, coarse first
            queries = layer(queries, query_pos, pixel_levels[level], pixel_pos[level],
                            None if i == 0 else attn_mask, words, word_mask, word_pos)
            logits, masks, _, attn_mask = self.predict(queries, mask_features,
                                                       sizes[(i + 1) % self.num_levels])
            predictions.append({"pred_logits": logits, "pred_masks": masks})  # Eq. (7), as logits
        return {**predictions[-1], "aux_outputs": predictions[:-1]}


# ------------------------------------------------------------------------------------ model
def sentence_feature(words, word_mask):
    """Eq. (5): F_s, the mean of the vision-aware words F_4^w (N, L, C) over the real tokens
    (N, L) -> (N, C)."""
    weights = word_mask.to(words.dtype)  # (N, L)
    return einsum(words, weights, "n l c, n l -> n c") / weights.sum(1, keepdim=True)


class VATEX(nn.Module):
    """forward(images (B, 3, H, W) ImageNet-normalised, H W multiples of 32, image_sizes [(h, w)]
    unpadded, texts [N expressions], image_index (N,) the image of each caption) -> dict(
    pred_logits (N, Q, 2), pred_masks (N, Q, H/4, W/4), aux_outputs, sentence (N, C): Eq. (5))."""

    def __init__(self, *, backbone, clip, dim, heads, ffn_dim, encoder_layers, encoder_ffn_dim,
                 decoder_layers, num_queries, clip_image_size, clip_prior=True,
                 vision_aware_text=True):
        super().__init__()
        self.backbone, self.clip, self.clip_image_size = backbone, clip, clip_image_size
        # official "resizer" (an FFNLayer, xavier-initialised): CLIP's words (512) -> C, 2-layer
        # MLP with dropout, then LayerNorm
        self.text_proj = xavier_init_(nn.Sequential(
            nn.Linear(clip.text_hidden_size, dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(dim, dim),
            nn.LayerNorm(dim)))
        self.pixel_decoder = ContextualMultimodalDecoder(  # the CMD (--no-cmd: no word update)
            in_channels=backbone.channels, dim=dim, heads=heads, encoder_layers=encoder_layers,
            encoder_ffn_dim=encoder_ffn_dim, update_words=vision_aware_text)
        num_patches = (clip_image_size // clip.patch_size) ** 2  # P = HW/256 at 224 (CLS dropped)
        # Sec. 3.1 "changing the dimension of the similarity map to C" (official: MLP + LayerNorm,
        # an FFNLayer, xavier-initialised)
        self.prior_proj = xavier_init_(nn.Sequential(
            nn.Linear(num_patches, dim), nn.ReLU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
        ) if clip_prior else None
        self.decoder = VatexDecoder(hidden_dim=dim, num_queries=num_queries,
                                    num_layers=decoder_layers, num_heads=heads, ffn_dim=ffn_dim)

    def forward(self, images, image_sizes, texts, image_index):
        words, word_pos, word_mask = self.encode_text(texts)
        stages = [s[image_index] for s in self.backbone(images).feature_maps]  # (N, C_s, h_s, w_s)
        pixels = self.pixel_decoder(stages, words, word_pos, word_mask)
        words = pixels["words"]  # F_4^w (N, L, C); f_w as it came with --no-cmd
        sentence = sentence_feature(words, word_mask)  # Eq. (5): F_s (N, C)
        prior = self.clip_prior(images, image_sizes, texts, image_index)  # (N, C) or None
        out = self.decoder(pixels["features"], pixels["pos"], pixels["mask_features"], sentence,
                           prior, words, word_pos, word_mask)
        return {**out, "sentence": sentence}

    def encode_text(self, texts):
        """The frozen CLIP text tower's last hidden state, resized to C: f_w (N, L, C), its sine
        positions (N, L, C) and the real tokens (N, L)."""
        encoded = self.clip.encode_words(texts)
        words = self.text_proj(encoded["word_feats"])  # (N, L, C)
        word_pos = sine_positions_1d(encoded["attn_mask"], words.shape[-1])  # (N, L, C)
        return words, word_pos, encoded["attn_mask"]

    @torch.no_grad()
    def infer(self, frames, expression, *, chunk=None):
        """An image (1, 3, H, W), padded to multiples of 32 -> (Q, 2), (Q, 1, Hp/4, Wp/4), for
        common.run.video_query_masks (`chunk`: unused)."""
        H, W = frames.shape[-2:]
        padded = F.pad(frames, (0, -W % 32, 0, -H % 32))  # (1, 3, Hp, Wp)
        out = self(padded, [(H, W)], [expression], torch.zeros(1, dtype=torch.long,
                                                               device=frames.device))
        return out["pred_logits"][0], out["pred_masks"][0][:, None]

    def clip_prior(self, images, image_sizes, texts, image_index):
        """Sec. 3.1: the heatmap of each caption's main noun phrase on its own image, in C."""
        if self.prior_proj is None:
            return None
        views = clip_view(images, image_sizes, self.clip_image_size, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)  # (B, 3, H_c, H_c)
        encoded = self.clip.encode_image(views, patch_layernorm=False)
        patches = encoded["patch_tokens"]  # (B, N_p, D)
        prompts = [f"a photo of {main_noun_phrase(t)}" for t in texts]  # Sec. 3.1 template
        heatmap = clip_heatmap(patches[image_index], self.clip.encode_text(prompts))  # (N, N_p)
        return self.prior_proj(heatmap)  # (N, C)


class VideoVATEX(VATEX):
    """Sec. 4.2's "minor adaptations", the official code's: a BAT's words meet all the frames
    (cmd.py); the queries, shared by the frames, attend to all with a 3-D sine position and make a
    mask on each (vatext_trans_decoder.py; here the frames side by side); the CLIP prior on every
    frame, averaged in C (vatex_model.py). forward(frames (B, T, 3, H, W), .., clip_index (N,),
    chunk: frames per Video-Swin pass) -> pred_masks (N, Q, T, H/4, W/4); images (B, 3, H, W):
    one-frame clips, VATEX's outputs (official RefCOCO test)."""

    def forward(self, frames, image_sizes, texts, clip_index, chunk=None):
        clips = frames if frames.dim() == 5 else frames[:, None]  # (B, T, 3, H, W)
        T = clips.shape[1]
        words, word_pos, word_mask = self.encode_text(texts)
        index = (clip_index[:, None] * T + torch.arange(T).to(clip_index)).flatten()  # (N*T,)
        stages = [s[index] for s in self.backbone(clips, chunk=chunk)]  # (N*T, C_s, h_s, w_s)
        pixels = self.pixel_decoder(stages, words, word_pos, word_mask)
        words = pixels["words"]  # F_4^w (N, L, C)
        sentence = sentence_feature(words, word_mask)  # Eq. (5): F_s (N, C)
        prior = self.clip_prior(clips.flatten(0, 1), [s for s in image_sizes for _ in range(T)],
                                [x for x in texts for _ in range(T)], index)  # (N*T, C)
        prior = None if prior is None else reduce(prior, "(n t) c -> n c", "mean", t=T)  # (N, C)
        pos = [sine_position_embedding_3d(f, f.shape[1], T) for f in pixels["features"]]
        out = self.decoder([side_by_side(f, T) for f in pixels["features"]],
                           [side_by_side(p, T) for p in pos],
                           side_by_side(pixels["mask_features"], T), sentence, prior, words,
                           word_pos, word_mask)  # (N, Q, h, T*w) masks
        return {**(out if frames.dim() == 4 else frame_masks(out, T)), "sentence": sentence}

    @torch.no_grad()
    def infer(self, frames, expression, *, chunk):
        """A video as one clip (official test): (T, 3, H, W) -> (Q, 2), (Q, T, Hp/4, Wp/4)."""
        H, W = frames.shape[-2:]
        clip = F.pad(frames, (0, -W % 32, 0, -H % 32))[None]  # (1, T, 3, Hp, Wp)
        out = self(clip, [(H, W)], [expression], torch.zeros(1, dtype=torch.long,
                                                              device=frames.device), chunk=chunk)
        return out["pred_logits"][0], out["pred_masks"][0]


# ---------------------------------------------------------------- Sec. 3.3 MCC and the losses
def mcc_loss(sentence, triplets):
    """Eq. (6): -log(sim(p1, p2) / (sim(p1, n) + sim(p2, n))), sim = exp(cosine), averaged over
    the triplets that have a negative. sentence (N, C), triplets (T, 3)."""
    triplets = triplets[triplets[:, 2] >= 0]
    if len(triplets) == 0:
        return sentence.sum() * 0
    p1, p2, n = (F.normalize(sentence[triplets[:, k]].float(), dim=-1) for k in range(3))
    cos = lambda a, b: (a * b).sum(-1)  # noqa: E731
    denominator = torch.logsumexp(torch.stack([cos(p1, n), cos(p2, n)]), 0)
    return (denominator - cos(p1, p2)).mean()


def infonce_loss(sentence, triplets, temperature):
    """The official MCC: InfoNCE(q, p, negatives) + InfoNCE(p, q, negatives), every negative of the
    batch shared ("unpaired"), L2-normalised features, logits / temperature."""
    negatives = F.normalize(sentence[triplets[triplets[:, 2] >= 0, 2]].float(), dim=-1)  # (M, C)
    if len(negatives) == 0:
        return sentence.sum() * 0
    q, p = (F.normalize(sentence[triplets[:, k]].float(), dim=-1) for k in range(2))  # (T, C)
    def one_way(a, b):
        logits = torch.cat([(a * b).sum(-1, keepdim=True), a @ negatives.T], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))
    return one_way(q, p) + one_way(p, q)


def compute_losses(cfg, outputs, targets, *, triplets):
    """The unweighted terms of Eq. (8): class CE, mask BCE and dice with deep supervision (one
    target per caption, normalised by the captions of this process, official) and the MCC."""
    terms, _ = set_losses(outputs, targets, w_cls=cfg.w_cls, w_bce=cfg.w_bce, w_dice=cfg.w_dice,
                          no_object_weight=cfg.no_object_weight, num_points=cfg.num_points or None,
                          num_masks=len(targets))
    if cfg.mcc:
        terms["mcc"] = (mcc_loss(outputs["sentence"], triplets) if cfg.mcc_loss == "paper"
                        else infonce_loss(outputs["sentence"], triplets, cfg.mcc_temperature))
    return terms


# ---------------------------------------------------------------------------------- building
class Triplets(torch.utils.data.Dataset):
    """RefCOCO items with the Sec. 3.3 triplet, sampled as the official dataset mapper: the
    positive is a random sentence of the same object (a "." appended when it is the expression
    itself); the negative a sentence of a random referred object of the same image, drawn among
    all of them, the target's own included, when it draws the target there is no negative."""

    def __init__(self, base: RefCOCO, seed: int):
        self.base, self.seed, self.samples = base, seed, base.samples

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        item, sample = self.base[index], self.samples[index]
        g = item_generator(self.seed)
        def pick(options):
            return options[int(torch.randint(len(options), (), generator=g))]
        positive = pick(self.base.sentences[sample["ref_id"]])
        item["positive"] = positive + "." if positive == item["expression"] else positive
        objects = sorted({self.base.ref_ann[r] for r in self.base.image_refs[sample["image_id"]]})
        other = pick(objects)
        item["negative"] = item["negative_mask"] = None
        if other != sample["ann_id"]:
            ref = pick([r for r in self.base.image_refs[sample["image_id"]]
                        if self.base.ref_ann[r] == other])
            item["negative"] = pick(self.base.sentences[ref])
            mask = torch.from_numpy(self.base._mask({"size": sample["size"], "ann_id": other}))
            resized = resize_clip(mask[None, None].float(), short_side=self.base.short_side,
                                  max_size=self.base.max_size)[0]  # (1, 1, H, W)
            item["negative_mask"] = resized[0, 0] > 0.5  # (H, W)
        return item


class VideoTriplets(Triplets):
    """Ref-YouTube-VOS clips with Sec. 3.3's triplet, as the official video mapper: the positive as
    `Triplets`; the negative of a random object seen in the clip, the target's included."""

    def __getitem__(self, index):
        item, sample, g = self.base[index], self.samples[index], item_generator(self.seed)
        def pick(options):
            return options[int(torch.randint(len(options), (), generator=g))]
        idx, video = item["frame_idx"].tolist(), [s for s in self.samples
                                                  if s["video"] == sample["video"]]
        def sentences(obj_ids):
            return [s["expression"] for s in video if s["obj_ids"] == obj_ids]
        positive = pick(sentences(sample["obj_ids"]))
        item["positive"] = positive + "." if positive == item["expression"] else positive
        other = pick(sorted({s["obj_ids"][0] for s in video if self.base._visible(s)[idx].any()}))
        item["negative"] = item["negative_mask"] = None
        if [other] != sample["obj_ids"]:
            item["negative"] = pick(sentences([other]))
            masks = self.base._load_masks({**sample, "obj_ids": [other]}, idx, item["orig_size"])
            item["negative_mask"] = F.interpolate(  # (T, H, W), resized as the reader's masks
                torch.from_numpy(masks).view(torch.uint8), size=item["masks"].shape[-2:],
                mode="nearest-exact")[0].bool()
        return item


def captions_of(batch):
    """The 3B captions of a batch and their targets: per image its expression, positive and (when
    there is one) negative. Returns texts, image_index (N,), targets [{"masks": (1, [T,] Hp, Wp)}]
    (clips: T frames) and the triplets (N_t, 3) caption indices [p1, p2, n], n = -1 without one."""
    texts, index, targets, triplets = [], [], [], []
    for b, target in enumerate(batch["targets"]):
        first = len(texts)
        texts += [batch["expression"][b], batch["positive"][b]]
        targets += [target, target]
        negative = -1
        if batch["negative"][b] is not None:
            negative = len(texts)
            mask = torch.zeros_like(target["masks"])  # (1, [T,] Hp, Wp): padded like the batch
            h, w = batch["negative_mask"][b].shape[-2:]
            mask[0, ..., :h, :w] = batch["negative_mask"][b]
            texts.append(batch["negative"][b])
            targets.append({"masks": mask, "labels": target["labels"]})
        index += [b] * (len(texts) - first)
        triplets.append([first, first + 1, negative])
    return texts, torch.tensor(index), targets, torch.tensor(triplets)


def make_dataset(cfg, root, split, *, train, seed=None):
    if cfg.data in ("ytvos", "davis"):  # official: no flip
        base = (RefYouTubeVOS if cfg.data == "ytvos" else RefDAVIS17)(
            root, split, train=train, num_frames=cfg.num_frames, short_side=cfg.short_side,
            max_size=cfg.max_size, flip=False, seed=cfg.seed if seed is None else seed,
            frame_range=10**9)  # official: a clip's frames drawn from the whole video
        return VideoTriplets(base, base.seed) if train else base
    toy = cfg.data == "toy"
    base = RefCOCO(root, Path(root) / "images" if toy else cfg.image_root,
                   dataset="refcoco" if toy else cfg.data, split_by=cfg.split_by, split=split,
                   train=train, short_side=cfg.short_side, max_size=cfg.max_size, flip=False,
                   seed=cfg.seed if seed is None else seed)  # official: no flip
    return Triplets(base, base.seed) if train else base


def build_model(cfg, *, vocab=None, pretrained=True, clip=None) -> VATEX:
    """The toy-size model (tiny Swin, the toy CLIP `clip` or a random one over `vocab`) for --data
    toy; otherwise the paper configuration: Swin-B 22k (--video: Video-Swin-B, a VideoVATEX) and
    CLIP ViT-B/16 (random if not pretrained)."""
    if cfg.data == "toy":
        backbone = tiny_video_swin(embed_dim=cfg.toy_swin_dim) if cfg.video else swin_backbone(
            swin_base_22k_config(image_size=96, embed_dim=cfg.toy_swin_dim, depths=[1, 1, 1, 1],
                                 num_heads=[1, 2, 2, 4], window_size=4, drop_path_rate=0.0))
        clip = clip or tiny_clip(vocab, cfg.clip_image_size)
    elif pretrained:
        backbone = load_video_swin_b() if cfg.video else load_swin_backbone(cfg.weights)
        clip = CLIPEncoder.from_pretrained(cfg.clip_weights, freeze=True)
    else:  # --count-params: the same modules with random weights, nothing downloaded
        backbone = video_swin_b() if cfg.video else swin_backbone(swin_base_22k_config())
        clip = CLIPEncoder(CLIPModel(clip_b16_config()), word_tokenizer([]), freeze=True)
    clip._freeze(True)  # Sec. 4.1: both CLIP towers frozen
    return (VideoVATEX if cfg.video else VATEX)(
        backbone=backbone, clip=clip, dim=cfg.dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim,
        encoder_layers=cfg.encoder_layers, encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_layers=cfg.decoder_layers, num_queries=cfg.num_queries,
        clip_image_size=cfg.clip_image_size, clip_prior=cfg.clip_prior, vision_aware_text=cfg.cmd)


# ---------------------------------------------------------------------------------- training
def train(cfg, ddp, root, out):
    """Sec. 4.1 recipe; returns the trained model (unwrapped)."""
    seed_everything(cfg.seed)  # identical initial weights on every process
    dataset = make_dataset(cfg, root, "train", train=True, seed=cfg.seed + ddp.rank)
    clip, vocab = (pretrain_toy_clip(cfg, dataset, out.parent / "clip-toy" / f"seed{cfg.seed}.pt")
                   if cfg.data == "toy" else (None, None))
    seed_everything(cfg.seed)  # the same model whether the toy CLIP was trained now or reused
    # --init: Sec. 4.1, Ref-YouTube-VOS starts from the RefCOCO(+/g) model (a --video run)
    model = init_weights(cfg.init, build_model(cfg, vocab=vocab, clip=clip)).to(ddp.device)
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          backbone_lr_mult=cfg.backbone_lr_mult, backbone=("backbone",))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [cfg.lr_drop], gamma=0.1)
    step = 0
    if cfg.resume:
        step, _ = resume(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                         config=asdict(cfg))
    batches = train_batches(dataset, batch_size=cfg.batch_size, ddp=ddp, seed=cfg.seed,
                            collate=collate_video if cfg.data == "ytvos" else collate_image,
                            workers=cfg.workers, start_step=step)
    model = wrap_ddp(model, ddp)  # in train mode since built (the frozen CLIP stays in eval)
    with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
        while step < cfg.steps:
            batch = next(batches)
            texts, image_index, targets, triplets = captions_of(batch)
            images = batch["frames"] if "frames" in batch else batch["images"]  # (B, [T,] 3, H, W)
            if cfg.video and images.dim() == 4:  # clips of copies (official videoswinb_joint.yaml)
                images = repeat(images, "b c h w -> b t c h w", t=cfg.num_frames)
                targets = [{**t, "masks": repeat(t["masks"], "n h w -> n t h w", t=cfg.num_frames)}
                           for t in targets]
            images, targets = to_device((images, targets), ddp.device)
            with autocast(ddp.device):
                outputs = model(images, batch["image_sizes"], texts, image_index.to(ddp.device))
            terms = compute_losses(cfg, outputs, targets, triplets=triplets.to(ddp.device))
            loss = (cfg.w_cls * terms["ce"] + cfg.w_bce * terms["bce"] + cfg.w_dice * terms["dice"]
                    + cfg.w_mcc * terms.get("mcc", 0))  # Eq. (8), dice weighted as the mask BCE
            check_finite(loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                progress.log(step, reduce_dict({"loss": loss, **terms}),
                             lr=max(scheduler.get_last_lr()))
            if (step % cfg.save_every == 0 or step == cfg.steps) and is_main():
                save_checkpoint(out / "last.pt", model=model, optimizer=optimizer,
                                scheduler=scheduler, step=step, config=asdict(cfg),
                                extra={"vocab": vocab})
    return unwrap(model)


# ------------------------------------------------------------------------ Sec. 3.4 inference
def predict_masks(model, frames, expression, orig_size, cfg, **protocol):
    """Sec. 3.4: the mask of the query with the highest target probability (official: the raw
    logit), upsampled to the padded input, cropped, resized to the original size, > 0 (official),
    by common.run.video_query_masks; a video (Sec. 4.2) is one clip, one query for all its frames.
    `protocol`: probabilities (Ref-DAVIS17). frames (T, 3, H, W), an image T = 1 -> (T, H0, W0)."""
    return video_query_masks(model, frames, expression, orig_size, threshold=None,
                             chunk=cfg.eval_chunk, top1=True, **protocol)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    out, ddp = run_dir(cfg, "vatex", ABLATIONS), setup_distributed()
    checkpoint = cfg.checkpoint or out / "last.pt"
    video = cfg.data in ("ytvos", "davis")

    def rule(frames, expression, orig_size):  # with this command's test-time settings
        return predict_masks(model, frames.to(ddp.device), expression, orig_size, cfg,
                             probabilities=cfg.data == "davis" and not cfg.predict)

    if cfg.mcc_loss not in ("paper", "infonce"):
        raise SystemExit(f"vatex: --mcc-loss must be paper or infonce, got {cfg.mcc_loss!r}")
    with cli_errors("vatex"):
        if cfg.count_params:
            return print(parameter_report(build_model(cfg, vocab=["a"], pretrained=False), depth=2))
        root = data_root(cfg, "image", make_toy=ensure_toy) if cfg.train or cfg.eval else None
        if cfg.train:
            model, trained = train(cfg, ddp, root, out), cfg
        else:
            model, trained = load_trained(checkpoint, Config, build_model, ddp.device)
        if cfg.predict:
            predict_files(cfg.predict, cfg.text, rule, model=model, out=out / "vis" / "predict",
                          short_side=trained.short_side, max_size=trained.max_size)
        elif video:
            evaluate_video(make_dataset(cfg, root, cfg.eval_split, train=False),
                           lambda item: rule(item["frames"], item["expression"], item["orig_size"]),
                           model=model, out=out, data=cfg.data, split=cfg.eval_split,
                           checkpoint=checkpoint)
        else:
            subsets = motion_sentence_keys(root) if cfg.data == "toy" else None
            evaluate_image(make_dataset(cfg, root, cfg.eval_split, train=False),
                           lambda item: rule(item["image"][None], item["expression"],
                                             item["orig_size"])[0],
                           model=model, out=out, split=cfg.eval_split, checkpoint=checkpoint,
                           strict_pr=True, subsets=subsets)
    cleanup_distributed()


if __name__ == "__main__":
    main()
