"""VITA: Video Instance Segmentation via Object Token Association (Heo et al., NeurIPS 2022;
official code github.com/sukjunhwang/VITA @ 59c24ad, vita/modeling/transformer_decoder/vita.py).

VITA runs Mask2Former on every frame and turns its frame queries (object tokens) into video
queries, one per object of the whole clip: the Object Encoder lets the frame queries of nearby
frames exchange information, the Object Decoder gathers them into video queries, and a video
query's mask in frame t is its mask embedding dotted with frame t's mask features.

`ObjectEncoder` is VITA's Object Encoder (window self-attention over the frame queries, shifted
windows on odd layers at test, as the official code); `ObjectDecoder` is VITA's Object Decoder.
DsHmp's Motion Decoder is this decoder with a word cross-attention in every layer
(word_attention=True, as the official DsHmp `cross_test`). `VITA` puts them together with
Mask2Former and the heads. `vita_losses` is VITA's training objective with the weights of its
configs (`VITA_LOSS_WEIGHTS`): Mask2Former's set loss on every frame, the set loss of the video
queries over the whole clip (both common.matching.set_losses) and `similarity_loss`.
`load_official_vita` loads the official model-zoo checkpoints (detectron2 state dicts) into
`VITA`, by the explicit table `official_vita_key_map`.
"""
import math
import os
import pickle

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from common.backbones import (PixelLevel, official_swin_keys, param_keys,
                              tiny_mask2former_config)
from common.mask2former import MLP, MaskedAttentionDecoder, c2_xavier_fill_, xavier_init_
from common.matching import (frame_targets, matched_pred_index, num_masks, set_losses,
                             visible_objects)

# Shapes: B clips, T frames, Q frame queries per frame, V video queries, C channels, L words,
# n windows of K frames.


# ---------------------------------------------------------------------------------- Object Encoder
class ObjectEncoderLayer(nn.Module):
    """Self-attention among the frame queries of a window of frames, then an FFN; post-norm,
    no positions (VITA `SelfAttentionLayer` + `FFNLayer`, dropout 0, xavier-initialised as they)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        xavier_init_(self)  # official `_reset_parameters`

    def forward(self, tokens, attn_bias):
        # tokens (B*n, K*Q, C): the frame queries of one window per row; attn_bias (B*n, K*Q, K*Q)
        bias = repeat(attn_bias, "w i j -> (w h) i j", h=self.heads)  # (B*n*heads, K*Q, K*Q)
        tokens = self.self_norm(tokens + self.self_attn(tokens, tokens, tokens, attn_mask=bias)[0])
        return self.ffn_norm(tokens + self.ffn(tokens))


def window_bias(valid, window: int, shifted: bool) -> torch.Tensor:
    """VITA's attention masks over the frames of each window, as additive biases (-1000 = blocked,
    the official value): valid (B, T) bool with T a multiple of `window` (False on padding frames)
    -> (B, n, K, K), n = T / K windows of K frames, rows the querying frame, columns the key frame.

    Plain windows: padding frames are blocked as keys. Shifted windows (the frames rolled by
    ceil(K / 2) first, official `_shift_window_attn`): in the first and last window a padding frame
    is blocked as a key and as a query; in every window a padding query row is blocked; in the
    first window the frames that wrapped around from the end of the clip and those from its start
    do not see each other."""
    B, T = valid.shape
    if T % window:
        raise ValueError(f"window_bias: {T} frames are not a multiple of the window {window}")
    if not shifted:
        pad = rearrange(~valid, "b (n k) -> b n 1 k", k=window)  # keys
        return (pad.expand(-1, -1, window, -1) * -1000.0).float()  # (B, n, K, K)
    half = math.ceil(window / 2)
    pad = rearrange(torch.roll(~valid, half, 1), "b (n k) -> b n k 1", k=window)  # queries
    blocked = pad.expand(-1, -1, -1, window).clone()  # (B, n, K, K)
    for w in (0, -1):
        blocked[:, w] = blocked[:, w] | blocked[:, w].transpose(-2, -1)
    blocked[:, 0, :half, half:] = True
    blocked[:, 0, half:, :half] = True
    return blocked.float() * -1000.0


class ObjectEncoder(nn.Module):
    """VITA's Object Encoder (VITA Sec. 3.2): layers of self-attention among the frame queries of
    K consecutive frames (a window), then an FFN. In training every layer uses plain windows; at
    test the odd layers use windows shifted by ceil(K / 2) frames, as the official code does
    (`if self.training or layer_idx % 2 == 0`; VITA issue #15). A clip whose length is not a
    multiple of K is zero-padded and the padding masked.

    forward(frame_queries (B, T, Q, C)) -> (B, T, Q, C)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, num_layers: int, window: int):
        super().__init__()
        self.window = window
        self.layers = nn.ModuleList(ObjectEncoderLayer(dim=dim, heads=heads, ffn_dim=ffn_dim)
                                    for _ in range(num_layers))

    def forward(self, frame_queries: torch.Tensor) -> torch.Tensor:
        (B, T, Q, _), K = frame_queries.shape, self.window
        pad = -T % K
        x = F.pad(frame_queries, (0, 0, 0, 0, 0, pad))  # (B, n*K, Q, C)
        valid = (torch.arange(T + pad, device=x.device) < T).expand(B, -1)  # (B, n*K)
        biases = {shifted: repeat(window_bias(valid, K, shifted),
                                  "b n i j -> (b n) (i q) (j r)", q=Q, r=Q)
                  for shifted in (False, True)}  # (B*n, K*Q, K*Q)
        half = math.ceil(K / 2)
        for i, layer in enumerate(self.layers):
            shifted = not self.training and i % 2 == 1
            rolled = torch.roll(x, half, 1) if shifted else x  # (B, n*K, Q, C)
            windows = rearrange(rolled, "b (n k) q c -> (b n) (k q) c", k=K)  # (B*n, K*Q, C)
            windows = layer(windows, biases[shifted].to(windows.dtype))
            rolled = rearrange(windows, "(b n) (k q) c -> b (n k) q c", b=B, q=Q)
            x = torch.roll(rolled, -half, 1) if shifted else rolled
        return x[:, :T]  # (B, T, Q, C)


