"""Referred images as pseudo-videos (common.datasets.PseudoVideo, VITA's recipe), VITA's dataset mix
(MixedClips, DMVS's joint Ref-YouTube-VOS training), --init (common.run.init_weights) and DsHmp's
image pre-training stage on the toy set, then the video stage started from it."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmvs
import dshmp
from common.datasets import (IMAGENET_MEAN, IMAGENET_STD, MeViS, MixedClips, PseudoVideo,
                             collate_video, swap_left_right)
from common.engine import CheckpointError, denormalize, read_checkpoint, save_checkpoint, \
    setup_distributed
from common.run import init_weights, parse_config, pseudo_videos, toy_vocab, train_batches
from common.text import build_vocab
from data.toy import make_toy_image, make_toy_video

TOY = ["--batch-size", "2", "--workers", "0", "--hmp-blocks", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy tree as data/toy lays it out: mevis/ (videos) beside refcoco/ (images)."""
    root = tmp_path_factory.mktemp("toy")
    make_toy_video(root / "mevis", seed=3, train_videos=4, valid_videos=2, verbose=False)
    make_toy_image(root / "refcoco", seed=5, train_images=6, val_images=2, test_images=1,
                   verbose=False)
    return root


class OneImage:
    """A RefCOCO reader's interface (samples, load) around one image: dark blue, with a red L
    shape left of the middle as the referred object."""

    def __init__(self):
        self.mask = torch.zeros(90, 150, dtype=torch.bool)  # (H0, W0)
        self.mask[20:70, 15:30] = True
        self.mask[55:70, 15:50] = True
        self.image = torch.tensor([20, 30, 160], dtype=torch.uint8)[:, None, None].repeat(1, 90, 150)
        self.image[:, self.mask] = torch.tensor([230, 10, 10], dtype=torch.uint8)[:, None]
        self.samples = [{"file_name": "COCO_train2014_000000000007.png", "sent_id": 11,
                         "ann_id": 5, "expression": "the red shape on the left"}]

    def __len__(self):
        return 1

    def load(self, index):
        return self.image, self.mask


def red_pixels(frames):
    rgb = torch.from_numpy(denormalize(frames, mean=IMAGENET_MEAN, std=IMAGENET_STD)).float()
    return (rgb[..., 0] > 120) & (rgb[..., 2] < 90)  # (T, H, W)


