"""VATEX on video (vatex.VideoVATEX, Sec. 4.2): the Video-Swin backbone and its weights
(common.backbones), the 3-D sine positions and the side-by-side clip decoder
(common.mask2former), the video model's shapes, gradients and top-1 inference, the video triplets,
toy training on image clips and --init from it, and the CLI without data."""

import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.models.video import Swin3D_B_Weights, SwinTransformer3d

import vatex
from common.backbones import (VideoSwinBackbone, WeightsNotFoundError, load_video_swin_b,
                              sine_position_embedding_3d, tiny_video_swin)
from common.datasets import collate_video
from common.engine import read_checkpoint
from common.mask2former import MaskedAttentionDecoder, frame_masks, side_by_side
from common.run import cli_errors, parse_config, video_query_masks
from common.text import build_vocab
from data.toy import make_toy_image
from test_datasets import box, write_palette_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "toy", "--video", "--encoder-layers", "1", "--decoder-layers", "2", "--num-points", "64",
        "--num-frames", "2", "--train"]


@pytest.fixture(scope="module")
def video_model():
    cfg = parse_config(vatex.Config, vatex.PRESETS, TINY)
    torch.manual_seed(0)
    vocab = build_vocab(["the red circle on the left", "a blue square moving", "a photo of ."])
    return cfg, vatex.build_model(cfg, vocab=vocab)


# ------------------------------------------------------------------------- the Video-Swin backbone
def test_video_swin_gives_every_frame_its_four_maps():
    torch.manual_seed(0)
    backbone = tiny_video_swin(embed_dim=16, window_size=(2, 4, 4)).eval()
    frames = torch.randn(2, 3, 3, 64, 96)  # (B, T, 3, H, W)
    maps = backbone(frames)
    assert backbone.channels == [16, 32, 64, 128]
    assert [tuple(m.shape) for m in maps] == [(6, 16, 16, 24), (6, 32, 8, 12), (6, 64, 4, 6), (6, 128, 2, 3)]
    changed = frames.clone()
    changed[1, 0] += 1  # clip 1 does not touch clip 0; frame 1 shares frame 0's temporal window
    assert all(torch.equal(a[:3], b[:3]) for a, b in zip(maps, backbone(changed)))
    changed[0, 1] += 1
    assert not torch.allclose(maps[0][0], backbone(changed)[0][0])
    # chunk: pieces of 2 frames, each as a clip of its own
    pieces = [backbone(frames[:, :2]), backbone(frames[:, 2:])]
    for level, chunked in enumerate(backbone(frames, chunk=2)):
        whole = torch.cat([rearrange(p[level], "(b t) c h w -> b t c h w", b=2) for p in pieces], 1)
        torch.testing.assert_close(chunked, rearrange(whole, "b t c h w -> (b t) c h w"))
    with pytest.raises(ValueError, match="temporal patch size of 1"):
        VideoSwinBackbone(SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                            window_size=[2, 4, 4]))