# ---------------------------------------------------------------------------------- Object Decoder
class ObjectDecoderLayer(nn.Module):
    """Cross-attention from the video queries to all frame queries of the clip, [cross-attention
    to the words], self-attention, FFN; each with a residual and a LayerNorm after it (post-norm),
    positions added to queries and keys only (VITA `CrossAttentionLayer` / `SelfAttentionLayer`,
    xavier-initialised as they; DsHmp's word attention `cross_test` is one of them too)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, word_attention: bool = False):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.word_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if word_attention \
            else None
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4 if word_attention else 3))
        xavier_init_(self)  # official `_reset_parameters`

    def forward(self, queries, query_pos, frames, frame_pos, words=None, word_mask=None):
        # queries, query_pos (B, V, C); frames, frame_pos (B, T*Q, C) the frame queries of the
        # clip and their slot positions; words (B, L, C), word_mask (B, L)
        norms = iter(self.norms)
        attended = self.cross_attn(queries + query_pos, frames + frame_pos, frames)[0]  # (B, V, C)
        queries = next(norms)(queries + attended)
        if self.word_attn is not None:
            if words is None:
                raise ValueError("this decoder was built with word_attention=True: pass words and "
                                 "word_mask")
            cues = self.word_attn(queries + query_pos, words, words, key_padding_mask=~word_mask)[0]
            queries = next(norms)(queries + cues)  # (B, V, C)
        q = queries + query_pos
        queries = next(norms)(queries + self.self_attn(q, q, queries)[0])
        return next(norms)(queries + self.ffn(queries))


class ObjectDecoder(nn.Module):
    """VITA's Object Decoder (VITA Sec. 3.2): V learnable video queries attend to the (encoded)
    frame queries of every frame. The frame queries carry a learnable embedding of their slot as
    key position (`fq_pos`, the same for every frame; no temporal position).

    forward(frame_queries (B, T, Q, C), queries=None, words=None, word_mask=None) -> a list with
    the decoder-normed video queries (B, V, C) of every layer (the last one first used for
    inference, all for deep supervision). `queries` (B, V, C) replaces the learnable query
    features (DsHmp injects the motion cues into them first); the query positions stay."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, num_layers: int, num_queries: int,
                 num_frame_queries: int, word_attention: bool = False):
        super().__init__()
        self.query_feat = nn.Embedding(num_queries, dim)  # the video queries
        self.query_pos = nn.Embedding(num_queries, dim)
        self.slot_pos = nn.Embedding(num_frame_queries, dim)  # official `fq_pos`
        self.layers = nn.ModuleList(ObjectDecoderLayer(dim=dim, heads=heads, ffn_dim=ffn_dim,
                                                       word_attention=word_attention)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)  # official `decoder_norm`

    def forward(self, frame_queries: torch.Tensor, queries=None, words=None,
                word_mask=None) -> list:
        B, T = frame_queries.shape[:2]
        frames = rearrange(frame_queries, "b t q c -> b (t q) c")  # (B, T*Q, C)
        frame_pos = repeat(self.slot_pos.weight, "q c -> b (t q) c", b=B, t=T)  # (B, T*Q, C)
        query_pos = repeat(self.query_pos.weight, "v c -> b v c", b=B)  # (B, V, C)
        if queries is None:
            queries = repeat(self.query_feat.weight, "v c -> b v c", b=B)  # (B, V, C)
        outputs = []
        for layer in self.layers:
            queries = layer(queries, query_pos, frames, frame_pos, words, word_mask)  # (B, V, C)
            outputs.append(self.norm(queries))
        return outputs