def inner(mask):
    """Pixels whose 3x3 neighbourhood lies wholly inside `mask` (T, H, W)."""
    return -F.max_pool2d(-mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5


# ---------------------------------------------------------------------------------- PseudoVideo
def test_masks_take_the_frames_transforms():
    """In every frame of every clip the mask lies on the red L: its inner pixels are red, the inner
    pixels outside it are not (only the 1-pixel band where bilinear and nearest sampling differ is
    left out). The clips move (rotation, pan), come with and without the crop and flipped or not,
    the flip swapping left/right in the expression."""
    dataset = PseudoVideo([OneImage()], num_frames=5, short_side=60, max_size=100, seed=0)
    sizes, sides = set(), set()
    for seed in range(16):
        torch.manual_seed(seed)
        item = dataset[0]
        frames, masks = item["frames"], item["masks"]  # (T, 3, H, W), (1, T, H, W)
        assert frames.shape[0] == 5 and masks.shape == (1, 5, *frames.shape[-2:])
        red, mask = red_pixels(frames), masks[0]
        assert red[inner(mask)].all() and not red[inner(~mask)].any(), seed
        assert mask.flatten(1).any(1).all()
        assert any(not torch.equal(mask[0], mask[t]) for t in range(1, 5))  # the object moves
        sizes.add(tuple(frames.shape[-2:]))
        x = mask.nonzero()[:, 2].float().mean() / mask.shape[-1]  # centre, a fraction of W
        side = item["expression"].split()[-1]
        assert (x < 0.5) == (side == "left"), (seed, float(x), item["expression"])
        sides.add(side)
    assert (60, 100) in sizes and len(sizes) > 1  # the whole image, and crops of other shapes
    assert sides == {"left", "right"}


def test_items_are_video_reader_items_and_reproducible(toy):
    videos = MeViS(toy / "mevis", "train", train=True, num_frames=4, short_side=64, max_size=96)
    cfg = parse_config(dshmp.Config, dshmp.PRESETS, ["--data", "toy-refcoco", "--train"])
    images = pseudo_videos(cfg, ["toy-refcoco"], toy / "refcoco", seed=0)
    torch.manual_seed(0)
    item, video_item = images[3], videos[0]
    assert set(item) == set(video_item)
    T, H, W = 4, *item["frames"].shape[-2:]
    assert item["frames"].shape == (T, 3, H, W) and item["frames"].dtype == torch.float32
    assert item["masks"].shape == (1, T, H, W) and item["masks"].dtype == torch.bool
    assert item["frame_idx"].tolist() == list(range(T)) and item["index"] == 3
    sample = images.samples[3]
    assert {k: sample[k] for k in ("video", "exp_id", "obj_ids")} == \
        {k: item[k] for k in ("video", "exp_id", "obj_ids")}
    assert item["expression"] in (sample["expression"], swap_left_right(sample["expression"]))
    batch = collate_video([item, video_item])
    assert batch["frames"].shape[:3] == (2, T, 3) and len(batch["targets"]) == 2
    torch.manual_seed(0)
    again = images[3]
    assert torch.equal(again["frames"], item["frames"]) and torch.equal(again["masks"], item["masks"])
    torch.manual_seed(0)
    other = pseudo_videos(cfg, ["toy-refcoco"], toy / "refcoco", seed=1)[3]  # another data seed
    assert not torch.equal(other["frames"], item["frames"])


def test_a_missing_refcoco_tree_names_it_and_data_readme(toy, tmp_path):
    cfg = parse_config(dmvs.Config, dmvs.PRESETS,
                       ["--data", "toy", "--pseudo-videos", "refcoco+,refcocog", "--refer-root",
                        str(tmp_path / "nowhere"), "--train"])
    with pytest.raises(FileNotFoundError, match="data/README.md") as error:
        dmvs.make_dataset(cfg, toy / "mevis", "train", train=True)
    assert str(tmp_path / "nowhere") in str(error.value) and "refcoco+" in str(error.value)
    with pytest.raises(SystemExit, match="dmvs: pseudo-videos of refcoco.*data/README.md"):
        dmvs.main(["--data", "toy", "--data-root", str(toy / "mevis"), "--out", str(tmp_path),
                   "--pseudo-videos", "refcoco+", "--refer-root", str(tmp_path), "--train"])
    with pytest.raises(SystemExit, match="unknown refer set"):
        pseudo_videos(cfg, ["refcoco-"], toy / "refcoco", seed=0)


# ---------------------------------------------------------------------------------- the mix
def test_dmvs_mixes_videos_and_pseudo_videos_at_the_ratio(toy):
    """VITA's DATASET_RATIO [1.0 (images), r (videos)]: every epoch of the sampled stream holds each
    video expression once and len(videos) / r pseudo-videos, drawn from the image set."""
    cfg = parse_config(dmvs.Config, dmvs.PRESETS,
                       ["--data", "toy", "--pseudo-videos", "toy-refcoco", "--refer-root",
                        str(toy / "refcoco"), "--video-ratio", "0.5", "--num-frames", "2",
                        "--train"])
    assert parse_config(dmvs.Config, dmvs.PRESETS, ["--data", "ytvos", "--train"]).pseudo_videos \
        == "refcoco+,refcocog"  # Sec. 4.2 (the toy default stays without them)
    dataset = dmvs.make_dataset(cfg, toy / "mevis", "train", train=True)
    videos, images = dataset.datasets
    assert isinstance(dataset, MixedClips) and isinstance(images, PseudoVideo)
    n = len(videos)
    assert len(dataset) == 3 * n and dataset.samples == videos.samples + images.samples
    torch.manual_seed(0)
    batches = train_batches(dataset, batch_size=1, collate=collate_video,
                            ddp=setup_distributed(device="cpu"), seed=0, workers=0)
    for epoch in range(2):
        indices = [next(batches)["index"][0] for _ in range(len(dataset))]
        from_videos = sorted(i for i in indices if i < n)
        assert from_videos == list(range(n)), epoch  # every video expression once
        assert len(indices) - len(from_videos) == 2 * n  # 1.0 : 0.5
        assert all(n <= i < len(dataset.samples) for i in indices if i >= n)
    # the vocabulary of a toy run (dmvs.train's toy_vocab) covers the image set's own words too
    image_words = set(build_vocab([s["expression"] for s in images.samples]))
    video_words = set(build_vocab([s["expression"] for s in videos.samples]))
    assert image_words - video_words
    assert image_words <= set(toy_vocab(cfg, dataset.samples, toy / "mevis"))


def test_mixed_clips_checks_its_ratios():
    with pytest.raises(ValueError, match="one ratio per dataset"):
        MixedClips([range(3)], [1.0, 2.0])
    with pytest.raises(ValueError, match="the first > 0"):
        MixedClips([range(3), range(2)], [0.0, 1.0])


# ---------------------------------------------------------------------------------- --init
def test_init_weights_loads_the_model_or_says_what_does_not_fit(tmp_path):
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_checkpoint(tmp_path / "last.pt", model=trained, optimizer=None, step=7, config={})
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert not torch.equal(fresh[0].weight, trained[0].weight)
    assert init_weights("", fresh) is fresh and not torch.equal(fresh[0].weight, trained[0].weight)
    assert init_weights(tmp_path / "last.pt", fresh) is fresh
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 trained.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        init_weights(tmp_path / "nowhere.pt", fresh)
    with pytest.raises(CheckpointError, match=r"of another shape \(e.g. 1.weight \[2, 4\] for "
                                              r"\[3, 4\]\)"):
        init_weights(tmp_path / "last.pt", nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3)))
    with pytest.raises(CheckpointError, match=r"2 unexpected \(e.g. 1.weight\)"):
        init_weights(tmp_path / "last.pt", nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(SystemExit):  # --init starts training; --eval takes --checkpoint
        parse_config(dshmp.Config, dshmp.PRESETS, ["--data", "toy", "--eval", "--init", "x.pt"])


def test_dshmp_pretrains_on_toy_images_then_starts_the_video_stage_from_it(toy, tmp_path,
                                                                           monkeypatch, capsys):
    pre, main = tmp_path / "pre", tmp_path / "main"
    dshmp.main(["--data", "toy-refcoco", "--data-root", str(toy / "refcoco"), "--out", str(pre),
                *TOY, "--steps", "2", "--train"])
    assert "--init" in capsys.readouterr().out and not (pre / "eval.json").exists()
    pretrained = read_checkpoint(pre / "last.pt")
    assert pretrained["step"] == 2 and pretrained["config"]["data"] == "toy-refcoco"
    video_words = build_vocab([s["expression"]
                               for s in MeViS(toy / "mevis", "train", train=False).samples])
    assert set(video_words) <= set(pretrained["extra"]["vocab"])  # the next stage's words too
    started = []
    real = dshmp.init_weights
    monkeypatch.setattr(dshmp, "init_weights", lambda path, model: started.append(
        {k: v.clone() for k, v in real(path, model).state_dict().items()}) or model)
    args = ["--data", "toy", "--data-root", str(toy / "mevis"), "--out", str(main), *TOY,
            "--steps", "2", "--train", "--init", str(pre / "last.pt")]
    dshmp.main(args)
    assert all(torch.equal(started[0][k], v) for k, v in pretrained["model"].items())
    finished = read_checkpoint(main / "last.pt")
    assert finished["step"] == 2 and finished["extra"]["vocab"] == pretrained["extra"]["vocab"]
    assert json.loads((main / "eval.json").read_text())["n"] > 0
    with pytest.raises(SystemExit, match="dshmp: --init .* does not fit this model"):
        dshmp.main([*args, "--hmp-blocks", "2"])


def test_an_object_in_no_frame_ends_with_a_clear_error():
    """A clip is drawn again while its mask is empty in every frame, max_tries times."""
    reader = OneImage()
    reader.mask = torch.zeros_like(reader.mask)
    dataset = PseudoVideo([reader], num_frames=2, short_side=30, max_size=50)
    dataset.max_tries = 3
    with pytest.raises(RuntimeError, match="no pixel of object 5 in any frame of 3 clips"):
        dataset[0]
