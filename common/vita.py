"""VITA: Video Instance Segmentation via Object Token Association (Heo et al., NeurIPS 2022;
official code github.com/sukjunhwang/VITA @ 59c24ad, vita/modeling/transformer_decoder/vita.py).

VITA runs Mask2Former on every frame and turns its frame queries (object tokens) into video
queries, one per object of the whole clip: the Object Encoder lets the frame queries of nearby
frames exchange information, the Object Decoder gathers them into video queries, and a video
query's mask in frame t is its mask embedding dotted with frame t's mask features.

`ObjectDecoder` is VITA's Object Decoder. DsHmp's Motion Decoder is this decoder with a word
cross-attention in every layer (word_attention=True, as the official DsHmp `cross_test`).
"""
import torch
from einops import rearrange, repeat
from torch import nn

# Shapes: B clips, T frames, Q frame queries per frame, V video queries, C channels, L words.


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