# ---------------------------------------------------------------------------------- the model
class VITA(nn.Module):
    """VITA (Sec. 3): Mask2Former on every frame, the Object Encoder over its frame queries, the
    Object Decoder's video queries, and the heads: a class over K + 1 (the last is no object) and
    a mask per video query (its embedding dotted with every frame's mask features, through VITA's
    own 1x1 projection `vita_mask_features`).

    forward(frames (B, T, 3, H, W), H and W multiples of 32) -> dict:
      pred_logits (B, V, K+1), pred_masks (B, V, T, h, w) of the last decoder layer, aux_outputs
      (the earlier layers), video_queries (B, V, C) the decoder-normed video queries of the last
      layer, frame_queries (B, T, Q, C) the encoded frame queries, sim_frame (B, T, Q, C) and
      sim_video (B, V, C) the embeddings of the similarity loss, mask_features (B, T, D, h, w),
      frame_outputs Mask2Former's per-frame outputs ((B*T, Q, K+1) logits, masks, aux_outputs,
      query_embeds). Frame queries come from the last Mask2Former layer (official: the last 3 in
      training, as extra batch entries). VITA's mask projection reads the pixel decoder's raw
      stride-4 map (official `clip_mask_features`, the input of Mask2Former's own 1x1
      `mask_features`; see `pixel_level_with_raw_map`)."""

    def __init__(self, *, pixel_level, decoder, dim: int, heads: int, ffn_dim: int, enc_layers: int,
                 dec_layers: int, window: int, num_video_queries: int, num_classes: int):
        super().__init__()
        self.pixel_level = pixel_level  # Swin + multi-scale deformable pixel decoder (transformers)
        self.decoder = decoder  # Mask2Former's masked-attention decoder, K + 1 classes per frame
        self.input_proj = nn.Linear(dim, dim)  # official input_proj_dec (ENFORCE_INPUT_PROJ)
        self.encoder = ObjectEncoder(dim=dim, heads=heads, ffn_dim=ffn_dim, num_layers=enc_layers,
                                     window=window)
        self.object_decoder = ObjectDecoder(dim=dim, heads=heads, ffn_dim=ffn_dim,
                                            num_layers=dec_layers, num_queries=num_video_queries,
                                            num_frame_queries=decoder.num_queries)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, dim, pixel_level.mask_channels, num_layers=3)
        # official vita_mask_features: Conv2d(CONVS_DIM, MASK_DIM) on the raw pixel-decoder map
        self.mask_proj = c2_xavier_fill_(nn.Conv2d(pixel_level.out_channels,
                                                   pixel_level.mask_channels, 1))
        # sim_embed_frame / _clip
        self.sim_frame, self.sim_video = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, frames):
        B = frames.shape[0]
        frame_out, mask_feats = self.segment_frames(rearrange(frames, "b t c h w -> (b t) c h w"))
        frame_queries = rearrange(frame_out["query_embeds"][-1],
                                  "(b t) q c -> b t q c", b=B)  # (B, T, Q, C)
        mask_feats = rearrange(mask_feats, "(b t) d h w -> b t d h w", b=B)  # (B, T, D, h, w)
        return {**self.decode_video(frame_queries, mask_feats), "frame_outputs": frame_out}

    def segment_frames(self, frames):
        """Mask2Former on every frame, frames (N, 3, H, W) -> its outputs (query_embeds: the frame
        queries of every layer) and VITA's mask features (N, D, h, w)."""
        pixels = pixel_level_with_raw_map(self.pixel_level, frames)
        frame_out = self.decoder(pixels["features"], pixels["pos"], pixels["mask_features"])
        return frame_out, self.mask_proj(pixels["raw_map"])

    def decode_video(self, frame_queries, mask_feats) -> dict:
        """The VITA module on Mask2Former's frame queries (B, T, Q, C) and the mask features
        (B, T, D, h, w): the forward dict without frame_outputs, plus mask_features."""
        frame_queries = self.encoder(self.input_proj(frame_queries))  # (B, T, Q, C)
        video_queries = self.object_decoder(frame_queries)  # layers x (B, V, C)
        preds = [{"pred_logits": self.class_head(v),  # (B, V, K+1)
                  "pred_masks": einsum(self.mask_embed(v), mask_feats,
                                       "b v d, b t d h w -> b v t h w")}
                 for v in video_queries]
        return {**preds[-1], "aux_outputs": preds[:-1], "video_queries": video_queries[-1],
                "frame_queries": frame_queries, "sim_frame": self.sim_frame(frame_queries),
                "sim_video": self.sim_video(video_queries[-1]), "mask_features": mask_feats}


