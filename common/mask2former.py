"""Mask2Former's masked-attention transformer decoder, written out to be read, plus loading of its
weights from a transformers Mask2Former checkpoint.

Paper: Cheng, Misra, Schwing, Kirillov, Girdhar, "Masked-attention Mask Transformer for Universal
Image Segmentation", CVPR 2022 (arXiv:2112.01527), Sec. 3.2.

The numbers equal those of transformers' `Mask2FormerTransformerModule` followed by the
`class_predictor` of `Mask2FormerForUniversalSegmentation` (post-norm decoder, the only variant the
paper and the released checkpoints use); tests/test_mask2former.py checks the masks, class logits
and
normed queries of every layer against it. Written differently from transformers, same numbers:
batch-first tensors, `nn.MultiheadAttention` for the self-attention as well, and query features
that the caller may pass in (DsHmp and DMVS put text into them before the first layer). One
behavioural difference, in training with dropout > 0 only: transformers also skips whole layers at
random with probability `dropout` (its layerdrop is tied to dropout); this decoder never does. The
paper's setting is dropout 0 (Sec. 3.2.3), where the two agree.

The pixel-level module (Swin backbone + deformable-attention pixel decoder) that feeds this decoder
is transformers' own: `common.backbones.PixelLevel`.
"""
import math

import einops
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

# Shapes: B images, Q queries, C channels (hidden_dim), K classes (+1 = no object), L decoder
# layers, H_l W_l the feature map of one level (1/32, 1/16 or 1/8 of the input), h w the mask
# features (1/4 of the input), D mask_dim.


