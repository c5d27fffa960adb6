"""Pretrained encoders shared by the four methods: thin wrappers around transformers models.

- `PixelLevel`: Mask2Former's pixel-level module (Swin backbone + multi-scale deformable-attention
  pixel decoder), transformers' code used as it is. `load_mask2former` loads a checkpoint and also
  hands back the transformer-decoder weights for `common.mask2former.MaskedAttentionDecoder`.
- `TextEncoder`: RoBERTa word features and a sentence feature.
- `CLIPEncoder`: CLIP text embeddings and patch tokens projected into the joint space.
- `VideoSwinBackbone`: torchvision's Video Swin as a per-frame feature extractor (its weights via
  torchvision: `load_video_swin_b`).
- `count_parameters` / `parameter_report`: trainable and frozen parameters per module.

Every encoder has `from_pretrained` (real weights through transformers' own loaders; raises
`WeightsNotFoundError` when they cannot be found, never falls back to random weights) and `tiny`
(a random CPU-sized model with the same code path, for the toy configurations and tests).
"""
import math
import os

import einops
import torch
from huggingface_hub import constants as hub_constants
from torch import nn
from torchvision.models.video import Swin3D_B_Weights, SwinTransformer3d
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerModel,
    RobertaConfig,
    RobertaModel,
    SwinBackbone,
    SwinConfig,
)
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderOnly,
    Mask2FormerSinePositionEmbedding,
)

from common.mask2former import HF_DECODER_PREFIXES, xavier_init_

# Shapes: B images or sentences, L tokens, C channels, H W input image, N patch tokens, D joint
# CLIP space.

# CLIP's own input normalisation (RGB, [0, 1] scale; openai/clip-vit-base-patch16's
# preprocessor_config.json)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

MASK2FORMER_SWIN_TINY = "facebook/mask2former-swin-tiny-coco-instance"
MASK2FORMER_SWIN_BASE = "facebook/mask2former-swin-base-IN21k-coco-instance"
ROBERTA_BASE = "FacebookAI/roberta-base"
CLIP_B16 = "openai/clip-vit-base-patch16"
# VATEX's swin_base_patch4_window12_384_22k
SWIN_BASE_22K = "microsoft/swin-base-patch4-window12-384-in22k"
SWIN_STAGES = ["stage1", "stage2", "stage3", "stage4"]


# ------------------------------------------------------------------------ loading real weights
class WeightsNotFoundError(OSError):
    """Pretrained weights could not be loaded (no network and not in the cache, or a bad path)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    """Where transformers looks for downloaded models: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub. Read at call time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hub_constants.HF_HUB_CACHE