# The sizes of an official VITA configuration, in the names of its config files: Swin (EMBED_DIM,
# DEPTHS, NUM_HEADS, WINDOW_SIZE), pixel decoder (CONVS_DIM, MASK_DIM, its encoder layers, heads and
# FFN width), Mask2Former (HIDDEN_DIM, NHEADS, DIM_FEEDFORWARD, NUM_OBJECT_QUERIES, DEC_LAYERS - 1,
# NUM_CLASSES) and the VITA module (ENC_LAYERS, DEC_LAYERS, NUM_OBJECT_QUERIES, ENC_WINDOW_SIZE).
# DMVS's default (Sec. 4.2): the Swin-L model trained on OVIS (configs/ovis/vita_SWIN_bs8.yaml);
# its YouTube-VIS 2019/2021 models (Table 7) differ in num_classes (40).
SWIN_L_OVIS = dict(embed_dim=192, depths=(2, 2, 18, 2), swin_heads=(6, 12, 24, 48), window=12,
                   conv_dim=256, mask_dim=256,
                   pixel_decoder_layers=6, pixel_decoder_heads=8, pixel_decoder_ffn=1024,
                   hidden=256, heads=8, ffn=2048, frame_queries=200, dec_layers=9, num_classes=25,
                   enc_layers=6, vita_dec_layers=3, video_queries=100, enc_window=6)


def build_vita(c: dict) -> VITA:
    """Our VITA with the sizes `c` of an official configuration (the keys of SWIN_L_OVIS;
    pixel_decoder_ffn, ffn and enc_window default to 1024, 2048 and 6), random weights
    (load_official_vita fills them)."""
    config = tiny_mask2former_config(
        embed_dim=c["embed_dim"], depths=c["depths"], swin_heads=c["swin_heads"],
        window_size=c["window"], hidden_dim=c["conv_dim"], encoder_layers=c["pixel_decoder_layers"],
        encoder_ffn_dim=c.get("pixel_decoder_ffn", 1024),
        num_heads=c["pixel_decoder_heads"], mask_feature_size=c["mask_dim"])
    ffn = c.get("ffn", 2048)
    decoder = MaskedAttentionDecoder(hidden_dim=c["hidden"], num_queries=c["frame_queries"],
                                     num_layers=c["dec_layers"], num_heads=c["heads"], ffn_dim=ffn,
                                     num_classes=c["num_classes"], mask_dim=c["mask_dim"])
    return VITA(pixel_level=PixelLevel(config), decoder=decoder, dim=c["hidden"], heads=c["heads"],
                ffn_dim=ffn, enc_layers=c["enc_layers"], dec_layers=c["vita_dec_layers"],
                window=c.get("enc_window", 6), num_video_queries=c["video_queries"],
                num_classes=c["num_classes"])


def pixel_level_with_raw_map(pixel_level, pixel_values, encode=None) -> dict:
    """`pixel_level(pixel_values, encode)` (common.backbones.PixelLevel) plus `raw_map`
    (B, C, H/4, W/4): the pixel decoder's last FPN output before Mask2Former's 1x1 projection
    (official msdeformattn.py `out[-1]`, VITA's `clip_mask_features`), so that `mask_features` is
    `pixel_decoder.mask_projection(raw_map)`. transformers returns only the projected map; the
    input of `mask_projection` is caught with a forward pre-hook that lives for this call only."""
    caught = []
    hook = pixel_level.pixel_decoder.mask_projection.register_forward_pre_hook(
        lambda module, args: caught.append(args[0]))
    try:
        pixels = pixel_level(pixel_values, encode=encode)
    finally:
        hook.remove()
    return {**pixels, "raw_map": caught[0]}


def similarity_loss(embeds, object_ids, clip_ids):
    """VITA's similarity loss (vita_criterion.py `loss_fg_sim`): embeds (N, C) of the frame queries
    and the video queries matched to a target, object_ids (N,) of their targets, clip_ids (N,) of
    their clips. Binary cross-entropy of every pair's dot product against "same object", averaged
    over the pairs of the same clip (itself included)."""
    logits = embeds @ embeds.T  # (N, N)
    same_object = (object_ids[:, None] == object_ids[None]).float()  # (N, N)
    same_clip = (clip_ids[:, None] == clip_ids[None]).float()  # (N, N)
    loss = F.binary_cross_entropy_with_logits(logits, same_object, reduction="none")
    return (loss * same_clip).sum() / (same_clip.sum() + 1e-6)