def xavier_init_(module: nn.Module) -> nn.Module:
    """The `_reset_parameters` of every attention and FFN layer of the official Mask2Former, VITA
    and DsHmp decoders (SelfAttentionLayer, CrossAttentionLayer, FFNLayer): xavier_uniform on each
    parameter of more than one dimension; biases and norms keep PyTorch's initialisation."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return module


def c2_xavier_fill_(layer: nn.Module) -> nn.Module:
    """detectron2's `c2_xavier_fill` (fvcore weight_init), which the official Mask2Former and VITA
    code apply to their 1x1 projections: kaiming_uniform_ with a = 1 on the weight, zero bias."""
    nn.init.kaiming_uniform_(layer.weight, a=1)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """Linear layers with ReLU between them (no activation after the last one)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionLayer(nn.Module):
    """One decoder layer (Sec. 3.2): masked cross-attention, then self-attention, then FFN, each
    followed by a residual and a LayerNorm (post-norm). Cross-attention comes first because the
    first queries are image-independent and cannot profit from self-attention (Sec. 3.2.3).

    word_attention=True adds a cross-attention from the queries to word features after the masked
    cross-attention, as referring Mask2Formers do (official DsHmp and MeViS/LMPM decoders,
    `cross_test`); it is not part of Mask2Former and has no transformers weights. With
    words_beside=True the word cross-attention runs beside the masked one instead, from the same
    queries, and the two are summed before the one cross_norm (official VATEX decoder)."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 word_attention: bool = False, words_beside: bool = False):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.words_beside = words_beside
        if word_attention or words_beside:
            self.word_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout,
                                                   batch_first=True)
        if word_attention and not words_beside:
            self.word_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, query_pos, pixels, pixel_pos, attn_mask, words=None, word_mask=None,
                word_pos=None):
        """queries, query_pos (B, Q, C); pixels, pixel_pos (B, H_l*W_l, C); attn_mask
        (B*heads, Q, H_l*W_l) bool, True where a query may not look (None: everywhere); words
        (B, L, C), word_mask (B, L) True on the words to attend and optional word_pos (B, L, C)
        added to the word keys, for a layer with word attention. Returns the queries (B, Q, C)."""
        if hasattr(self, "word_attn") and words is None:
            raise ValueError("this layer was built with word attention: pass words and word_mask")
        word_keys = words if word_pos is None else words + word_pos  # (B, L, C)
        # Eq. (2): X_l = softmax(M_{l-1} + Q_l K_l^T) V_l + X_{l-1}; positions go into queries and
        # keys only
        attended = self.dropout(self.cross_attn(
            queries + query_pos, pixels + pixel_pos, pixels, attn_mask=attn_mask, need_weights=False
        )[0])  # (B, Q, C)
        if self.words_beside:  # from the same queries, summed with the visual attention
            attended = attended + self.dropout(self.word_attn(
                queries + query_pos, word_keys, words, key_padding_mask=~word_mask,
                need_weights=False)[0])  # (B, Q, C)
        queries = self.cross_norm(queries + attended)
        if hasattr(self, "word_norm"):
            attended = self.word_attn(queries + query_pos, word_keys, words,
                                      key_padding_mask=~word_mask,
                                      need_weights=False)[0]  # (B, Q, C)
            queries = self.word_norm(queries + self.dropout(attended))
        q = queries + query_pos  # (B, Q, C)
        attended = self.self_attn(q, q, queries, need_weights=False)[0]  # (B, Q, C)
        queries = self.self_norm(queries + self.dropout(attended))
        return self.ffn_norm(queries + self.dropout(self.ffn(queries)))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder with its class and mask heads (Sec. 3.2).

    forward(features, pos, mask_features, queries=None):
      features: list of num_levels maps (B, in_channels, H_l, W_l), in the order the layers visit
        them: layer i reads level i % num_levels (round robin, Sec. 3.2.2). `PixelLevel` returns
        them in that order: 1/32, 1/16, 1/8.
      pos: list of matching sine position embeddings (B, hidden_dim, H_l, W_l).
      mask_features: (B, mask_dim, h, w), the per-pixel embeddings at 1/4 resolution.
      words, word_mask: (B, L, hidden_dim) word features and (B, L) bool, True on the words to
        attend, for a decoder built with word_attention=True (see MaskedAttentionLayer).
      queries: optional (B, Q, hidden_dim) query features replacing the learnable ones (X_0); the
        learnable query positions are still added. A decoder built with query_features=False has
        no learnable X_0: the caller always passes them.
      words_beside: the word cross-attention beside the masked one (see MaskedAttentionLayer).
    Returns a dict:
      pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w) of the last layer;
      aux_outputs: L dicts with the same keys for the earlier predictions (the one made from the
        input queries, then layers 1..L-1);
      query_embeds: L+1 tensors (B, Q, C), the decoder-normed queries each prediction was made from.
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_layers: int = 9,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_classes: int = 80,
        mask_dim: int = 256,
        num_levels: int = 3,
        dropout: float = 0.0,  # Sec. 3.2.3 removes dropout
        in_channels=None,
        input_proj: bool = False,
        word_attention: bool = False,
        words_beside: bool = False,
        query_features: bool = True,
    ):
        super().__init__()
        in_channels = hidden_dim if in_channels is None else in_channels
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        # Learnable query features, supervised before the first layer (Sec. 3.2.3), and query
        # positions.
        if query_features:
            self.query_feat = nn.Embedding(num_queries, hidden_dim)  # X_0 in the paper
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        # learnable scale-level embedding (Sec. 3.2.2)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        # A 1x1 conv only where the feature channels differ from hidden_dim (or when asked), as
        # transformers and the official code.
        project = input_proj or in_channels != hidden_dim
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if project else nn.Identity()
            for _ in range(num_levels)
        )
        self.layers = nn.ModuleList(
            MaskedAttentionLayer(dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim,
                                 dropout=dropout, word_attention=word_attention,
                                 words_beside=words_beside)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, num_layers=3)
        self._reset_parameters()

    def _reset_parameters(self):
        # official: mask2former_transformer_decoder.py, every attention/FFN layer
        # `_reset_parameters`
        # and `weight_init.c2_xavier_fill` on each input projection
        for layer in self.layers:
            xavier_init_(layer)
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                c2_xavier_fill_(proj)

    def predict(self, queries, mask_features, attn_size):
        """The prediction heads on decoder_norm(queries), queries (B, Q, C). Returns class logits
        (B, Q, K+1), mask logits (B, Q, h, w) (mask embedding . per-pixel embedding), the normed
        queries (B, Q, C), and the next layer's attention mask (B*heads, Q, H_l*W_l) at `attn_size`
        = that layer's (H_l, W_l), True = not attended."""
        embeds = self.decoder_norm(queries)  # (B, Q, C)
        logits = self.class_head(embeds)  # (B, Q, K+1)
        mask_embed = self.mask_embed(embeds)  # (B, Q, D)
        # (B, Q, h, w)
        masks = einops.einsum(mask_embed, mask_features, "b q d, b d h w -> b q h w")
        resized = F.interpolate(masks, size=tuple(attn_size), mode="bilinear",
                                align_corners=False)  # (B, Q, H_l, W_l)
        # Eq. (3): M_{l-1} = 0 on the foreground (prob >= 0.5), -inf elsewhere
        blocked = resized.sigmoid() < 0.5
        blocked = rearrange(blocked.detach(), "b q h w -> b q (h w)")  # (B, Q, H_l*W_l)
        # A query whose mask is empty everywhere attends everywhere: a fully blocked softmax row
        # would be NaN (official: mask2former_transformer_decoder.py `forward_prediction_heads`; not
        # in the paper).
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        attn_mask = repeat(blocked, "b q n -> (b heads) q n",
                           heads=self.num_heads)  # (B*heads, Q, H_l*W_l)
        return logits, masks, embeds, attn_mask

    def flatten_levels(self, features, pos):
        """The keys and values of each level: (B, H_l*W_l, C) features (input projection + level
        embedding) and positions, and the level sizes (H_l, W_l)."""
        if len(features) != self.num_levels or len(pos) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} feature maps and position embeddings, got "
                f"{len(features)} and {len(pos)}"
            )
        pixel_levels, pixel_pos, sizes = [], [], []
        for level, (feature, level_pos) in enumerate(zip(features, pos)):
            if level_pos.shape[1] != self.hidden_dim:
                raise ValueError(
                    f"pos[{level}] has {level_pos.shape[1]} channels, the decoder needs "
                    f"hidden_dim={self.hidden_dim}"
                )
            sizes.append(feature.shape[-2:])
            pixels = self.input_proj[level](feature)  # (B, C, H_l, W_l)
            pixels = rearrange(pixels, "b c h w -> b (h w) c")  # (B, H_l*W_l, C)
            pixel_levels.append(pixels + self.level_embed.weight[level])
            pixel_pos.append(rearrange(level_pos, "b c h w -> b (h w) c"))  # (B, H_l*W_l, C)
        return pixel_levels, pixel_pos, sizes

    def forward(self, features, pos, mask_features, queries=None, words=None, word_mask=None):
        batch = mask_features.shape[0]
        pixel_levels, pixel_pos, sizes = self.flatten_levels(features, pos)
        query_pos = repeat(self.query_pos.weight, "q c -> b q c", b=batch)  # (B, Q, C)
        if queries is None:
            if not hasattr(self, "query_feat"):
                raise ValueError("this decoder has no learnable query features: pass queries")
            queries = repeat(self.query_feat.weight, "q c -> b q c", b=batch)  # (B, Q, C)
        elif queries.shape != query_pos.shape:
            raise ValueError(f"queries must have shape {tuple(query_pos.shape)} (B, Q, C), got "
                             f"{tuple(queries.shape)}")

        logits, masks, embeds, attn_mask = self.predict(queries, mask_features, sizes[0])
        predictions, query_embeds = [{"pred_logits": logits, "pred_masks": masks}], [embeds]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels  # round robin over the scales (Sec. 3.2.2)
            queries = layer(queries, query_pos, pixel_levels[level], pixel_pos[level], attn_mask,
                            words, word_mask)  # (B, Q, C)
            # The mask for the next layer is made at the next layer's level size.
            logits, masks, embeds, attn_mask = self.predict(queries, mask_features,
                                                            sizes[(i + 1) % self.num_levels])
            predictions.append({"pred_logits": logits, "pred_masks": masks})
            query_embeds.append(embeds)
        return {**predictions[-1], "aux_outputs": predictions[:-1], "query_embeds": query_embeds}