class FakeWeights:
    """A torchvision WeightsEnum member's interface, holding a tiny Kinetics-style (2-frame kernel)
    Swin3d's state dict."""
    name, url = "TINY", "https://download.pytorch.org/models/tiny-0000.pth"

    def __init__(self, model):
        self.model = model

    def get_state_dict(self, **kwargs):
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def test_pretrained_weights_load_with_the_temporal_kernel_summed():
    arch = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[2, 4, 4])
    torch.manual_seed(0)
    source = SwinTransformer3d(patch_size=[2, 4, 4], **arch).eval()
    loaded = load_video_swin_b(FakeWeights(source), **arch, stochastic_depth_prob=0.0).eval()
    frame = torch.randn(1, 3, 1, 32, 32)  # (B, 3, T, H, W)
    # a 1-frame patch equals the 2-frame patch of a clip that holds the frame twice
    torch.testing.assert_close(loaded.patch_embed(frame), source.patch_embed(frame.repeat(1, 1, 2, 1, 1)))
    for (name, theirs), ours in zip(source.features.named_parameters(), loaded.features.parameters()):
        assert torch.equal(theirs, ours), name


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch):
    """No network and an empty cache: one WeightsNotFoundError naming the weights, the cache file
    and the fix, never random weights (nothing is downloaded: the download raises)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsNotFoundError) as excinfo:
        load_video_swin_b()
    message = str(excinfo.value)
    weights = Swin3D_B_Weights.KINETICS400_IMAGENET22K_V1
    assert "Swin3D_B_Weights.KINETICS400_IMAGENET22K_V1" in message and weights.url in message
    assert str(tmp_path / "hub" / "checkpoints" / "swin3d_b_22k-7c6ae6fa.pth") in message
    assert "never used instead" in message and "no network" in message
    with pytest.raises(SystemExit) as excinfo, cli_errors("vatex"):  # the command's one message
        load_video_swin_b()
    assert str(excinfo.value).startswith("vatex: Could not load the pretrained weights")


# ---------------------------------------------------------------- 3-D positions, the clip decoder
def official_sine_3d(b, t, c, h, w):
    """Video Mask2Former's PositionEmbeddingSine3D(c // 2, normalize=True) on (b, t, c, h, w) (the
    official VATEX position_encoding.py), transcribed: (b, t, c, h, w)."""
    ones = torch.ones(b, t, h, w)
    z, y, x = ones.cumsum(1), ones.cumsum(2), ones.cumsum(3)
    z = z / (z[:, -1:] + 1e-6) * 2 * math.pi
    y = y / (y[:, :, -1:] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(c // 2) // 2) / (c // 2))
    dim_z = 10000 ** (2 * (torch.arange(c) // 2) / c)

    def sine(e, d):
        e = e[..., None] / d
        return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=5).flatten(4)
    return (torch.cat((sine(y, dim_t), sine(x, dim_t)), dim=4) + sine(z, dim_z)).permute(0, 1, 4, 2, 3)


def test_3d_sine_positions_equal_the_official_formula():
    maps = torch.zeros(2 * 3, 5, 4, 6)  # (B*T, any, H, W)
    ours = rearrange(sine_position_embedding_3d(maps, 16, 3), "(b t) c h w -> b t c h w", t=3)
    torch.testing.assert_close(ours, official_sine_3d(2, 3, 16, 4, 6), atol=1e-5, rtol=0)


def test_the_decoder_on_frames_side_by_side_is_a_clip_decoder():
    """The frames of a clip are a set of keys to the queries: swapping two frames (with their
    positions) swaps their masks and changes nothing else, and the masks' resize to a level never
    mixes two frames (it would at the seam otherwise)."""
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(hidden_dim=32, num_queries=3, num_layers=3, num_heads=2, ffn_dim=64,
                                     num_classes=1, mask_dim=32).eval()
    T, sizes = 2, [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of a 64 x 96 frame
    levels = [torch.randn(T, 32, h, w) for h, w in sizes]  # (T, C, h, w): one clip
    pos = [sine_position_embedding_3d(f, 32, T) for f in levels]
    mask_features = torch.randn(T, 32, 16, 24)

    def run(order):
        with torch.no_grad():
            out = decoder([side_by_side(f[order], T) for f in levels], [side_by_side(p[order], T) for p in pos],
                          side_by_side(mask_features[order], T))
        return frame_masks(out, T)
    out, swapped = run([0, 1]), run([1, 0])
    assert out["pred_masks"].shape == (1, 3, T, 16, 24) and len(out["aux_outputs"]) == 3
    assert out["aux_outputs"][0]["pred_masks"].shape == (1, 3, T, 16, 24)
    torch.testing.assert_close(swapped["pred_logits"], out["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped["pred_masks"], out["pred_masks"].flip(2), atol=1e-4, rtol=1e-4)
    masks = torch.randn(1, 3, T, 16, 24)
    for h, w in sizes:  # the decoder's resize of side-by-side masks = each frame's own resize
        resized = F.interpolate(side_by_side(rearrange(masks, "b q t h w -> (b t) q h w"), T), size=(h, T * w),
                                mode="bilinear", align_corners=False)
        per_frame = F.interpolate(masks[0].transpose(0, 1), size=(h, w), mode="bilinear", align_corners=False)
        assert torch.equal(resized, side_by_side(per_frame, T))


# ------------------------------------------------------------------------------ the video model
def clip_batch():
    """Two clips of 2 frames (64 x 96), 5 captions: a triplet on clip 0, a pair on clip 1."""
    torch.manual_seed(1)
    frames = torch.randn(2, 2, 3, 64, 96)
    texts = ["the red circle on the left", "the red circle", "a blue square moving", "a blue square",
             "the blue square moving"]
    index = torch.tensor([0, 0, 0, 1, 1])
    tube = torch.zeros(1, 2, 64, 96)
    tube[0, 0, 8:40, 16:48], tube[0, 1, 12:44, 20:52] = 1, 1  # the target moves
    targets = [{"masks": tube, "labels": torch.zeros(1, dtype=torch.long)} for _ in texts]
    return frames, texts, index, targets, torch.tensor([[0, 1, 2], [3, 4, -1]])


def test_video_forward_shapes_and_gradients_reach_every_trainable_parameter(video_model):
    cfg, model = video_model
    frames, texts, index, targets, triplets = clip_batch()
    model.train()
    out = model(frames, [(64, 96), (60, 90)], texts, index)
    assert out["pred_logits"].shape == (5, 5, 2) and out["pred_masks"].shape == (5, 5, 2, 16, 24)
    assert [a["pred_masks"].shape for a in out["aux_outputs"]] == [(5, 5, 2, 16, 24)] * 2
    assert out["sentence"].shape == (5, cfg.dim)
    terms = vatex.compute_losses(cfg, out, targets, triplets=triplets)
    model.zero_grad()
    sum(terms.values()).backward()
    # all but the level embedding (it reaches the loss through zero-initialised projections)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or (n != "pixel_decoder.level_embed" and not p.grad.any()))]
    assert not missing, missing
    assert not any(p.requires_grad for p in model.clip.parameters())
    model.eval()
    with torch.no_grad():
        before = model(frames, [(64, 96), (60, 90)], texts, index)
        changed = frames.clone()
        changed[0, 1] += 1  # frame 1 of clip 0
        after = model(changed, [(64, 96), (60, 90)], texts, index)
    for key in ("pred_logits", "pred_masks", "sentence"):  # clip 1's captions do not see clip 0
        assert torch.equal(before[key][3:], after[key][3:]), key
    # one set of queries for the clip: frame 0's masks see frame 1
    assert not torch.allclose(before["pred_masks"][0, :, 0], after["pred_masks"][0, :, 0])


def test_an_image_is_a_one_frame_clip(video_model):
    _, model = video_model
    frames, texts, index, _, _ = clip_batch()
    model.eval()
    with torch.no_grad():
        image = model(frames[:, 0], [(64, 96), (64, 96)], texts, index)
        clip = model(frames[:, :1], [(64, 96), (64, 96)], texts, index)
    assert image["pred_masks"].shape == (5, 5, 16, 24)
    torch.testing.assert_close(image["pred_masks"], clip["pred_masks"][:, :, 0])


def test_infer_is_one_clip_and_the_protocol_takes_its_top1_query(video_model):
    _, model = video_model
    model.eval()
    torch.manual_seed(2)
    frames = torch.randn(3, 3, 60, 90)  # (T, 3, H, W), not multiples of 32
    logits, masks = model.infer(frames, "the red circle on the left", chunk=8)
    assert logits.shape == (5, 2) and masks.shape == (5, 3, 16, 24)
    with torch.no_grad():
        padded = F.pad(frames, (0, 6, 0, 4))[None]
        out = model(padded, [(60, 90)], ["the red circle on the left"], torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(masks, out["pred_masks"][0])
    pred = video_query_masks(model, frames, "the red circle on the left", (30, 45), threshold=None, chunk=8,
                         top1=True)
    assert pred.shape == (3, 30, 45) and pred.dtype == torch.bool

    def query_masks(q):  # one query's logits on every frame, at the original size
        up = F.interpolate(masks[q][:, None], size=(64, 96), mode="bilinear")[..., :60, :90]
        return F.interpolate(up, size=(30, 45), mode="bilinear")[:, 0] > 0
    best = int(logits.softmax(-1)[:, 0].argmax())
    assert torch.equal(pred, query_masks(best))
    assert any(not torch.equal(pred, query_masks(q)) for q in range(5) if q != best)
    probabilities = video_query_masks(model, frames, "the red circle on the left", (30, 45), threshold=None,
                                  chunk=8, top1=True, probabilities=True)  # Ref-DAVIS17's protocol
    assert probabilities.dtype == torch.float16  # > 0.5 where pred is, but where float16 rounds to 0.5
    assert (((probabilities > 0.5) == pred) | ((probabilities.float() - 0.5).abs() < 1e-3)).all()


# ------------------------------------------------------------------------------ video triplets
def test_video_triplets_follow_the_official_mapper(tmp_path):
    root = write_palette_tree(tmp_path)  # cat (obj 1) in every frame, dog (obj 2) in frames 2-3
    cfg = parse_config(vatex.Config, vatex.PRESETS, ["--data", "ytvos", "--short-side", "24", "--train"])
    with pytest.warns(UserWarning, match="skipped 1 training expressions"):
        dataset = vatex.make_dataset(cfg, root, "train", train=True)
    assert isinstance(dataset, vatex.VideoTriplets) and not dataset.base.flip
    dog = torch.zeros(4, 24, 32, dtype=torch.bool)
    dog[2:] = torch.from_numpy(box(16, 24, 0, 8, size=(24, 32))).bool()
    items = {}
    for seed in range(12):
        torch.manual_seed(seed)
        item = dataset[0]  # "a cat jumping", 4 frames: the whole video
        assert item["positive"] == "a cat jumping." and item["masks"].shape == (1, 4, 24, 32)
        if item["negative"] is not None:
            assert item["negative"] == "the dog on the right" and torch.equal(item["negative_mask"], dog)
        items.setdefault(item["negative"], item)
    assert set(items) == {None, "the dog on the right"}  # the target itself is drawn too: no negative
    batch = collate_video([items["the dog on the right"], items[None]])
    texts, index, targets, triplets = vatex.captions_of(batch)
    assert texts == ["a cat jumping", "a cat jumping.", "the dog on the right", "a cat jumping", "a cat jumping."]
    assert index.tolist() == [0, 0, 0, 1, 1] and triplets.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert all(t["masks"].shape == (1, 4, 32, 32) for t in targets)  # padded to 32
    assert torch.equal(targets[2]["masks"][0, :, :24], dog) and not targets[2]["masks"][0, :, 24:].any()


# ------------------------------------------------------------------------- training (toy)
def test_toy_video_recipe_trains_on_image_clips_then_starts_from_it(tmp_path):
    """--video on the toy RefCOCO set: images as clips of --num-frames copies in training, one-frame
    clips in its evaluation; a second run starts from its weights with --init."""
    root = tmp_path / "refcoco"
    make_toy_image(root, seed=5, train_images=6, val_images=3, test_images=1, verbose=False)
    common = ["--data", "toy", "--video", "--data-root", str(root), *TINY[3:-1], "--toy-clip-steps", "2",
              "--batch-size", "2", "--workers", "0", "--steps", "2", "--train"]
    vatex.main([*common, "--out", str(tmp_path / "first")])
    first = read_checkpoint(tmp_path / "first" / "last.pt")
    assert first["config"]["video"] and (tmp_path / "first" / "eval.json").is_file()
    vatex.main([*common, "--out", str(tmp_path / "second"), "--init", str(tmp_path / "first" / "last.pt"),
                "--lr", "0", "--steps", "1"])
    second = read_checkpoint(tmp_path / "second" / "last.pt")["model"]
    assert all(torch.equal(second[k], v) for k, v in first["model"].items())  # lr 0: the --init weights


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize("args", [["--data", "ytvos", "--eval"], ["--data", "davis", "--eval"]])
def test_missing_video_data_exits_with_one_clear_message(tmp_path, args):
    result = subprocess.run([sys.executable, "vatex.py", *args, "--data-root", str(tmp_path / "nowhere")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "data/README.md" in result.stderr