# ---------------------------------------------------------------------------------- VITA's losses
# The weights of VITA's objective (official vita_model.py `from_config`: weight_dict and
# vita_weight_dict). Class, mask and dice are MASK_FORMER.CLASS_WEIGHT 2.0, MASK_WEIGHT 5.0 and
# DICE_WEIGHT 5.0 of every VITA config (e.g. configs/ovis/vita_SWIN_bs8.yaml), used for the
# frame-level and the video-level terms alike and as the costs of both Hungarian matchers;
# the similarity weight is VITA.SIM_WEIGHT 0.5 (vita/config.py, repeated in the configs).
VITA_LOSS_WEIGHTS = {
    "frame_ce": 2.0, "frame_bce": 5.0, "frame_dice": 5.0,  # MASK_FORMER.CLASS/MASK/DICE_WEIGHT
    "video_ce": 2.0, "video_bce": 5.0, "video_dice": 5.0,  # the same three (vita_weight_dict)
    "sim": 0.5,  # VITA.SIM_WEIGHT
}


def vita_losses(outputs, targets, *, w_cls=2.0, w_bce=5.0, w_dice=5.0, frame_no_object_weight=0.1,
                video_no_object_weight=0.1, num_points=12544) -> dict:
    """VITA's training objective, the paper's frame-level, video-level and similarity losses (as
    official vita_model.py `train_model` with Mask2Former's criterion.py and vita_criterion.py),
    as unweighted terms; the weighted sum is
    `sum(VITA_LOSS_WEIGHTS[k] * v for k, v in terms.items())`.

    outputs: `VITA.forward`'s dict. targets: B dicts with "masks" (N, T, H, W) bool at the padded
    frame size and "labels" (N,) long in [0, K) (`YouTubeVIS` / `collate_vis`; other keys unused).
    Objects without a pixel in the clip are dropped (official `prepare_targets`).
    Returns {"frame_ce", "frame_bce", "frame_dice", "video_ce", "video_bce", "video_dice", "sim"}:
      frame_*  Mask2Former's set loss on every frame's Q frame queries against the objects visible
               in that frame, summed over the frame decoder's predictions (deep supervision);
      video_*  the set loss of the V video queries against the mask tubes, matched over the whole
               clip, summed over the Object Decoder's layers;
      sim      `similarity_loss` on the frame queries matched in the frame decoder's last prediction
               and the video queries matched in the last Object Decoder layer (official: last layer
               only), "same object" meaning the same target of the same clip.
    Both set losses are common.matching.set_losses: Hungarian matching with the costs w_cls,
    w_bce, w_dice, CE over K + 1 classes with the no-object class weighted (MASK_FORMER and
    VITA.NO_OBJECT_WEIGHT 0.1), BCE and dice on `num_points` importance-sampled points per mask
    and frame (MASK_FORMER.TRAIN_NUM_POINTS 112 * 112; None: whole masks), each divided by the
    number of target masks averaged over the processes, at least 1 (official: frame targets for
    the frame level, clip objects x L for the video level, with L = 1 frame-query layer here)."""
    targets = visible_objects(targets)
    per_frame = frame_targets(targets)  # B*T dicts in (b t) order, as the frame outputs
    device = outputs["pred_masks"].device
    costs = dict(w_cls=w_cls, w_bce=w_bce, w_dice=w_dice, num_points=num_points)
    frame_terms, frame_indices = set_losses(outputs["frame_outputs"], per_frame, **costs,
                                            no_object_weight=frame_no_object_weight,
                                            num_masks=num_masks(per_frame, device))
    video_terms, video_indices = set_losses(outputs, targets, **costs,
                                            no_object_weight=video_no_object_weight,
                                            num_masks=num_masks(targets, device))
    # similarity loss: the matched frame queries, then the matched video queries (loss_fg_sim)
    sim_frame = rearrange(outputs["sim_frame"], "b t q c -> (b t) q c")  # (B*T, Q, C)
    sim_video, T = outputs["sim_video"], outputs["sim_frame"].shape[1]  # (B, V, C)
    frame_idx, frame_query = matched_pred_index(frame_indices)  # (M_f,), (M_f,); frame_idx in (b t)
    video_idx, video_query = matched_pred_index(video_indices)  # (M_v,), (M_v,)
    device = sim_video.device
    embeds = torch.cat([sim_frame[frame_idx.to(device), frame_query.to(device)],
                        sim_video[video_idx.to(device), video_query.to(device)]])  # (M_f + M_v, C)
    objects = torch.cat([f["objects"].cpu()[tgt] for f, (_, tgt) in zip(per_frame, frame_indices)]
                        + [tgt for _, tgt in video_indices])  # (M_f + M_v,) index in the clip
    clips = torch.cat([torch.div(frame_idx, T, rounding_mode="floor"), video_idx])  # (M_f + M_v,)
    sim = similarity_loss(embeds, objects.to(device), clips.to(device))
    return {**{f"frame_{k}": v for k, v in frame_terms.items()},
            **{f"video_{k}": v for k, v in video_terms.items()}, "sim": sim}


