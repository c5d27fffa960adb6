"""common/backbones.py: pixel-level outputs, text and CLIP encoders, CLIP's image view, offline errors, parameter counts."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from common.backbones import (
    CLIPEncoder,
    PixelLevel,
    TextEncoder,
    WeightsNotFoundError,
    count_parameters,
    load_mask2former,
    parameter_report,
)
from common.text import build_vocab, word_tokenizer

SENTENCES = ["the red ball moves left", "a small dog, jumping over the tall fence very quickly"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(build_vocab(SENTENCES), max_length=12)


def _sine_reference(height, width, channels):
    """DETR's normalised sine embedding written out from its definition (numpy)."""
    feats = channels // 2
    dim_t = 10000 ** (2 * (np.arange(feats) // 2) / feats)
    out = []
    for n in (height, width):
        coord = (np.arange(n) + 1) / (n + 1e-6) * 2 * math.pi  # cumulative count, normalised to (0, 2pi]
        angle = coord[:, None] / dim_t  # (n, feats)
        out.append(np.where(np.arange(feats) % 2 == 0, np.sin(angle), np.cos(angle)))  # sin, cos, sin, cos, ...
    y, x = out
    return np.concatenate([np.broadcast_to(y[:, None, :], (height, width, feats)),
                           np.broadcast_to(x[None, :, :], (height, width, feats))], axis=-1).transpose(2, 0, 1)


def test_pixel_level_shapes_order_and_positions():
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny(hidden_dim=64).eval()
    with torch.no_grad():
        out = pixel_level(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in out["features"]] == [(2, 64, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]
    assert [tuple(p.shape) for p in out["pos"]] == [(2, 64, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]
    assert out["mask_features"].shape == (2, 64, 16, 24)
    for pos in out["pos"]:
        h, w = pos.shape[-2:]
        np.testing.assert_allclose(pos[1].numpy(), _sine_reference(h, w, 64), atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"):
        pixel_level(torch.randn(1, 3, 64, 80))


def test_pixel_level_runs_its_pixel_decoder_in_fp32_under_autocast():
    """Mixed precision as the official Mask2Former / VITA / DsHmp: the backbone in low precision,
    the deformable pixel decoder in fp32 (`@autocast(enabled=False)`). Checked with CPU bf16 autocast,
    which casts Linear layers as CUDA's does."""
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny(hidden_dim=64).eval()
    dtypes = {}
    for name, module in (("backbone", pixel_level.backbone.swin.encoder.layers[0].blocks[0].mlp.fc2),
                         ("pixel decoder", pixel_level.pixel_decoder.encoder.layers[0].self_attn.value_proj)):
        module.register_forward_hook(lambda m, args, out, name=name: dtypes.update({name: out.dtype}))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pixel_level(torch.randn(1, 3, 64, 96))
    assert dtypes == {"backbone": torch.bfloat16, "pixel decoder": torch.float32}
    assert out["mask_features"].dtype == torch.float32 and all(f.dtype == torch.float32 for f in out["features"])


def test_pixel_level_encode_replaces_the_backbone_forward():
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny(hidden_dim=64).eval()
    x, seen = torch.randn(1, 3, 64, 96), []

    def own(backbone, pixel_values):
        seen.extend(backbone(pixel_values).feature_maps)
        return seen

    with torch.no_grad():
        plain = pixel_level(x)
        same = pixel_level(x, encode=own)
        zeroed = pixel_level(x, encode=lambda backbone, v: [torch.zeros_like(s) for s in seen])
    assert [tuple(s.shape) for s in seen] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    assert torch.equal(same["mask_features"], plain["mask_features"])
    assert not torch.allclose(zeroed["mask_features"], plain["mask_features"])


def test_text_encoder_tiny_outputs(tokenizer):
    encoder = TextEncoder.tiny(tokenizer, hidden=32, max_length=12).eval()
    assert encoder.hidden_size == 32
    texts = SENTENCES + ["a dog"]
    out = encoder(texts)
    assert out["word_feats"].shape == (3, 12, 32) and out["sentence"].shape == (3, 32)
    assert out["offsets"].shape == (3, 12, 2) and out["offsets"].dtype == torch.long
    assert out["attn_mask"].dtype == torch.bool and out["input_ids"].shape == (3, 12)
    # sentence 0: <s> the red ball moves left </s> <pad>...; sentence 1 is truncated to 12 tokens
    assert out["attn_mask"].sum(1).tolist() == [7, 12, 4]
    assert out["word_mask"].sum(1).tolist() == [5, 10, 2]
    assert out["input_ids"][0, 0] == tokenizer.bos_token_id and out["input_ids"][0, 6] == tokenizer.eos_token_id
    assert out["input_ids"][1, -1] == tokenizer.eos_token_id  # truncation keeps </s>
    assert (out["input_ids"][0, 7:] == tokenizer.pad_token_id).all()
    words = [texts[0][s:e] for (s, e), keep in zip(out["offsets"][0].tolist(), out["word_mask"][0]) if keep]
    assert words == ["the", "red", "ball", "moves", "left"]
    assert texts[1][slice(*out["offsets"][1, 3].tolist())] == "dog"
    assert texts[1][slice(*out["offsets"][1, 4].tolist())] == ","
    expected = out["word_feats"][2, 1:3].mean(0)  # the two words of "a dog"
    torch.testing.assert_close(out["sentence"][2], expected)


def test_text_encoder_freeze(tokenizer):
    frozen = TextEncoder.tiny(tokenizer, hidden=32, max_length=12, freeze=True)
    parent = nn.ModuleDict({"text": frozen, "head": nn.Linear(32, 2)})
    parent.train()
    assert not frozen.model.training and parent["head"].training
    assert not any(p.requires_grad for p in frozen.parameters())
    a, b = frozen(SENTENCES), frozen(SENTENCES)
    torch.testing.assert_close(a["word_feats"], b["word_feats"], rtol=0, atol=0)  # dropout is off
    assert not a["word_feats"].requires_grad

    trainable = TextEncoder.tiny(tokenizer, hidden=32, max_length=12, freeze=False).train()
    a, b = trainable(SENTENCES), trainable(SENTENCES)
    assert not torch.allclose(a["word_feats"], b["word_feats"])  # RoBERTa's dropout 0.1 is active
    a["sentence"].sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())


def test_clip_tiny_text_and_image(tokenizer):
    torch.manual_seed(0)
    clip = CLIPEncoder.tiny(tokenizer, hidden=32, embed_dim=24, image_size=32, patch_size=8, max_length=12).eval()
    words = clip.encode_words(SENTENCES[:1] + ["a dog"])
    assert words["word_feats"].shape == (2, 7, clip.text_hidden_size)  # padded to the longest sentence
    assert clip.text_hidden_size == 32 and clip.embed_dim == 24
    assert words["attn_mask"].sum(1).tolist() == [7, 4]
    text = clip.encode_text(SENTENCES[:1] + ["a dog"])
    assert text.shape == (2, 24)
    # the projected state of </s> (the end-of-text token), not L2-normalised
    eos = words["word_feats"][1, 3]
    torch.testing.assert_close(text[1], clip.model.text_projection(eos))
    assert not torch.allclose(text.norm(dim=-1), torch.ones(2))

    square = torch.randn(2, 3, 32, 32)
    out = clip.encode_image(square)
    assert out["patch_tokens"].shape == (2, 16, 24) and out["cls"].shape == (2, 24) and out["grid"] == (4, 4)
    torch.testing.assert_close(out["cls"], clip.model.get_image_features(pixel_values=square).pooler_output)
    vision = clip.model.vision_model(pixel_values=square).last_hidden_state  # (B, 1+N, C)
    normed = clip.model.vision_model.post_layernorm(vision[:, 1:])  # (B, N, C)
    torch.testing.assert_close(out["patch_tokens"], clip.model.visual_projection(normed))
    raw = clip.encode_image(square, patch_layernorm=False)["patch_tokens"]
    torch.testing.assert_close(raw, clip.model.visual_projection(vision[:, 1:]))

    wide = clip.encode_image(torch.randn(1, 3, 48, 64))  # not the pretraining size: interpolated positions
    assert wide["patch_tokens"].shape == (1, 6 * 8, 24) and wide["grid"] == (6, 8)


@pytest.mark.parametrize("load", [
    lambda: TextEncoder.from_pretrained(),
    lambda: CLIPEncoder.from_pretrained(),
    lambda: load_mask2former(),
    lambda: PixelLevel.from_pretrained("facebook/mask2former-swin-base-IN21k-coco-instance"),
])
def test_offline_error_names_model_cache_and_fix(load, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        load()
    message = str(info.value)
    assert any(name in message for name in (
        "'FacebookAI/roberta-base'", "'openai/clip-vit-base-patch16'", "'facebook/mask2former-swin-tiny-coco-instance'",
        "'facebook/mask2former-swin-base-IN21k-coco-instance'"))
    assert str(tmp_path) in message and "offline" in message
    assert "save_pretrained" in message and "hf download" in message
    assert isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


def test_offline_error_for_a_missing_local_directory(tmp_path):
    missing = tmp_path / "roberta-copy"
    with pytest.raises(WeightsNotFoundError, match="roberta-copy"):
        TextEncoder.from_pretrained(str(missing), cache_dir=tmp_path, local_files_only=True)


def test_parameter_counts():
    frozen = nn.Linear(4, 2)  # 10 parameters
    frozen.requires_grad_(False)
    model = nn.ModuleDict({
        "encoder": nn.Sequential(nn.Linear(3, 4), nn.ReLU(), frozen),  # 16 trainable, 10 frozen
        "head": nn.Linear(2, 1),  # 3 trainable
    })
    model.scale = nn.Parameter(torch.ones(5))  # held directly by the top module
    assert count_parameters(model) == {"(own)": (5, 0), "encoder": (16, 10), "head": (3, 0)}
    assert count_parameters(model, depth=2) == {"(own)": (5, 0), "encoder.0": (16, 0), "encoder.2": (0, 10), "head": (3, 0)}
    model.tied = nn.ModuleDict({"again": model["head"]})  # shared parameters are counted once
    assert "tied" not in count_parameters(model)
    report = parameter_report(model).splitlines()
    assert report[0].split() == ["module", "trainable", "frozen"]
    assert report[2].split() == ["encoder", "16", "10"]
    assert report[-1].split() == ["total", "24", "10"]


def test_text_encoders_load_from_a_local_directory(tokenizer, tmp_path):
    """`from_pretrained` on a save_pretrained directory (the offline way to pass real weights)."""
    torch.manual_seed(0)
    text = TextEncoder.tiny(tokenizer, hidden=32, max_length=12).eval()
    text.model.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    loaded = TextEncoder.from_pretrained(str(tmp_path / "roberta"), max_length=12, local_files_only=True)
    assert loaded.frozen and not loaded.model.training
    torch.testing.assert_close(loaded(SENTENCES)["word_feats"], text(SENTENCES)["word_feats"])

    clip = CLIPEncoder.tiny(tokenizer, hidden=32, max_length=12).eval()
    clip.model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded = CLIPEncoder.from_pretrained(str(tmp_path / "clip"), max_length=12, local_files_only=True)
    torch.testing.assert_close(loaded.encode_text(SENTENCES), clip.encode_text(SENTENCES))


# openai/clip-vit-base-patch16's preprocessor_config.json (what VATEX's AutoProcessor loads), as
# the arguments of transformers' CLIP image processor; nothing is downloaded
CLIP_B16_PREPROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3,
                             do_center_crop=True, crop_size={"height": 224, "width": 224},
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.48145466, 0.4578275, 0.40821073],
                             image_std=[0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("name", ["CLIPImageProcessor", "CLIPImageProcessorPil"])
def test_clip_view_equals_transformers_clip_image_processor(name):
    """`clip_view` against transformers' CLIP image processor on uint8 RGB images, the input the
    official VATEX code gives it: a smooth 480x720 image and a noisy 517x389 one (long side
    int(224 * 517 / 389) = 297, where rounding gives 298 and shifts the crop by a row).
    In transformers 5 (5.25.0 when measured) `CLIPImageProcessor` is the torchvision-backed
    processor and `CLIPImageProcessorPil` the PIL one, which is transformers 4's
    `CLIPImageProcessor` (the official code's); both gave the same numbers.
    Tolerance, measured, in CLIP-normalised units (x ~0.27, CLIP's std, for [0, 1] units): the
    processor resizes uint8 in two passes, rounding and clipping after each (PIL's way), and we
    resize floats once: on the smooth image at most 0.013 (0.0034 in [0, 1], under 1/255; 0.02
    allowed); on the noisy one, where bicubic overshoots are clipped between the passes, 0.0043
    on average (0.01 allowed) and 0.12 at most (0.033 in [0, 1]; 0.15 allowed). With float input
    (torchvision backend only: no rounding, and nothing to clip on the smooth image) the two
    agree to 1.2e-6 (1e-4 allowed). On the noisy image a rounded long side (298) gives a mean of
    0.31, a bicubic without antialiasing 0.49, and both together 0.67."""
    import transformers
    from common.backbones import clip_view
    from common.datasets import IMAGENET_MEAN, IMAGENET_STD
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    processor = getattr(transformers, name)(**CLIP_B16_PREPROCESSOR)
    y, x = torch.meshgrid(torch.linspace(0, 1, 480), torch.linspace(0, 1, 720), indexing="ij")
    smooth = torch.stack([0.5 + 0.4 * torch.sin(6 * x + 2 * y), 0.5 + 0.4 * torch.cos(5 * y),
                          0.1 + 0.8 * x * y])  # (3, 480, 720) in [0.1, 0.9]
    smooth = (smooth * 255).round().to(torch.uint8)
    noisy = torch.randint(0, 256, (3, 517, 389), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    batch = torch.full((2, 3, 544, 736), 4.0)  # padded as a batch of the other encoders
    for b, image in enumerate((smooth, noisy)):
        batch[b, :, :image.shape[1], :image.shape[2]] = (image / 255 - mean) / std
    ours = clip_view(batch, [(480, 720), (517, 389)], 224, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # (2, 3, 224, 224)
    theirs = [processor(images=image, return_tensors="pt")["pixel_values"][0]
              for image in (smooth, noisy)]  # (3, 224, 224) each
    assert ours.shape == (2, 3, 224, 224) and theirs[0].shape == theirs[1].shape == (3, 224, 224)
    assert (ours[0] - theirs[0]).abs().max() < 0.02
    assert (ours[1] - theirs[1]).abs().mean() < 0.01 and (ours[1] - theirs[1]).abs().max() < 0.15
    if getattr(processor, "backend", None) == "torchvision":
        exact = processor(images=smooth.float(), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours[0], exact, rtol=0, atol=1e-4)
