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
Mask2Former and the heads; `similarity_loss` is VITA's third loss (the frame- and video-level set
losses are common.matching.set_losses). Still to come with dmvs.py: the converter of the official
checkpoints and the training stage.
"""
import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from common.mask2former import MLP

# Shapes: B clips, T frames, Q frame queries per frame, V video queries, C channels, L words,
# n windows of K frames.


# ---------------------------------------------------------------------------------- Object Encoder
class ObjectEncoderLayer(nn.Module):
    """Self-attention among the frame queries of a window of frames, then an FFN; post-norm,
    no positions (VITA `SelfAttentionLayer` + `FFNLayer`, dropout 0)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

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
        biases = {shifted: repeat(window_bias(valid, K, shifted), "b n i j -> (b n) (i q) (j r)", q=Q, r=Q)
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
    positions added to queries and keys only (VITA `CrossAttentionLayer` / `SelfAttentionLayer`)."""

    def __init__(self, *, dim: int, heads: int, ffn_dim: int, word_attention: bool = False):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.word_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if word_attention else None
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4 if word_attention else 3))

    def forward(self, queries, query_pos, memory, memory_pos, words=None, word_mask=None):
        # queries, query_pos (B, V, C); memory, memory_pos (B, T*Q, C); words (B, L, C), word_mask (B, L)
        norms = iter(self.norms)
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory)[0]  # (B, V, C)
        queries = next(norms)(queries + attended)
        if self.word_attn is not None:
            if words is None:
                raise ValueError("this decoder was built with word_attention=True: pass words and word_mask")
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

    def forward(self, frame_queries: torch.Tensor, queries=None, words=None, word_mask=None) -> list:
        B, T = frame_queries.shape[:2]
        memory = rearrange(frame_queries, "b t q c -> b (t q) c")  # (B, T*Q, C)
        memory_pos = repeat(self.slot_pos.weight, "q c -> b (t q) c", b=B, t=T)  # (B, T*Q, C)
        query_pos = repeat(self.query_pos.weight, "v c -> b v c", b=B)  # (B, V, C)
        if queries is None:
            queries = repeat(self.query_feat.weight, "v c -> b v c", b=B)  # (B, V, C)
        outputs = []
        for layer in self.layers:
            queries = layer(queries, query_pos, memory, memory_pos, words, word_mask)  # (B, V, C)
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
      sim_video (B, V, C) the embeddings of the similarity loss, frame_outputs Mask2Former's
      per-frame outputs ((B*T, Q, K+1) logits, masks, aux_outputs). Frame queries come from the
      last Mask2Former layer (official: the last 3 in training, as extra batch entries). The mask
      projection reads Mask2Former's projected mask features; official VITA reads the pixel
      decoder's raw stride-4 map (transformers does not return it), so official weights need it."""

    def __init__(self, *, pixel_level, decoder, dim: int, heads: int, ffn_dim: int, enc_layers: int,
                 dec_layers: int, window: int, num_video_queries: int, num_classes: int):
        super().__init__()
        self.pixel_level = pixel_level  # Swin + multi-scale deformable pixel decoder (transformers)
        self.decoder = decoder  # Mask2Former's masked-attention decoder, K + 1 classes per frame
        self.input_proj = nn.Linear(dim, dim)  # official input_proj_dec (ENFORCE_INPUT_PROJ)
        self.encoder = ObjectEncoder(dim=dim, heads=heads, ffn_dim=ffn_dim, num_layers=enc_layers, window=window)
        self.object_decoder = ObjectDecoder(dim=dim, heads=heads, ffn_dim=ffn_dim, num_layers=dec_layers,
                                            num_queries=num_video_queries, num_frame_queries=decoder.num_queries)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, dim, dim, num_layers=3)
        self.mask_proj = nn.Conv2d(pixel_level.mask_channels, dim, 1)  # official vita_mask_features
        self.sim_frame, self.sim_video = nn.Linear(dim, dim), nn.Linear(dim, dim)  # sim_embed_frame / _clip

    def forward(self, frames):
        B = frames.shape[0]
        pixels = self.pixel_level(rearrange(frames, "b t c h w -> (b t) c h w"))
        frame_out = self.decoder(pixels["features"], pixels["pos"], pixels["mask_features"])
        frame_queries = rearrange(frame_out["query_embeds"][-1], "(b t) q c -> b t q c", b=B)  # (B, T, Q, C)
        frame_queries = self.encoder(self.input_proj(frame_queries))  # (B, T, Q, C)
        video_queries = self.object_decoder(frame_queries)  # layers x (B, V, C)
        mask_feats = rearrange(self.mask_proj(pixels["mask_features"]), "(b t) c h w -> b t c h w", b=B)
        preds = [{"pred_logits": self.class_head(v),  # (B, V, K+1)
                  "pred_masks": einsum(self.mask_embed(v), mask_feats, "b v c, b t c h w -> b v t h w")}
                 for v in video_queries]
        return {**preds[-1], "aux_outputs": preds[:-1], "video_queries": video_queries[-1],
                "frame_queries": frame_queries, "sim_frame": self.sim_frame(frame_queries),
                "sim_video": self.sim_video(video_queries[-1]), "frame_outputs": frame_out}


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