# ------------------------------------------------ clip-level queries with this decoder (ours)
def side_by_side(maps: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*T, C, h, w) maps of clips of `num_frames` frames, the frames of a clip consecutive ->
    (B, C, h, T*w), the frames of each clip side by side. Given its levels, positions and mask
    features so laid out, the decoder above runs Video Mask2Former's clip-level queries (the
    queries of a clip attend to the keys of all its frames and make a mask on every frame):
    attention does not depend on where a key sits, the heads are per pixel, and the bilinear
    resize of the masks to a level, by a whole factor (H, W multiples of 32), never mixes two
    frames. `frame_masks` cuts the masks apart again."""
    return rearrange(maps, "(b t) c h w -> b c h (t w)", t=num_frames)


def frame_masks(outputs: dict, num_frames: int) -> dict:
    """Outputs made on `side_by_side` maps -> pred_masks (B, Q, T, h, w), in aux_outputs too."""
    def cut(out):
        return {**out, "pred_masks": rearrange(out["pred_masks"], "b q h (t w) -> b q t h w",
                                               t=num_frames)}
    return {**cut(outputs), "aux_outputs": [cut(a) for a in outputs.get("aux_outputs", [])]}


# --------------------------------------------- where a query's mask lies (a diagnostic, ours)
@torch.no_grad()
def mask_position(mask_logits: torch.Tensor) -> torch.Tensor:
    """(ours, not in any of the papers: the --token-position diagnostic of dshmp.py and dmvs.py)
    Where predicted masks lie: mask logits (..., h, w) -> (..., 3) the centre x, y and the area of
    the sigmoid probabilities, probability-weighted and divided by the mask map's width and height
    (so in [0, 1]); all three zero for an empty mask (under one pixel of probability). Detached."""
    probs = mask_logits.detach().float().sigmoid()
    h, w = probs.shape[-2:]
    mass = probs.sum((-2, -1))  # (...)
    xs = (torch.arange(w, device=probs.device) + 0.5) / w  # pixel centres
    ys = (torch.arange(h, device=probs.device) + 0.5) / h
    x = (probs.sum(-2) * xs).sum(-1) / mass.clamp_min(1e-6)
    y = (probs.sum(-1) * ys).sum(-1) / mass.clamp_min(1e-6)
    return torch.stack([x, y, mass / (h * w)], -1) * (mass >= 1).unsqueeze(-1)


class PositionEmbedding(nn.Module):
    """(ours, the --token-position diagnostic) n numbers (..., n) -> (..., dim): each number as
    the sines and cosines of Mask2Former's sine position embedding (2 pi v / 10000^(2i / F), F
    features per number), then one Linear."""

    def __init__(self, num_values: int, dim: int, num_feats: int = 32):
        super().__init__()
        self.num_feats = num_feats
        self.proj = nn.Linear(num_values * num_feats, dim)

    def forward(self, values):
        i = torch.arange(self.num_feats // 2, device=values.device, dtype=values.dtype)
        freqs = 2 * math.pi / 10000 ** (2 * i / self.num_feats)  # (F/2,)
        angles = values[..., None] * freqs  # (..., n, F/2)
        features = torch.cat([angles.sin(), angles.cos()], -1)  # (..., n, F)
        return self.proj(rearrange(features, "... n f -> ... (n f)"))


# ----------------------------------------------------------------- weights from transformers
def decoder_kwargs_from_hf(config) -> dict:
    """Keyword arguments of `MaskedAttentionDecoder` matching a transformers `Mask2FormerConfig`."""
    if config.pre_norm:
        raise ValueError("this decoder is post-norm only (as the paper's checkpoints); "
                         "config.pre_norm is True")
    if config.activation_function != "relu":
        raise ValueError(f"this decoder's FFN uses ReLU, config.activation_function is "
                         f"{config.activation_function!r}")
    return dict(
        in_channels=config.feature_size,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        # DEC_LAYERS counts the prediction made from the learnable queries as a layer
        # (official config.py note)
        num_layers=config.decoder_layers - 1,
        num_heads=config.num_attention_heads,
        ffn_dim=config.dim_feedforward,
        num_classes=config.num_labels,
        mask_dim=config.mask_feature_size,
        dropout=float(config.dropout),
        input_proj=config.enforce_input_projection,
    )


def _weight_and_bias(ours: str, theirs: str) -> dict:
    return {f"{ours}.{p}": [f"{theirs}.{p}"] for p in ("weight", "bias")}


def hf_decoder_key_map(decoder: MaskedAttentionDecoder) -> dict:
    """Our state-dict key -> the transformers `Mask2FormerForUniversalSegmentation` key(s) it is
    made
    of. Several keys (self-attention q, k, v) are concatenated along dim 0, the layout of
    `nn.MultiheadAttention.in_proj_*`."""
    t = "model.transformer_module."
    key_map = {
        "query_feat.weight": [t + "queries_features.weight"],
        "query_pos.weight": [t + "queries_embedder.weight"],
        "level_embed.weight": [t + "level_embed.weight"],
        **_weight_and_bias("decoder_norm", t + "decoder.layernorm"),
        **_weight_and_bias("class_head", "class_predictor"),
    }
    for i in range(len(decoder.mask_embed.layers)):
        key_map.update(_weight_and_bias(f"mask_embed.layers.{i}",
                                        t + f"decoder.mask_predictor.mask_embedder.{i}.0"))
    for level, proj in enumerate(decoder.input_proj):
        if isinstance(proj, nn.Conv2d):
            key_map.update(_weight_and_bias(f"input_proj.{level}",
                                            t + f"input_projections.{level}"))
    for i in range(len(decoder.layers)):
        ours, theirs = f"layers.{i}.", t + f"decoder.layers.{i}."
        key_map.update({
            ours + "cross_attn.in_proj_weight": [theirs + "cross_attn.in_proj_weight"],
            ours + "cross_attn.in_proj_bias": [theirs + "cross_attn.in_proj_bias"],
            **_weight_and_bias(ours + "cross_attn.out_proj", theirs + "cross_attn.out_proj"),
            **_weight_and_bias(ours + "cross_norm", theirs + "cross_attn_layer_norm"),
            ours + "self_attn.in_proj_weight": [theirs + f"self_attn.{x}_proj.weight"
                                                for x in "qkv"],
            ours + "self_attn.in_proj_bias": [theirs + f"self_attn.{x}_proj.bias" for x in "qkv"],
            **_weight_and_bias(ours + "self_attn.out_proj", theirs + "self_attn.out_proj"),
            **_weight_and_bias(ours + "self_norm", theirs + "self_attn_layer_norm"),
            **_weight_and_bias(ours + "ffn.0", theirs + "fc1"),
            **_weight_and_bias(ours + "ffn.3", theirs + "fc2"),
            **_weight_and_bias(ours + "ffn_norm", theirs + "final_layer_norm"),
        })
    return key_map


HF_DECODER_PREFIXES = ("model.transformer_module.", "class_predictor.")


def load_decoder_weights(decoder: MaskedAttentionDecoder, hf_state_dict: dict, *, num_queries=None,
                         load_class_head=True) -> list:
    """Copy the transformer-decoder weights of a transformers `Mask2FormerForUniversalSegmentation`
    state dict into `decoder`, by the explicit table `hf_decoder_key_map`.

    Keys outside `HF_DECODER_PREFIXES` (the pixel-level module, the loss's `criterion.*` buffer)
    are ignored. num_queries: keep only the first `num_queries` query features and positions (as
    DsHmp's tools/process_ckpt.py keeps 20 of the 100 COCO queries). load_class_head=False leaves
    `class_head` at its initialisation (for a different class count) and ignores
    `class_predictor.*`. Raises ValueError on any missing or unused decoder key or on a shape
    mismatch; loads nothing then.
    Returns the names of our parameters left at their initialisation: the class head with
    load_class_head=False, and the word attention of a decoder built with word_attention=True.
    """
    key_map = hf_decoder_key_map(decoder)
    own = decoder.state_dict()
    words_only = [k for k in own if ".word_attn." in k or ".word_norm." in k]  # not in Mask2Former
    if set(own) - set(words_only) != set(key_map):
        raise ValueError(f"key table out of date for this decoder: "
                         f"{sorted((set(own) - set(words_only)) ^ set(key_map))}")
    skipped_ours = words_only + ([] if load_class_head
                                 else [k for k in key_map if k.startswith("class_head.")])
    skipped_theirs = set() if load_class_head else {k for k in hf_state_dict
                                                    if k.startswith("class_predictor.")}
    key_map = {k: v for k, v in key_map.items() if k not in skipped_ours}
    wanted = {k for theirs in key_map.values() for k in theirs}
    missing = sorted(wanted - set(hf_state_dict))
    known = wanted | skipped_theirs
    unused = sorted(k for k in hf_state_dict if k.startswith(HF_DECODER_PREFIXES)
                    and k not in known)
    if missing or unused:
        raise ValueError(f"Mask2Former decoder weights do not match: missing {missing}, unused "
                         f"{unused}")

    new_state, mismatched = {}, []
    for ours, theirs in key_map.items():
        value = torch.cat([hf_state_dict[k] for k in theirs], dim=0)
        if num_queries is not None and ours in ("query_feat.weight", "query_pos.weight"):
            value = value[:num_queries]  # (num_queries, C)
        if value.shape != own[ours].shape:
            mismatched.append(f"{ours} {tuple(own[ours].shape)} <- {theirs} {tuple(value.shape)}")
        new_state[ours] = value
    if mismatched:
        class_head = any(m.startswith("class_head") for m in mismatched)
        hint = "\n(pass load_class_head=False for a different number of classes)" if class_head \
            else ""
        raise ValueError("Mask2Former decoder weight shapes do not match:\n  "
                         + "\n  ".join(mismatched) + hint)
    decoder.load_state_dict(new_state, strict=not skipped_ours)
    return skipped_ours