def _pretrained(load, name_or_path: str, *, cache_dir=None, local_files_only=None, **kwargs):
    """Call a transformers `from_pretrained` and turn its failure into one clear
    WeightsNotFoundError."""
    cache_dir = str(cache_dir) if cache_dir is not None else hub_cache_dir()
    if local_files_only is None:
        local_files_only = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    try:
        return load(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only, **kwargs)
    except OSError as err:
        mode = "offline (local files only)" if local_files_only else "online"
        raise WeightsNotFoundError(
            f"Could not load the pretrained weights {name_or_path!r} ({mode}).\n"
            f"Looked for: a local directory named {name_or_path!r}, then the Hugging Face cache at "
            f"{cache_dir} "
            f"(set with HF_HUB_CACHE or HF_HOME)"
            + ("" if local_files_only else ", then the Hugging Face Hub")
            + ".\n"
            f"Fix: on a machine with internet run `hf download {name_or_path}` (or any "
            f"from_pretrained call) and copy the cache here, or pass a local directory written by "
            f"save_pretrained (config.json, "
            f"model.safetensors, tokenizer files for text models) in place of {name_or_path!r}. "
            f"Random weights are never used instead.\n"
            f"Cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


# ----------------------------------------------------------------- Mask2Former pixel-level module
def sine_position_embedding(feature: torch.Tensor, num_channels: int) -> torch.Tensor:
    """The normalised 2-D sine position embedding Mask2Former's decoder adds to its keys:
    (B, C_any, H, W) -> (B, num_channels, H, W), equal to transformers'
    `Mask2FormerSinePositionEmbedding`."""
    embed = Mask2FormerSinePositionEmbedding(num_position_features=num_channels // 2,
                                             normalize=True)
    return embed(feature.shape, feature.device, feature.dtype)  # (B, num_channels, H, W)


def sine_position_embedding_3d(feature: torch.Tensor, num_channels: int,
                               num_frames: int) -> torch.Tensor:
    """Video Mask2Former's normalised 3-D sine position embedding (its PositionEmbeddingSine3D,
    which VITA-style video decoders add to their keys) of the maps (B*T, C_any, H, W) of clips of
    `num_frames` frames, the frames of a clip consecutive -> (B*T, num_channels, H, W): each
    frame's 2-D sine (`sine_position_embedding`) plus a sine of its normalised index t / T * 2 pi
    (t = 1..T) over all num_channels."""
    t = torch.arange(1, num_frames + 1, device=feature.device) / (num_frames + 1e-6) * 2 * math.pi
    freq = 10_000 ** (2 * (torch.arange(num_channels, device=feature.device) // 2) / num_channels)
    angles = t[:, None] / freq  # (T, num_channels)
    temporal = torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1).flatten(1)
    temporal = einops.repeat(temporal.to(feature.dtype), "t c -> (b t) c 1 1",
                             b=len(feature) // num_frames)  # (B*T, num_channels, 1, 1)
    return sine_position_embedding(feature, num_channels) + temporal


def swin_tiny_coco_config(**overrides) -> Mask2FormerConfig:
    """The configuration of `facebook/mask2former-swin-tiny-coco-instance` (the paper's Swin-T COCO
    instance model): Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, drop-path 0.3),
    100 queries, 80 classes, otherwise Mask2FormerConfig's defaults (256 channels, 6 pixel-decoder
    layers, 9 decoder layers). For building the architecture without downloading."""
    swin = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
        drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(**{"backbone_config": swin, "num_queries": 100,
                                "num_labels": 80, **overrides})


class PixelLevel(nn.Module):
    """Mask2Former's pixel-level module: Swin backbone + multi-scale deformable-attention pixel
    decoder, exactly transformers' `Mask2FormerPixelLevelModule` (its two parts are the children
    `backbone` and `pixel_decoder`). All parameters are trainable except the backbone's unused
    `swin.layernorm` (2 x the last stage's width).

    forward(pixel_values (B, 3, H, W), ImageNet-normalised, H and W multiples of 32, encode=None)
    returns a dict (`encode(backbone, pixel_values)`, when given, replaces the backbone's own
    forward and returns its 4 stage maps, e.g. LAVT's language-aware encoding in common.lavt).
    Under autocast the backbone runs in low precision and the pixel decoder in fp32 (official):
      features: [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)], the order in which
        the decoder layers visit them (round robin, coarse first);
      pos: their sine position embeddings, same shapes (as transformers' decoder computes them);
      mask_features: (B, C_mask, H/4, W/4), the per-pixel embeddings the masks are made from.
    """

    def __init__(self, config: Mask2FormerConfig, *, pixel_level_module=None):
        super().__init__()
        if pixel_level_module is None:  # transformers' initialisation of a fresh model
            pixel_level_module = Mask2FormerModel(config).pixel_level_module
        self.config = config
        self.backbone = pixel_level_module.encoder
        self.pixel_decoder = pixel_level_module.decoder
        # SwinBackbone returns its per-stage `hidden_states_norms`; the final LayerNorm of the inner
        # SwinModel never reaches the output. Frozen, so DDP does not wait for its gradient.
        self.backbone.swin.layernorm.requires_grad_(False)
        self.out_channels = config.feature_size
        self.mask_channels = config.mask_feature_size

    def forward(self, pixel_values, encode=None):
        if pixel_values.shape[-1] % 32 or pixel_values.shape[-2] % 32:
            raise ValueError(f"H and W must be multiples of 32, got pixel_values "
                             f"{tuple(pixel_values.shape)}")
        if encode is None:
            # 4 x (B, C_s, H/s, W/s), s = 4, 8, 16, 32
            stages = self.backbone(pixel_values).feature_maps
        else:
            stages = encode(self.backbone, pixel_values)
        # official (Mask2Former's msdeformattn.py, as VITA and DsHmp use it): the pixel decoder runs
        # in fp32 under mixed precision, `@autocast(enabled=False)` and the features cast to float
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            out = self.pixel_decoder([s.float() for s in stages])
        # [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)]
        features = list(out.multi_scale_features)
        pos = [sine_position_embedding(f, self.out_channels) for f in features]  # same shapes
        # mask: (B, C_mask, H/4, W/4)
        return {"features": features, "pos": pos, "mask_features": out.mask_features}

    @classmethod
    def tiny(cls, **config) -> "PixelLevel":
        """A random CPU-sized pixel-level module (a fraction of a second on a 64x96 image); the
        keyword arguments are those of `tiny_mask2former_config`."""
        return cls(tiny_mask2former_config(**config))

    @classmethod
    def from_pretrained(cls, name_or_path: str = MASK2FORMER_SWIN_TINY,
                        **hub_kwargs) -> "PixelLevel":
        """The pixel-level module of a Mask2Former checkpoint (see `load_mask2former`)."""
        return load_mask2former(name_or_path, **hub_kwargs)[0]


def deformable_encoder(*, dim, heads, layers, ffn_dim) -> Mask2FormerPixelDecoderEncoderOnly:
    """A fresh multi-scale deformable-attention encoder over three levels (transformers' module
    of Mask2Former's pixel decoder, dropout 0), for a pixel decoder built around it. Initialise it
    with `deformable_encoder_init_` and run it with `deformable_encode`."""
    return Mask2FormerPixelDecoderEncoderOnly(Mask2FormerConfig(
        feature_size=dim, encoder_layers=layers, dropout=0.0, encoder_feedforward_dim=ffn_dim,
        num_attention_heads=heads))


def deformable_encoder_init_(encoder) -> None:
    """The official Mask2Former initialisation of its deformable encoder (facebookresearch/
    Mask2Former @ 9b0651c, msdeformattn.py MSDeformAttnTransformerEncoderOnly._reset_parameters
    and ops/modules/ms_deform_attn.py MSDeformAttn._reset_parameters, Deformable DETR's); built
    alone, transformers' module never meets transformers' _init_weights."""
    xavier_init_(encoder)
    for attn in (layer.self_attn for layer in encoder.layers):
        angle = torch.arange(attn.n_heads) * (2 * math.pi / attn.n_heads)  # (heads,)
        direction = torch.stack([angle.cos(), angle.sin()], -1)  # (heads, 2): x, y
        direction = direction / direction.abs().amax(-1, keepdim=True)  # largest coordinate 1
        # point k of each head starts k + 1 cells out along the head's direction, on every level
        grid = einops.einsum(direction, torch.arange(1.0, attn.n_points + 1), "h xy, p -> h p xy")
        nn.init.zeros_(attn.sampling_offsets.weight)
        with torch.no_grad():
            attn.sampling_offsets.bias.copy_(
                einops.repeat(grid, "h p xy -> (h l p xy)", l=attn.n_levels))
        nn.init.zeros_(attn.attention_weights.weight)  # zero logits: uniform over the points
        nn.init.zeros_(attn.attention_weights.bias)
        for linear in (attn.value_proj, attn.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)


def deformable_encode(encoder, maps, level_embed) -> list:
    """The deformable encoder over maps [(N, C, h_l, w_l)], coarse first, unpadded, each with its
    2-D sine position plus its level's row of level_embed (levels, C) -> the encoded maps, same
    shapes."""
    pos = [sine_position_embedding(m, m.shape[1]) for m in maps]  # same shapes
    shapes = [tuple(m.shape[-2:]) for m in maps]
    tokens = torch.cat([einops.rearrange(m, "n c h w -> n (h w) c") for m in maps],
                       1)  # (N, hw.., C)
    pos = torch.cat([einops.rearrange(p, "n c h w -> n (h w) c") + e
                     for p, e in zip(pos, level_embed)], 1)  # (N, hw.., C)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]], device=tokens.device).cumsum(0)
    padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # none
    out = encoder(inputs_embeds=tokens, position_embeddings=pos, attention_mask=padding,
                  spatial_shapes_list=shapes, level_start_index=starts,
                  valid_ratios=tokens.new_ones(len(tokens), len(maps), 2))
    parts = out.last_hidden_state.split([h * w for h, w in shapes], 1)
    return [einops.rearrange(p, "n (h w) c -> n c h w", h=h, w=w)
            for p, (h, w) in zip(parts, shapes)]


# ------------------------------------------------------------------------ a Swin backbone alone
def swin_base_22k_config(**overrides) -> SwinConfig:
    """Swin-B at 384 px (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12) with VATEX's
    drop-path 0.3 and all four stages as outputs: the architecture of SWIN_BASE_22K."""
    return SwinConfig(**{"image_size": 384, "embed_dim": 128, "depths": [2, 2, 18, 2],
                         "num_heads": [4, 8, 16, 32], "window_size": 12, "drop_path_rate": 0.3,
                         "out_features": SWIN_STAGES, **overrides})


def swin_backbone(config: SwinConfig) -> SwinBackbone:
    """transformers' SwinBackbone: (B, 3, H, W) ImageNet-normalised -> `.feature_maps`, four maps
    (B, C_s, H/s, W/s) at s = 4, 8, 16, 32, each through its own LayerNorm. The inner model's final
    LayerNorm never reaches an output and is frozen (DDP would wait for its gradient)."""
    backbone = SwinBackbone(config)
    backbone.swin.layernorm.requires_grad_(False)
    return backbone


def param_keys(theirs: str, ours: str, params=("weight", "bias")):
    """(official key, [our key]) pairs of one layer's tensors under both names (by default the
    weight and bias of a Linear, Conv or norm layer), for the official-checkpoint key maps."""
    for p in params:
        yield f"{theirs}.{p}", [f"{ours}.{p}"]


def official_swin_keys(backbone):
    """(official key, [our keys]) pairs: the Swin of the official code (Swin-Transformer's own
    layout, kept by detectron2's D2SwinTransformer in VITA and by mmseg's in LAVT:
    layers.{s}.blocks, a fused qkv, norm{i} per output) -> transformers' SwinBackbone `backbone`,
    for its numbers of stages and blocks. Several keys of ours: the official tensor is cut into
    that many equal parts along dim 0. relative_position_index is a buffer on both sides (to
    compare, not to load)."""
    yield from param_keys("patch_embed.proj", "swin.embeddings.patch_embeddings.projection")
    yield from param_keys("patch_embed.norm", "swin.embeddings.norm")
    for s, stage in enumerate(backbone.swin.encoder.layers):
        for b in range(len(stage.blocks)):
            theirs, ours = f"layers.{s}.blocks.{b}.", f"swin.encoder.layers.{s}.blocks.{b}."
            yield from param_keys(theirs + "norm1", ours + "layernorm_before")
            # one Linear(C, 3C) -> three Linear(C, C): q, k, v, in that order
            for p in ("weight", "bias"):
                yield theirs + f"attn.qkv.{p}", [ours + f"attention.{x}_proj.{p}" for x in "qkv"]
            yield from param_keys(theirs + "attn.proj", ours + "attention.o_proj")
            rel = ours + "attention.relative_position_bias."
            yield theirs + "attn.relative_position_bias_table", \
                [rel + "relative_position_bias_table"]
            # a buffer on both sides: compared with ours, not loaded
            yield theirs + "attn.relative_position_index", [rel + "relative_position_index"]
            yield from param_keys(theirs + "norm2", ours + "layernorm_after")
            yield from param_keys(theirs + "mlp.fc1", ours + "mlp.fc1")
            yield from param_keys(theirs + "mlp.fc2", ours + "mlp.fc2")
        if stage.downsample is not None:  # patch merging after every stage but the last
            theirs, ours = f"layers.{s}.downsample.", f"swin.encoder.layers.{s}.downsample."
            # Linear(4C, 2C) without bias
            yield theirs + "reduction.weight", [ours + "reduction.weight"]
            yield from param_keys(theirs + "norm", ours + "norm")
    # stage{i+1} (output res{i+2}): official norm{i}
    for stage_name in backbone.hidden_states_norms:
        i = int(stage_name.removeprefix("stage")) - 1
        yield from param_keys(f"norm{i}", f"hidden_states_norms.{stage_name}")


def load_swin_backbone(name_or_path: str = SWIN_BASE_22K, *, drop_path_rate: float = 0.3,
                       **hub_kwargs) -> SwinBackbone:
    """ImageNet weights of a Swin classifier checkpoint in a SwinBackbone (the four per-stage
    LayerNorms are new, as in detectron2's Swin); WeightsNotFoundError when unavailable."""
    backbone = _pretrained(SwinBackbone.from_pretrained, name_or_path, out_features=SWIN_STAGES,
                           drop_path_rate=drop_path_rate, **hub_kwargs)
    backbone.swin.layernorm.requires_grad_(False)
    return backbone


# -------------------------------------------------------- a Video Swin backbone (torchvision)
class VideoSwinBackbone(nn.Module):
    """A Video Swin Transformer (Liu et al., CVPR 2022; torchvision's SwinTransformer3d) as a
    per-frame feature extractor, adapted as MTTR and ReferFormer adapt it (wjn922/ReferFormer @
    06fc218, models/video_swin_transformer.py, VideoSwinTransformerBackbone): a temporal patch size
    of 1, so no stage downsamples time and every frame keeps its maps; the four stage outputs
    before patch merging, without a norm; the classifier's final norm and head are not kept.

    forward(frames (B, T, 3, H, W) ImageNet-normalised, H W multiples of 32, chunk=None) -> four
    maps [(B*T, C_s, H/s, W/s)], s = 4, 8, 16, 32, the frames of a clip consecutive ((b t)
    order), the layout of an image backbone's feature_maps over B*T images. `chunk` runs a clip
    through in pieces of that many frames (attention stays within a piece; one pass when T <=
    chunk). `channels`: [C_s]."""

    def __init__(self, swin: SwinTransformer3d):
        super().__init__()
        if swin.patch_embed.tuple_patch_size[0] != 1:
            raise ValueError(f"VideoSwinBackbone needs a temporal patch size of 1 (per-frame "
                             f"maps), got patch size {swin.patch_embed.tuple_patch_size}")
        self.patch_embed, self.pos_drop = swin.patch_embed, swin.pos_drop
        self.features = swin.features  # stage 1, patch merging, stage 2, ..., stage 4
        width = swin.patch_embed.proj.out_channels
        self.channels = [width * 2 ** i for i in range((len(swin.features) + 1) // 2)]

    def forward(self, frames, chunk=None):
        pieces = [self._stages(p) for p in frames.split(chunk or frames.shape[1], dim=1)]
        return [einops.rearrange(torch.cat(maps, 1), "b t h w c -> (b t) c h w")
                for maps in zip(*pieces)]  # 4 x (B*T, C_s, H/s, W/s)

    def _stages(self, frames):
        x = self.patch_embed(einops.rearrange(frames, "b t c h w -> b c t h w"))
        x = self.pos_drop(x)  # (B, T, H/4, W/4, C)
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 0:  # a stage's output, before its patch merging
                maps.append(x)  # (B, T, H/s, W/s, C_s)
        return maps


def _swin3d_b(**overrides) -> SwinTransformer3d:
    return SwinTransformer3d(**{"patch_size": [1, 4, 4], "embed_dim": 128, "depths": [2, 2, 18, 2],
                                "num_heads": [4, 8, 16, 32], "window_size": [8, 7, 7],
                                "stochastic_depth_prob": 0.2, **overrides})


def video_swin_b(**overrides) -> VideoSwinBackbone:
    """torchvision's swin3d_b architecture (embed 128, depths 2-2-18-2, heads 4-8-16-32, window
    8x7x7) with a temporal patch size of 1 and ReferFormer's drop path 0.2 (its
    video_swin_b_p4w7), random weights, for building it without downloading; `overrides` go to
    SwinTransformer3d."""
    return VideoSwinBackbone(_swin3d_b(**overrides))


def tiny_video_swin(*, embed_dim: int = 16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                    window_size=(2, 4, 4)) -> VideoSwinBackbone:
    """A random CPU-sized VideoSwinBackbone (the same code path), for tests and toy models."""
    return video_swin_b(embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                        window_size=list(window_size), stochastic_depth_prob=0.0)


def load_video_swin_b(weights=Swin3D_B_Weights.KINETICS400_IMAGENET22K_V1,
                      **overrides) -> VideoSwinBackbone:
    """`video_swin_b` with torchvision's pretrained weights (default: Kinetics-400, initialised
    from ImageNet-22k), loaded by torchvision (`weights.get_state_dict`: torch hub's cache, else a
    download); the 2-frame patch kernel is summed into a 1-frame one, as MTTR and ReferFormer do.
    WeightsNotFoundError when the weights cannot be loaded."""
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # no network (URLError), a bad file (hash)
        name = f"torchvision.models.video.{type(weights).__name__}.{weights.name}"
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise WeightsNotFoundError(
            f"Could not load the pretrained weights {name}.\n"
            f"Looked for: {path} (torch hub's cache, set with TORCH_HOME), then {weights.url}.\n"
            f"Fix: on a machine with internet run `python -c \"import torchvision; {name}"
            f".get_state_dict()\"` and copy the file it writes to {path} here. Random weights are "
            f"never used instead.\n"
            f"Cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    kernel = state["patch_embed.proj.weight"]  # (C, 3, 2, 4, 4)
    state["patch_embed.proj.weight"] = kernel.sum(2, keepdim=True)  # (C, 3, 1, 4, 4)
    swin = _swin3d_b(**overrides)
    swin.load_state_dict(state)
    return VideoSwinBackbone(swin)


def clip_b16_config() -> CLIPConfig:
    """The configuration of `openai/clip-vit-base-patch16` (text 512 wide, 12 layers, 49,408 tokens;
    vision ViT-B/16 at 224 px; 512-d joint space), for building it without downloading."""
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512,
    )


def roberta_base_config() -> RobertaConfig:
    """The configuration of `FacebookAI/roberta-base` (12 layers, 768 wide, 50,265 tokens), for
    building the architecture without downloading (parameter counts, tests)."""
    return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                         pad_token_id=1,
                         bos_token_id=0, eos_token_id=2)


def tiny_mask2former_config(
    *,
    embed_dim: int = 32,
    depths=(1, 1, 1, 1),
    swin_heads=(1, 2, 2, 4),
    window_size: int = 4,
    hidden_dim: int = 32,
    encoder_layers: int = 1,
    encoder_ffn_dim: int = 64,
    num_heads: int = 4,
    drop_path: float = 0.0,
    **overrides,
) -> Mask2FormerConfig:
    """A small Mask2FormerConfig for CPU tests and toy models (`PixelLevel.tiny` uses it).
    hidden_dim is both the feature and the mask-feature width (a multiple of 32: GroupNorm(32));
    num_heads is the pixel decoder's deformable-attention head count; `overrides` go to
    Mask2FormerConfig (e.g. num_queries, decoder_layers, num_labels)."""
    swin = SwinConfig(
        embed_dim=embed_dim, depths=list(depths), num_heads=list(swin_heads),
        window_size=window_size,
        drop_path_rate=drop_path, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(**{
        "backbone_config": swin, "feature_size": hidden_dim, "mask_feature_size": hidden_dim,
        "hidden_dim": hidden_dim, "encoder_layers": encoder_layers,
        "encoder_feedforward_dim": encoder_ffn_dim,
        "num_attention_heads": num_heads, **overrides,
    })


def load_mask2former(name_or_path: str = MASK2FORMER_SWIN_TINY, *, cache_dir=None,
                     local_files_only=None):
    """Load a Mask2Former checkpoint with transformers'
    `Mask2FormerForUniversalSegmentation.from_pretrained`.

    Returns (pixel_level, decoder_state_dict, config): the loaded `PixelLevel`; the state dict of
    the transformer decoder and class head (keys `model.transformer_module.*` and
    `class_predictor.*`) for `common.mask2former.load_decoder_weights`; and the transformers config
    (`common.mask2former.decoder_kwargs_from_hf(config)` gives the matching decoder arguments).
    name_or_path: a hub id (MASK2FORMER_SWIN_TINY, MASK2FORMER_SWIN_BASE) or a local directory.
    local_files_only defaults to $HF_HUB_OFFLINE. Raises WeightsNotFoundError when not available.
    """
    model = _pretrained(
        Mask2FormerForUniversalSegmentation.from_pretrained, name_or_path, cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    decoder_state = {k: v for k, v in model.state_dict().items()
                     if k.startswith(HF_DECODER_PREFIXES)}
    return PixelLevel(model.config, pixel_level_module=model.model.pixel_level_module), \
        decoder_state, model.config


# ----------------------------------------------------------------------------- text encoders
class _Encoder(nn.Module):
    """A pretrained model that can be frozen: no gradients, and eval mode (dropout off) even when
    the parent module is put in train mode. (The official DsHmp keeps its frozen RoBERTa in train
    mode, so its dropout is active; we switch it off.)"""

    def _freeze(self, freeze: bool):
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def _device(self):
        return next(self.model.parameters()).device

    def _tokenize(self, texts, padding):
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single string")
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=True, return_special_tokens_mask=True,
        )
        return {k: v.to(self._device()) for k, v in enc.items()}


class TextEncoder(_Encoder):
    """Word features of a BERT-style encoder (RoBERTa-base for DsHmp and DMVS, BERT-base for LAVT
    and MRaCL) around a fast tokenizer.

    forward(texts: list[str]) returns a dict:
      word_feats (B, L, C): last hidden state; L = max_length always (every sentence is padded to
        max_length, like DsHmp's 40-token input, so token-slot maps have a fixed length);
      attn_mask (B, L) bool: True on real tokens (specials included), False on padding;
      word_mask (B, L) bool: True on real tokens that are not <s>/</s>;
      sentence (B, C): mean of word_feats over word_mask (zeros for an empty sentence);
      offsets (B, L, 2) long: character span of each token in its sentence, (0, 0) for
      specials/padding;
      input_ids (B, L) long.
    The sentence feature is a masked mean, not RoBERTa's pooler: the roberta-base checkpoint has no
    trained pooler (the official DsHmp uses a random frozen one, DsHmp issue #13), and `<s>` was
    never trained as a sentence summary (RoBERTa has no next-sentence objective); mean pooling is
    the usual substitute (Reimers & Gurevych, Sentence-BERT, EMNLP 2019).
    """

    def __init__(self, model: RobertaModel, tokenizer, *, max_length: int = 40,
                 freeze: bool = True):
        super().__init__()
        if not tokenizer.is_fast:
            raise ValueError("TextEncoder needs a fast tokenizer (for offsets)")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.hidden_size = model.config.hidden_size
        self._freeze(freeze)

    def forward(self, texts):
        enc = self._tokenize(texts, padding="max_length")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            word_feats = out.last_hidden_state  # (B, L, C)
        attn_mask = enc["attention_mask"].bool()  # (B, L)
        word_mask = attn_mask & ~enc["special_tokens_mask"].bool()  # (B, L)
        weights = word_mask.to(word_feats.dtype)  # (B, L)
        summed = einops.einsum(word_feats, weights, "b l c, b l -> b c")  # (B, C)
        sentence = summed / weights.sum(1, keepdim=True).clamp(min=1)  # (B, C)
        return {
            "word_feats": word_feats, "attn_mask": attn_mask, "word_mask": word_mask,
            "sentence": sentence,
            "offsets": enc["offset_mapping"].long(), "input_ids": enc["input_ids"],
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str = ROBERTA_BASE, *, freeze: bool = True,
                        max_length: int = 40,
                        model_class=RobertaModel, **hub_kwargs) -> "TextEncoder":
        """RoBERTa-base (or, with model_class=BertModel, BERT, which LAVT fine-tunes) and its fast
        tokenizer via transformers; WeightsNotFoundError when unavailable. The pooler is not built
        (roberta-base has no trained one, and only the word features are used)."""
        tokenizer = _pretrained(AutoTokenizer.from_pretrained, name_or_path, **hub_kwargs)
        model = _pretrained(model_class.from_pretrained, name_or_path, add_pooling_layer=False,
                            **hub_kwargs)
        return cls(model, tokenizer, max_length=max_length, freeze=freeze)

    @classmethod
    def tiny(cls, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 2,
             max_length: int = 40,
             freeze: bool = False) -> "TextEncoder":
        """A random RoBERTa around any fast tokenizer (e.g. `common.text.word_tokenizer`)."""
        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            # RoBERTa numbers positions from pad_token_id + 1
            max_position_embeddings=max_length + tokenizer.pad_token_id + 1,
        )
        return cls(RobertaModel(config, add_pooling_layer=False), tokenizer, max_length=max_length,
                   freeze=freeze)


class CLIPEncoder(_Encoder):
    """CLIP (VATEX uses ViT-B/16) text and image towers with their projections into the joint space.

    encode_words(texts) -> dict(word_feats (B, L, C_text) final-layer-normed token states,
      attn_mask (B, L) bool True on real tokens, text_embeds (B, D), input_ids (B, L)); L is the
      longest sentence of the batch (VATEX's tokenizer call uses padding=True), at most max_length.
    encode_text(texts) -> (B, D): the projected end-of-text token state (CLIP's text embedding, NOT
      L2-normalised; normalise it for cosine similarities).
    encode_image(pixel_values (B, 3, H, W), CLIP-normalised, H and W multiples of the patch size)
      -> dict(patch_tokens (B, N, D), cls (B, D), grid (h, w)), N = h*w. Position embeddings are
      interpolated for sizes other than the pretraining size. cls is CLIP's image embedding; the
      patch tokens go through the same post-LayerNorm and projection as cls (MaskCLIP-style), or
      through the projection only with patch_layernorm=False (what VATEX's official code does).
    """

    def __init__(self, model: CLIPModel, tokenizer, *, max_length: int = 77, freeze: bool = True):
        super().__init__()
        if not tokenizer.is_fast:
            raise ValueError("CLIPEncoder needs a fast tokenizer")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.embed_dim = model.config.projection_dim  # D
        self.text_hidden_size = model.config.text_config.hidden_size  # C_text of word_feats
        self.patch_size = model.config.vision_config.patch_size
        self._freeze(freeze)

    def encode_words(self, texts):
        enc = self._tokenize(texts, padding="longest")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model.text_model(input_ids=enc["input_ids"],
                                        attention_mask=enc["attention_mask"])
            word_feats = out.last_hidden_state  # (B, L, C_text)
            # The end-of-text token is the last real token (right padding). transformers finds it by
            # argmax(input_ids) for the OpenAI configs (eos_token_id == 2), which picks the same
            # position there but not for other vocabularies such as the toy word tokenizer.
            last = enc["attention_mask"].sum(1) - 1  # (B,)
            eos_feats = word_feats[torch.arange(len(last), device=last.device), last]  # (B, C_text)
            text_embeds = self.model.text_projection(eos_feats)  # (B, D)
        return {"word_feats": word_feats, "attn_mask": enc["attention_mask"].bool(),
                "text_embeds": text_embeds,
                "input_ids": enc["input_ids"]}

    def encode_text(self, texts):
        return self.encode_words(texts)["text_embeds"]  # (B, D)

    def encode_image(self, pixel_values, *, patch_layernorm: bool = True):
        vision = self.model.vision_model
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = vision(pixel_values=pixel_values, interpolate_pos_encoding=True)
            tokens = out.last_hidden_state  # (B, 1+N, C_vis), before CLIP's post-LayerNorm
            cls = self.model.visual_projection(vision.post_layernorm(tokens[:, 0]))  # (B, D)
            # (B, N, C_vis)
            patches = vision.post_layernorm(tokens[:, 1:]) if patch_layernorm else tokens[:, 1:]
            patch_tokens = self.model.visual_projection(patches)  # (B, N, D)
        grid = (pixel_values.shape[-2] // self.patch_size,
                pixel_values.shape[-1] // self.patch_size)
        return {"patch_tokens": patch_tokens, "cls": cls, "grid": grid}

    @classmethod
    def from_pretrained(cls, name_or_path: str = CLIP_B16, *, freeze: bool = True,
                        max_length: int = 77,
                        **hub_kwargs) -> "CLIPEncoder":
        """CLIP and its fast tokenizer via transformers; WeightsNotFoundError when unavailable."""
        tokenizer = _pretrained(AutoTokenizer.from_pretrained, name_or_path, **hub_kwargs)
        model = _pretrained(CLIPModel.from_pretrained, name_or_path, **hub_kwargs)
        return cls(model, tokenizer, max_length=max_length, freeze=freeze)

    @classmethod
    def tiny(
        cls, tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 2, embed_dim: int = 24,
        image_size: int = 32, patch_size: int = 8, max_length: int = 40, freeze: bool = False,
    ) -> "CLIPEncoder":
        """A random CLIP around any fast tokenizer (e.g. `common.text.word_tokenizer`)."""
        tower = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads)
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer), max_position_embeddings=max_length,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **tower,
            ),
            vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
            projection_dim=embed_dim,
        )
        return cls(CLIPModel(config), tokenizer, max_length=max_length, freeze=freeze)


def clip_view(images, sizes, size: int, *, mean, std):
    """transformers' CLIPImageProcessor as openai/clip-vit-base-patch16 configures it (short side
    `size`, bicubic, centre crop size x size, CLIP mean/std; VATEX's CLIP prior feeds it), on a
    batch the other encoders see. As the processor: the long side becomes int(size * long /
    short) (truncated, transformers' get_resize_output_image_size), the bicubic is antialiased
    (torchvision's and PIL's are), the crop starts at ((h' - size) // 2, (w' - size) // 2), and
    the resized image is clamped to [0, 1] (the processor resizes uint8). It differs from the
    processor's pixel_values only where the processor rounds and clips to uint8, after each of its
    two resize passes (tests/test_backbones.py measures it).
    images (B, 3, Hp, Wp) normalised with per-channel `mean` and `std` ([0, 1] scale; ImageNet's for
    the other encoders), sizes [(h, w)] unpadded -> (B, 3, size, size)."""
    def stats(values):
        return torch.tensor(values, device=images.device)[:, None, None]  # (3, 1, 1)

    views = []
    for image, (h, w) in zip(images, sizes):
        rgb = image[:, :h, :w] * stats(std) + stats(mean)  # (3, h, w) in [0, 1]
        long = int(size * max(h, w) / min(h, w))  # truncated, as transformers
        rh, rw = (size, long) if h <= w else (long, size)
        rgb = nn.functional.interpolate(rgb[None], size=(rh, rw), mode="bicubic",
                                        align_corners=False,
                                        antialias=True)[0]  # (3, rh, rw)
        top, left = (rh - size) // 2, (rw - size) // 2
        crop = rgb[:, top:top + size, left:left + size].clamp(0, 1)  # (3, size, size)
        views.append((crop - stats(CLIP_MEAN)) / stats(CLIP_STD))
    return torch.stack(views)  # (B, 3, size, size)


# ------------------------------------------------------------------------------ parameter counts
def count_parameters(model: nn.Module, *, depth: int = 1) -> dict:
    """{module name: (trainable, frozen)} for the modules `depth` levels below `model` (a shallower
    module without children is its own row; parameters held directly by a module that has
    children are reported as "<name>.(own)"). Shared parameters are counted once."""
    counts, seen = {}, set()

    def add(name, params):
        trainable = frozen = 0
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        if trainable or frozen:
            counts[name] = (trainable, frozen)

    def visit(module, prefix, level):
        children = list(module.named_children())
        if level == depth or not children:
            add(prefix or "(model)", module.parameters())
            return
        add(f"{prefix}.(own)" if prefix else "(own)", module.parameters(recurse=False))
        for name, child in children:
            visit(child, f"{prefix}.{name}" if prefix else name, level + 1)

    visit(model, "", 0)
    return counts


def parameter_report(model: nn.Module, *, depth: int = 1) -> str:
    """A table of trainable and frozen parameter counts per module (see `count_parameters`) and
    totals."""
    counts = count_parameters(model, depth=depth)
    width = max([len(name) for name in counts] + [len("total")])
    lines = [f"{'module':<{width}}  {'trainable':>13}  {'frozen':>13}"]
    for name, (trainable, frozen) in counts.items():
        lines.append(f"{name:<{width}}  {trainable:>13,}  {frozen:>13,}")
    total_trainable = sum(t for t, _ in counts.values())
    total_frozen = sum(f for _, f in counts.values())
    lines.append(f"{'total':<{width}}  {total_trainable:>13,}  {total_frozen:>13,}")
    return "\n".join(lines)