# ----------------------------------------------------------------------------------
# official checkpoints
# The official model-zoo checkpoints (github.com/sukjunhwang/VITA, README "Model Zoo") are
# detectron2 state dicts of the whole model: `backbone.*` (D2SwinTransformer,
# mask2former/modeling/backbone/swin.py),
# `sem_seg_head.pixel_decoder.*` (MSDeformAttnPixelDecoder, .../pixel_decoder/msdeformattn.py),
# `sem_seg_head.predictor.*` (VitaMultiScaleMaskedTransformerDecoder,
# vita/modeling/transformer_decoder/vita_mask2former_transformer_decoder.py) and `vita_module.*`
# (vita/modeling/transformer_decoder/vita.py). `official_vita_key_map` says where each lands in
# `VITA`.

# Official keys that are read but not loaded: the no-object class weights of the two losses
# (`SetCriterion.empty_weight` buffers; our losses take the no-object weight as an argument), and
# detectron2's input normalisation (non-persistent buffers in VITA's code, skipped should a file
# carry them; our data pipeline normalises).
OFFICIAL_KEYS_NOT_LOADED = ("criterion.empty_weight", "vita_criterion.empty_weight",
                            "pixel_mean", "pixel_std")
# Our keys no official key fills: the final LayerNorm of transformers' SwinModel, which SwinBackbone
# never applies (its outputs go through the per-stage norms, the official `norm0`..`norm3`); frozen.
OUR_KEYS_NOT_LOADED = tuple(f"pixel_level.backbone.swin.layernorm.{p}" for p in ("weight", "bias"))


def _attention(theirs: str, ours: str):
    """An nn.MultiheadAttention on both sides: the same four tensors (in_proj packs q, k, v along
    dim 0 in both)."""
    for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        yield f"{theirs}.{p}", [f"{ours}.{p}"]


def _pixel_decoder_keys(pixel_decoder):
    """Official MSDeformAttnPixelDecoder -> transformers' Mask2FormerPixelDecoder. Both order the
    input projections and level embeddings coarse to fine (res5, res4, res3); detectron2's Conv2d
    keeps its GroupNorm as a `.norm` child, transformers an nn.Sequential(conv, norm)."""
    for level in range(len(pixel_decoder.input_projections)):
        for j in (0, 1):  # nn.Sequential(Conv2d, GroupNorm) on both sides
            yield from param_keys(f"input_proj.{level}.{j}", f"input_projections.{level}.{j}")
    yield "transformer.level_embed", ["level_embed"]
    for i in range(len(pixel_decoder.encoder.layers)):
        theirs, ours = f"transformer.encoder.layers.{i}.", f"encoder.layers.{i}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            yield from param_keys(theirs + f"self_attn.{name}", ours + f"self_attn.{name}")
        yield from param_keys(theirs + "norm1", ours + "self_attn_layer_norm")
        yield from param_keys(theirs + "linear1", ours + "fc1")
        yield from param_keys(theirs + "linear2", ours + "fc2")
        yield from param_keys(theirs + "norm2", ours + "final_layer_norm")
    yield from param_keys("mask_features", "mask_projection")
    # the FPN convs on res2, bias-free (norm "GN")
    for k in range(1, pixel_decoder.num_fpn_levels + 1):
        for name in (f"adapter_{k}", f"layer_{k}"):
            yield f"{name}.weight", [f"{name}.0.weight"]
            yield from param_keys(f"{name}.norm", f"{name}.1")


