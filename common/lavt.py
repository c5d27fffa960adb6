"""LAVT's language-aware visual encoding (Yang et al., "LAVT: Language-Aware Vision Transformer for
Referring Image Segmentation", CVPR 2022, Sec. 3.2; reference code github.com/yz93/LAVT-RIS).

`PixelWordAttention` is LAVT's pixel-word attention module (PWAM, Eq. 1-4 of the LAVT paper):
every pixel attends to the words, and the attended language feature multiplies the pixel feature
element-wise. DsHmp's official code applies it after every Swin stage.
"""
import math

import torch
from einops import einsum
from torch import nn

# Shapes: B images, C visual channels, H W feature map, L words, C_w word width.


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

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        q, k = self.query(x), self.key(words)  # (B, C, H, W), (B, L, C)
        logits = einsum(q, k, "b c h w, b l c -> b h w l") / math.sqrt(x.shape[1])  # (B, H, W, L)
        attn = logits.masked_fill(~word_mask[:, None, None], -math.inf).softmax(-1)  # (B, H, W, L)
        lang = self.out(einsum(attn, self.value(words), "b h w l, b l c -> b c h w"))  # (B, C, H, W)
        return self.mm(self.vis(x) * lang)
