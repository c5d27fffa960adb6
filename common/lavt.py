"""LAVT's language-aware visual encoding (Yang et al., "LAVT: Language-Aware Vision Transformer for
Referring Image Segmentation", CVPR 2022, Sec. 3.2; reference code github.com/yz93/LAVT-RIS).

`PixelWordAttention` is LAVT's pixel-word attention module (PWAM, Eqs. 1-4 of the LAVT paper):
every pixel attends to the words, and the attended language feature multiplies the pixel feature
element-wise. `LanguageGate` (LAVT Sec. 3.3, Eqs. 5-6) weighs how much of it flows back into the
visual stream. `LanguageAwareSwin` is LAVT's language-aware visual encoder built around
transformers' SwinBackbone without rewriting it: the Swin stages run one at a time, and after each
stage's blocks (before its patch merging) the PWAM output F_i is gated and added to the stage's
features, which feed the next stage; the encoder's outputs are the F_i (through the backbone's
per-stage LayerNorms). LAVT encodes images this way (`feedback=True`, its gate live from the
start). `feedback=False` builds no gate: PWAM on each stage's output, the Swin stages untouched by
the words. It is what a gate whose two bias-free Linear layers are both zero-initialised amounts
to: with W_1 = W_2 = 0 the gate's output and both weights' gradients are exactly zero, so no
optimiser step ever opens it.
"""
import math

import torch
from einops import einsum, rearrange
from torch import nn

# Shapes: B images, C visual channels (C_i at stage i), H W feature map, L words, C_w word width.


class PixelWordAttention(nn.Module):
    """PWAM: x (B, C, H, W), words (B, L, C_w), word_mask (B, L) True on real words -> (B, C, H, W).
    Padded words get no attention."""

    def __init__(self, *, dim: int, word_dim: int):
        super().__init__()
        self.vis = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())  # the visual projection
        self.query = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.InstanceNorm2d(dim))
        self.key, self.value = nn.Linear(word_dim, dim), nn.Linear(word_dim, dim)
        self.out = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.InstanceNorm2d(dim))
        self.mm = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())  # after the element-wise product

    def forward(self, x: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        q, k = self.query(x), self.key(words)  # (B, C, H, W), (B, L, C)
        logits = einsum(q, k, "b c h w, b l c -> b h w l") / math.sqrt(x.shape[1])  # (B, H, W, L)
        attn = logits.masked_fill(~word_mask[:, None, None], -math.inf).softmax(-1)  # (B, H, W, L)
        # (B, C, H, W)
        lang = self.out(einsum(attn, self.value(words), "b h w l, b l c -> b c h w"))
        return self.mm(self.vis(x) * lang)


class LanguageGate(nn.Module):
    """LAVT Eq. (5): S = tanh(W_2 ReLU(W_1 F)) per pixel, two linear maps without bias, initialised
    as LAVT initialises every linear layer (truncated normal, std 0.02), so a fresh gate lets little
    through. (B, C, H, W) -> (B, C, H, W) in (-1, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(),
                                 nn.Linear(dim, dim, bias=False),
                                 nn.Tanh())
        for layer in self.mlp[::2]:
            nn.init.trunc_normal_(layer.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.mlp(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


class LanguageAwareSwin(nn.Module):
    """LAVT's language-aware visual encoding (Sec. 3.2-3.3) around a transformers SwinBackbone.

    forward(backbone, pixel_values (B, 3, H, W), words (B, L, C_w), word_mask (B, L) True on real
    words) -> four maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32: LayerNorm_i(F_i), F_i = PWAM_i(V_i,
    words) the multimodal feature of stage i (Eqs. 1-4); with `feedback`, V_i + S_i * F_i goes on
    into stage i + 1 (Eq. 6), without it V_i (no gates are built). The backbone is passed in, not
    held, so its weights stay where a checkpoint loader expects them (e.g. inside Mask2Former's
    pixel-level module). The last stage has no gate: its gated features would feed nothing (LAVT
    builds one there and never uses it).
    """

    def __init__(self, *, channels, word_dim: int, feedback: bool = True):
        super().__init__()
        self.pwams = nn.ModuleList(PixelWordAttention(dim=c, word_dim=word_dim) for c in channels)
        self.gates = nn.ModuleList(LanguageGate(c) for c in channels[:-1]) if feedback else None

    def forward(self, backbone, pixel_values, words, word_mask):
        swin = backbone.swin
        hidden, (h, w) = swin.embeddings(pixel_values)  # (B, h*w, C_1)
        outputs = []
        for i, stage in enumerate(swin.encoder.layers):
            for block in stage.blocks:  # as SwinBackbone runs them (always_partition)
                hidden = block(hidden, (h, w), always_partition=True)[0]  # (B, h*w, C_i)
            x = rearrange(hidden, "b (h w) c -> b c h w", h=h, w=w)  # V_i
            fused = self.pwams[i](x, words, word_mask)  # F_i, LAVT Eqs. (1)-(4)
            norm = backbone.hidden_states_norms[backbone.stage_names[i + 1]]
            outputs.append(rearrange(norm(rearrange(fused, "b c h w -> b h w c")),
                                     "b h w c -> b c h w"))
            if stage.downsample is None:
                break
            if self.gates is not None:
                # LAVT Eq. (6): V_i + S_i * F_i, into stage i + 1
                x = x + self.gates[i](fused) * fused
            # (B, h*w/4, C_{i+1})
            hidden = stage.downsample(rearrange(x, "b c h w -> b (h w) c"), (h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return outputs


# ----------------------------------------------------------------- weights of the official LAVT
def official_fusion_keys(fusion: LanguageAwareSwin) -> list:
    """(official key, [our key]) pairs of the language-aware parts of the official encoder
    (yz93/LAVT-RIS lib/backbone.py, in a checkpoint under `backbone.`: each stage's `fusion`, the
    PWAM, and its `res_gate`) -> `fusion.state_dict()`. The official 1x1 Conv1d are our 1x1
    Conv2d (pixels) and Linear (words), the same numbers in another shape (the loader reshapes).
    The Swin around them maps with common.backbones.official_swin_keys."""
    def layer(theirs, ours, params=("weight", "bias")):
        return [(f"{theirs}.{p}", [f"{ours}.{p}"]) for p in params]

    pairs = []
    for s in range(len(fusion.pwams)):
        theirs, ours = f"backbone.layers.{s}.", f"pwams.{s}."
        pairs += layer(theirs + "fusion.vis_project.0", ours + "vis.0")
        for official, name in (("f_query.0", "query.0"), ("f_key.0", "key"),
                               ("f_value.0", "value"), ("W.0", "out.0")):
            pairs += layer(theirs + "fusion.image_lang_att." + official, ours + name)
        pairs += layer(theirs + "fusion.project_mm.0", ours + "mm.0")
        if fusion.gates is not None and s < len(fusion.gates):
            for j in (0, 2):  # Linear, ReLU, Linear, Tanh; no biases
                pairs += layer(theirs + f"res_gate.{j}", f"gates.{s}.mlp.{j}", ("weight",))
    return pairs