def _decoder_layer_keys(i: int, ours: str, norms: tuple, *, second_linear: str):
    """Layer i of an official masked-attention decoder (both of VITA's decoders keep the layers'
    parts in three lists: cross-attention, self-attention, FFN, each with its LayerNorm) -> our
    layer `ours`, whose three LayerNorms are named `norms` and whose FFN's second Linear is
    `second_linear` (its index in our nn.Sequential)."""
    cross_norm, self_norm, ffn_norm = norms
    cross, self_, ffn = (f"transformer_{part}_layers.{i}." for part in ("cross_attention",
                                                                          "self_attention", "ffn"))
    yield from _attention(cross + "multihead_attn", ours + "cross_attn")
    yield from param_keys(cross + "norm", ours + cross_norm)
    yield from _attention(self_ + "self_attn", ours + "self_attn")
    yield from param_keys(self_ + "norm", ours + self_norm)
    yield from param_keys(ffn + "linear1", ours + "ffn.0")
    yield from param_keys(ffn + "linear2", ours + second_linear)
    yield from param_keys(ffn + "norm", ours + ffn_norm)


def _frame_decoder_keys(decoder):
    """Official VitaMultiScaleMaskedTransformerDecoder -> our MaskedAttentionDecoder
    (common.mask2former): masked cross-attention, self-attention and FFN layers, heads."""
    yield "query_feat.weight", ["query_feat.weight"]
    yield "query_embed.weight", ["query_pos.weight"]
    yield "level_embed.weight", ["level_embed.weight"]
    for level, proj in enumerate(decoder.input_proj):
        if isinstance(proj, nn.Conv2d):  # only where the features' width differs from hidden_dim
            yield from param_keys(f"input_proj.{level}", f"input_proj.{level}")
    for i in range(len(decoder.layers)):
        yield from _decoder_layer_keys(i, f"layers.{i}.", ("cross_norm", "self_norm", "ffn_norm"),
                                       second_linear="ffn.3")
    yield from param_keys("decoder_norm", "decoder_norm")
    yield from param_keys("class_embed", "class_head")
    for j in range(len(decoder.mask_embed.layers)):
        yield from param_keys(f"mask_embed.layers.{j}", f"mask_embed.layers.{j}")


def _vita_module_keys(model):
    """Official `VITA` (vita_module) -> our input_proj, ObjectEncoder, ObjectDecoder and heads."""
    # a Linear: ENFORCE_INPUT_PROJ is True by default
    yield from param_keys("input_proj_dec", "input_proj")
    for i in range(len(model.encoder.layers)):
        ours = f"encoder.layers.{i}."
        yield from _attention(f"enc_self_attn.{i}.self_attn", ours + "self_attn")
        yield from param_keys(f"enc_self_attn.{i}.norm", ours + "self_norm")
        yield from param_keys(f"enc_ffn.{i}.linear1", ours + "ffn.0")
        yield from param_keys(f"enc_ffn.{i}.linear2", ours + "ffn.2")
        yield from param_keys(f"enc_ffn.{i}.norm", ours + "ffn_norm")
    for i in range(len(model.object_decoder.layers)):
        # norms.0, .1, .2 follow cross-attention, self-attention, FFN
        yield from _decoder_layer_keys(i, f"object_decoder.layers.{i}.",
                                       ("norms.0", "norms.1", "norms.2"), second_linear="ffn.2")
    yield "query_feat.weight", ["object_decoder.query_feat.weight"]
    yield "query_embed.weight", ["object_decoder.query_pos.weight"]
    yield "fq_pos.weight", ["object_decoder.slot_pos.weight"]
    yield from param_keys("decoder_norm", "object_decoder.norm")
    yield from param_keys("class_embed", "class_head")
    for j in range(len(model.mask_embed.layers)):
        yield from param_keys(f"mask_embed.layers.{j}", f"mask_embed.layers.{j}")
    yield from param_keys("vita_mask_features", "mask_proj")
    yield from param_keys("sim_embed_frame", "sim_frame")
    yield from param_keys("sim_embed_clip", "sim_video")


def official_vita_key_map(model: VITA) -> dict:
    """Official checkpoint key -> the key(s) of `model.state_dict()` it goes to, for this model's
    sizes (numbers of Swin blocks, decoder layers, ...). Several keys: the official tensor is cut
    into that many equal parts along dim 0, in order (Swin's fused qkv -> q, k, v). A key that is
    a non-persistent buffer of ours (Swin's relative_position_index) is checked, not loaded."""
    backbone, pixel_decoder = model.pixel_level.backbone, model.pixel_level.pixel_decoder
    sections = [  # (official prefix, our prefix, the pairs below these prefixes)
        ("backbone.", "pixel_level.backbone.", official_swin_keys(backbone)),
        ("sem_seg_head.pixel_decoder.", "pixel_level.pixel_decoder.",
         _pixel_decoder_keys(pixel_decoder)),
        ("sem_seg_head.predictor.", "decoder.", _frame_decoder_keys(model.decoder)),
        ("vita_module.", "", _vita_module_keys(model)),
    ]
    key_map = {}
    for their_prefix, our_prefix, pairs in sections:
        for theirs, ours in pairs:
            key_map[their_prefix + theirs] = [our_prefix + k for k in ours]
    return key_map


def convert_official_vita(model: VITA, official_state: dict) -> dict:
    """An official VITA state dict -> a state dict for `model` (its keys, except
    OUR_KEYS_NOT_LOADED).

    Raises ValueError, listing every problem at once, when an official key has no place in the
    model (besides OFFICIAL_KEYS_NOT_LOADED), when a key of ours would receive nothing, when a shape
    differs (e.g. another number of classes or frame queries than the model was built with), or
    when a Swin relative_position_index differs from ours (another window size)."""
    key_map = official_vita_key_map(model)
    own = model.state_dict()
    buffers = dict(model.named_buffers())
    targets = [k for ours in key_map.values() for k in ours]
    if len(set(targets)) != len(targets) or any(k not in own and k not in buffers for k in targets):
        # our bug, not the file's
        raise RuntimeError("official_vita_key_map is out of date for this model")
    # keys that only go to non-persistent buffers of ours are checked when present, never required
    checked_only = {theirs for theirs, ours in key_map.items() if not any(k in own for k in ours)}
    unused = sorted(k for k in official_state if k not in key_map
                    and k not in OFFICIAL_KEYS_NOT_LOADED)
    absent = {theirs: ours for theirs, ours in key_map.items()
              if theirs not in official_state and theirs not in checked_only}
    unfilled = sorted(set(own) - set(targets) - set(OUR_KEYS_NOT_LOADED))
    problems = []
    if unused:
        problems.append(f"official keys with no place in this model ({len(unused)}): {unused}")
    if absent or unfilled:
        receive_nothing = [f"{o} <- {t} (absent)" for t, ours in absent.items() for o in ours] + \
                          [f"{o} (not in official_vita_key_map)" for o in unfilled]
        problems.append(f"keys of ours that would receive nothing ({len(receive_nothing)}): "
                        f"{receive_nothing}")
    converted = {}
    for theirs, ours in key_map.items():
        if theirs not in official_state:
            continue
        value = torch.as_tensor(official_state[theirs])
        if value.shape[0] % len(ours):
            problems.append(f"{theirs} {tuple(value.shape)} cannot be cut into {len(ours)} parts "
                            f"along dim 0")
            continue
        for name, part in zip(ours, value.chunk(len(ours), dim=0)):
            if name not in own:  # a non-persistent buffer of ours: (w*w, w*w) official, flat here
                if not torch.equal(part.flatten().to(buffers[name]), buffers[name].flatten()):
                    problems.append(f"{theirs} differs from our {name} (another Swin window size?)")
            elif part.shape != own[name].shape:
                problems.append(f"{name} {tuple(own[name].shape)} <- {theirs} {tuple(part.shape)}")
            else:
                converted[name] = part
    if problems:
        raise ValueError("the official VITA checkpoint does not match this model:\n  "
                         + "\n  ".join(problems))
    return converted


def load_official_vita(model: VITA, official_state: dict) -> list:
    """Load an official VITA state dict into `model` (see convert_official_vita; nothing is loaded
    when anything does not match). Returns our keys left at their initialisation
    (OUR_KEYS_NOT_LOADED)."""
    converted = convert_official_vita(model, official_state)
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(OUR_KEYS_NOT_LOADED):
        raise RuntimeError(f"load_official_vita: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    return list(result.missing_keys)


def read_official_checkpoint(path) -> dict:
    """The state dict in an official VITA checkpoint file: a torch-saved `.pth` (the model zoo's
    format: {"model": state_dict, ...} as detectron2's Checkpointer writes it, or a bare state dict)
    or a detectron2 `.pkl` (pickled {"model": {key: numpy array}}; unpickling runs code from the
    file, so open only files you trust). Raises FileNotFoundError when there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VITA checkpoint not found: {path!r}. Download an official checkpoint from the model "
            f"zoo of github.com/sukjunhwang/VITA (README, Google Drive links), e.g. the Swin-L "
            f"OVIS model, "
            f"and pass its path.")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path!r} holds objects other than tensors and plain containers, which torch.load "
                f"(weights_only=True) does not unpickle; unpickling arbitrary objects can run "
                f"code. Re-save only its 'model' state dict (tensors) from a copy you trust, then "
                f"pass that file.") from err
    state = data.get("model", data)
    return {k: torch.as_tensor(v) for k, v in state.items()}


def load_official_vita_checkpoint(model: VITA, path) -> list:
    """`load_official_vita(model, read_official_checkpoint(path))`."""
    return load_official_vita(model, read_official_checkpoint(path))
