"""Tests for common/datasets.py: the COCO RLE codec against pycocotools' strings, the readers on small
trees written in each real layout, transforms, clip sampling, collate and the bad-input messages."""
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.coco_mask import polygons_to_mask, rle_decode, rle_encode, rle_has_pixels
from common.datasets import (
    IMAGENET_MEAN, IMAGENET_STD, MeViS, RefCOCO, RefDAVIS17, RefYouTubeVOS, YouTubeVIS, collate_image,
    collate_video, collate_vis, decode_segmentation, sample_clip, swap_left_right,
)

FIXTURES = Path(__file__).parent / "fixtures"
H0, W0 = 48, 64  # original frame size of the synthetic trees; short_side=24 halves it exactly


def gray_frame(level: int, stripe: bool = True) -> np.ndarray:
    """A flat frame with a bright stripe on its left edge, so a horizontal flip is visible."""
    frame = np.full((H0, W0, 3), level, dtype=np.uint8)
    if stripe:
        frame[:, :8] = 250
    return frame


def box(top, bottom, left, right, size=(H0, W0)) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def write_jpeg(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def read_normalised(path: Path) -> torch.Tensor:
    """Independent expectation for a frame read without resizing: PIL -> [0, 1] -> ImageNet stats."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)).float()


def denormalise(frames: torch.Tensor) -> torch.Tensor:
    return frames * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


# ---------------------------------------------------------------- COCO RLE codec

def test_rle_codec_matches_pycocotools_cases():
    about = json.loads((FIXTURES / "coco_rle_cases.json").read_text())
    assert "pycocotools" in about["about"]
    masks = np.load(FIXTURES / "coco_rle_cases.npz")
    for case in about["cases"]:
        mask = masks[case["name"]]
        decoded = rle_decode({"size": case["size"], "counts": case["counts"]})
        assert decoded.dtype == np.uint8 and decoded.shape == tuple(case["size"]), case["name"]
        assert np.array_equal(decoded, mask.astype(np.uint8)), case["name"]
        assert int(decoded.sum()) == case["area"], case["name"]
        assert rle_decode({"size": case["size"], "counts": case["counts"].encode()}).tolist() == decoded.tolist()
        assert rle_encode(mask) == {"size": case["size"], "counts": case["counts"]}, case["name"]
        assert rle_has_pixels({"size": case["size"], "counts": case["counts"]}) == (case["area"] > 0), case["name"]


def test_rle_uncompressed_counts_and_errors():
    # column-major runs: 1 zero, 2 ones, 3 zeros in a 2x3 mask -> column 0 = [0, 1], column 1 = [1, 0]
    mask = rle_decode({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert rle_has_pixels({"size": [2, 3], "counts": [6]}) is False
    assert rle_has_pixels(None) is False
    with pytest.raises(ValueError, match=r"sum to 5, expected h\*w = 2\*3 = 6"):
        rle_decode({"size": [2, 3], "counts": [1, 2, 2]})
    with pytest.raises(ValueError, match="malformed COCO RLE counts string"):
        rle_decode({"size": [2, 3], "counts": "\x01\x02"})
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        rle_decode({"counts": "S1"})


def test_polygons_to_mask_follows_coco_box_convention():
    # pycocotools rasterises the box polygon x0..x1, y0..y1 to columns [x0, x1) and rows [y0, y1)
    # (area (x1-x0)*(y1-y0), the convention of COCO's bbox areas)
    mask = polygons_to_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 8, 8)
    assert mask.dtype == np.uint8
    assert np.array_equal(mask, box(1, 4, 1, 5, size=(8, 8)))
    two = polygons_to_mask([[1, 1, 5, 1, 5, 4, 1, 4], [6, 5, 8, 5, 8, 8, 6, 8]], 8, 8)
    assert np.array_equal(two, box(1, 4, 1, 5, size=(8, 8)) | box(5, 8, 6, 8, size=(8, 8)))
    # the same box given clockwise instead of counter-clockwise
    assert np.array_equal(polygons_to_mask([[1, 1, 1, 4, 5, 4, 5, 1]], 8, 8), mask)
    # a pycocotools unit test: frPyObjects([[0, 0, 0, 10, 10, 10, 10, 0]], 10, 10) encodes an all-ones mask
    assert polygons_to_mask([[0, 0, 0, 10, 10, 10, 10, 0]], 10, 10).all()
    # traced by hand through maskApi.c rleFrPoly: vertices snap to (5,5)-(17,13) on the 5x grid, the
    # top edge toggles columns 1 and 2 at row ceil(0.6) = 1, the bottom edge at row ceil(2.2) = 3
    assert np.array_equal(polygons_to_mask([[0.9, 0.9, 3.3, 0.9, 3.3, 2.6, 0.9, 2.6]], 5, 5), box(1, 3, 1, 3, size=(5, 5)))


def test_swap_left_right():
    assert swap_left_right("the leftmost dog on the left of the right car") == \
        "the rightmost dog on the right of the left car"
    assert swap_left_right("bright light, leftover food, moving rightward") == \
        "bright light, leftover food, moving leftward"
    assert swap_left_right("left-hand side") == "right-hand side"
    assert swap_left_right("Left dog, RIGHT cat, Rightmost bird") == "Right dog, LEFT cat, Leftmost bird"


def test_sample_clip_rules():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        clip = sample_clip(40, num_frames=6, frame_range=5, generator=g)
        assert clip == sorted(clip) and len(clip) == 6 and len(set(clip)) == 6  # >= 5 candidates: no repeats
        assert any(all(abs(f - ref) <= 5 for f in clip) for ref in clip)  # all within +-5 of a reference
    seen = set()
    for _ in range(50):  # 3-frame video: 2 candidates for 7 slots -> drawn with replacement
        clip = sample_clip(3, num_frames=8, frame_range=5, generator=g)
        assert len(clip) == 8 and set(clip) <= {0, 1, 2} and clip == sorted(clip)
        seen |= set(clip)
    assert seen == {0, 1, 2}
    assert sample_clip(1, num_frames=4, frame_range=10, generator=g) == [0, 0, 0, 0]


# ---------------------------------------------------------------- MeViS

FRAME_NAMES = [f"{i:05d}" for i in range(6)]


def write_mevis(root: Path, split="train", masks=True) -> Path:
    """v1: 6 frames (listed out of order), 2 objects; v2: 30 frames, object visible in frame 25 only."""
    split_dir = root / split
    for t, name in enumerate(FRAME_NAMES):
        write_jpeg(split_dir / "JPEGImages" / "v1" / f"{name}.jpg", gray_frame(30 * t + 20))
    for t in range(30):
        write_jpeg(split_dir / "JPEGImages" / "v2" / f"{t:05d}.jpg", gray_frame(100, stripe=False))
    dog = [rle_encode(box(8, 16, 16, 32)) if t != 2 else None for t in range(6)]  # absent in frame 2
    cat = [rle_encode(box(24, 40, 0, 16)) if t >= 3 else None for t in range(6)]  # enters at frame 3
    mask_dict = {"10": dog, "11": cat, "12": [None] * 6, "13": [rle_encode(np.zeros((H0, W0)))] * 6,
                 "20": [rle_encode(box(0, 8, 0, 8)) if t == 25 else None for t in range(30)]}
    shuffled = [FRAME_NAMES[i] for i in (3, 0, 5, 1, 4, 2)]
    exp = lambda text, objs, annos: {"exp": text, "obj_id": objs, "anno_id": annos} if masks else {"exp": text}
    meta = {"videos": {
        "v1": {"frames": shuffled, "expressions": {
            "0": exp("The  Dog on the LEFT", ["0"], [10]),
            "1": exp("two animals", [0, 1], ["10", "11"]),
            "2": exp("a ghost", [2], [12]),
            "3": exp("an empty mask", [3], [13]),
        }},
        "v2": {"frames": [f"{t:05d}" for t in range(30)], "expressions": {"0": exp("rare flash", [0], [20])}},
    }}
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "meta_expressions.json").write_text(json.dumps(meta))
    if masks:
        (split_dir / "mask_dict.json").write_text(json.dumps(mask_dict))
    return root


def index_of(dataset, video, exp_id):
    return next(i for i, s in enumerate(dataset.samples) if (s["video"], s["exp_id"]) == (video, exp_id))


def item_for(dataset, video, exp_id):
    index = index_of(dataset, video, exp_id)
    return index, dataset[index]


def test_mevis_samples_and_skipping(tmp_path):
    root = write_mevis(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 training expressions .*'v1'"):
        train = MeViS(root, "train", train=True)
    assert [(s["video"], s["exp_id"]) for s in train.samples] == [("v1", "0"), ("v1", "1"), ("v2", "0")]
    s = train.samples[1]
    assert s == {"video": "v1", "exp_id": "1", "expression": "two animals", "obj_ids": [0, 1],
                 "anno_ids": ["10", "11"], "frames": FRAME_NAMES}
    assert train.samples[0]["expression"] == "the dog on the left" and train.samples[0]["obj_ids"] == [0]
    evaluation = MeViS(root, "train", train=False)  # targets never visible are kept for evaluation
    assert len(evaluation) == 5


def test_mevis_train_item(tmp_path):
    root = write_mevis(tmp_path)
    with pytest.warns(UserWarning):
        ds = MeViS(root, "train", train=True, num_frames=6, frame_range=10, short_side=24, flip=False)
    index, item = item_for(ds, "v1", "1")
    assert set(item) == {"frames", "masks", "expression", "video", "exp_id", "frame_idx", "obj_ids", "index",
                         "orig_size"}
    assert item["frames"].shape == (6, 3, 24, 32) and item["frames"].dtype == torch.float32
    assert item["frame_idx"].tolist() == [0, 1, 2, 3, 4, 5] and item["frame_idx"].dtype == torch.long
    # frame t has grey level 30t+20 away from the stripe: the right frame was read, in sorted order
    levels = denormalise(item["frames"])[:, :, :, 8:].mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(levels, torch.tensor([30.0 * t + 20 for t in range(6)]), atol=2)
    assert item["masks"].shape == (2, 6, 24, 32) and item["masks"].dtype == torch.bool
    dog = torch.from_numpy(box(4, 8, 8, 16, size=(24, 32))).bool()  # the boxes at half resolution
    cat = torch.from_numpy(box(12, 20, 0, 8, size=(24, 32))).bool()
    for t in range(6):
        assert torch.equal(item["masks"][0, t], dog if t != 2 else torch.zeros_like(dog)), t
        assert torch.equal(item["masks"][1, t], cat if t >= 3 else torch.zeros_like(cat)), t
    assert (item["expression"], item["video"], item["exp_id"], item["obj_ids"], item["index"], item["orig_size"]) == \
        ("two animals", "v1", "1", [0, 1], index, (48, 64))


def test_mevis_flip_swaps_words_and_pixels(tmp_path):
    root = write_mevis(tmp_path)
    with pytest.warns(UserWarning):
        ds = MeViS(root, "train", train=True, num_frames=6, short_side=24, flip=True, seed=3)
    index = index_of(ds, "v1", "0")
    seen = set()
    for _ in range(30):
        item = ds[index]
        flipped = item["expression"] == "the dog on the right"
        assert flipped or item["expression"] == "the dog on the left"
        stripe = denormalise(item["frames"])[:, :, :, 28:] if flipped else denormalise(item["frames"])[:, :, :, :4]
        assert stripe.mean() > 0.9  # the bright stripe moved to the right edge exactly when the text was swapped
        cols = torch.nonzero(item["masks"][0].any(dim=(0, 1))).flatten()
        assert (cols.min().item(), cols.max().item()) == ((16, 23) if flipped else (8, 15))
        seen.add(flipped)
    assert seen == {True, False}


def test_mevis_resamples_until_target_visible(tmp_path):
    root = write_mevis(tmp_path)
    with pytest.warns(UserWarning):
        ds = MeViS(root, "train", train=True, num_frames=3, frame_range=2, short_side=24, flip=False)
    index = index_of(ds, "v2", "0")
    for _ in range(10):
        item = ds[index]
        clip = item["frame_idx"].tolist()
        assert 25 in clip and clip == sorted(clip) and len(set(clip)) == 3
        assert any(all(abs(f - ref) <= 2 for f in clip) for ref in clip)
        assert item["masks"][0, clip.index(25)].sum() == 16 and item["masks"].sum() == 16
    ds.max_tries = 0
    with pytest.raises(RuntimeError, match=r"'v2', exp_id '0' \(visible at full size in 1 of 30 frames\)"):
        ds[index]


def test_mevis_clips_are_reproducible(tmp_path):
    root = write_mevis(tmp_path)
    with pytest.warns(UserWarning):
        ds = MeViS(root, "train", train=True, num_frames=3, frame_range=2, short_side=24)

    def clips(seed, workers):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_video)
        return [(b["frame_idx"][0].tolist(), b["expression"][0]) for b in loader]

    assert clips(0, 2) == clips(0, 2)
    assert clips(0, 0) == clips(0, 0)
    reference = clips(0, 0)
    assert clips(1, 0) != reference
    ds.seed = 7
    assert clips(0, 0) != reference


def test_mevis_eval_items(tmp_path):
    root = write_mevis(tmp_path)
    ds = MeViS(root, "train", train=False, short_side=24)
    index, item = item_for(ds, "v1", "1")
    assert set(item) == {"frames", "gt", "orig_size", "frame_names", "expression", "video", "exp_id", "index"}
    assert item["frames"].shape == (6, 3, 24, 32)
    assert item["gt"].shape == (6, 48, 64) and item["gt"].dtype == torch.bool
    for t in range(6):
        union = box(8, 16, 16, 32) * (t != 2) | box(24, 40, 0, 16) * (t >= 3)
        assert np.array_equal(item["gt"][t].numpy(), union.astype(bool)), t
    assert item["frame_names"] == FRAME_NAMES and item["orig_size"] == (48, 64)
    assert (item["expression"], item["video"], item["exp_id"], item["index"]) == ("two animals", "v1", "1", index)
    # an unresized item equals PIL's decoding, normalised with the ImageNet statistics
    full = MeViS(root, "train", train=False, short_side=48, max_size=64)[index]
    assert full["frames"].shape == (6, 3, 48, 64)
    assert torch.allclose(full["frames"][4], read_normalised(root / "train/JPEGImages/v1/00004.jpg"), atol=1e-5)
    _, ghost = item_for(ds, "v1", "2")
    assert ghost["gt"].shape == (6, 48, 64) and not ghost["gt"].any()
    _, flash = item_for(ds, "v2", "0")  # 30 frames: longer than one 16-frame chunk of the union
    assert flash["gt"].shape == (30, 48, 64)
    assert flash["gt"].flatten(1).sum(1).tolist() == [64 if t == 25 else 0 for t in range(30)]


def test_mevis_valid_split_without_masks(tmp_path):
    root = write_mevis(tmp_path, split="valid", masks=False)
    ds = MeViS(root, "valid", train=False, short_side=24)
    assert len(ds) == 5 and ds.samples[0]["obj_ids"] == [] and ds.samples[0]["anno_ids"] == []
    item = ds[0]
    assert item["gt"] is None and item["frames"].shape == (6, 3, 24, 32)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "valid" / "mask_dict.json"))):
        MeViS(root, "valid", train=True)


@pytest.mark.filterwarnings("ignore:MeViS. skipped")
def test_mevis_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        MeViS(tmp_path / "nowhere", "train", train=True)
    root = write_mevis(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "valid_u"))):
        MeViS(root, "valid_u", train=False)
    meta_path = root / "train" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())

    def expect(error, pattern):
        with pytest.raises(error, match=pattern):
            MeViS(root, "train", train=True)

    meta_path.write_text(json.dumps({"vids": meta["videos"]}))
    expect(KeyError, re.escape(str(meta_path)) + ".*'videos'")
    bad = json.loads(json.dumps(meta))
    del bad["videos"]["v1"]["expressions"]["1"]["exp"]
    meta_path.write_text(json.dumps(bad))
    expect(KeyError, re.escape(str(meta_path)) + r".*'exp'.*\['v1'\]")
    bad = json.loads(json.dumps(meta))
    bad["videos"]["v1"]["expressions"]["1"]["anno_id"] = [99]
    meta_path.write_text(json.dumps(bad))
    expect(KeyError, re.escape(str(root / "train" / "mask_dict.json")) + ".*'99'")
    bad["videos"]["v9"] = bad["videos"].pop("v1")
    meta_path.write_text(json.dumps(bad))
    expect(FileNotFoundError, re.escape(str(root / "train" / "JPEGImages" / "v9")))
    meta_path.unlink()
    expect(FileNotFoundError, re.escape(str(meta_path)))
    meta_path.write_text(json.dumps(meta))

    mask_path = root / "train" / "mask_dict.json"
    masks = json.loads(mask_path.read_text())
    mask_path.write_text(json.dumps({**masks, "11": masks["11"][:4]}))
    expect(ValueError, re.escape(str(mask_path)) + r".*'11'.*one RLE or null per frame of video 'v1' \(6\), got 4")
    mask_path.write_text(json.dumps({**masks, "11": [None, None, None, {"size": [48, 64], "counts": [5, 5]}, None, None]}))
    ds = MeViS(root, "train", train=False)
    with pytest.raises(ValueError, match=re.escape(f"{mask_path}['11'][3]") + ".*sum to 10"):
        ds[index_of(ds, "v1", "1")]
    mask_path.write_text(json.dumps(masks))
    # a frame the metadata lists but the disk lacks is found when the dataset is built, not when read
    (root / "train" / "JPEGImages" / "v1" / "00004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 frames .* video 'v1' .*00004\.jpg"):
        MeViS(root, "train", train=False)


def write_json_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_bad_annotation_files_name_themselves(tmp_path):
    root = write_mevis(tmp_path / "m")
    meta_path = root / "train" / "meta_expressions.json"
    meta_path.write_text(meta_path.read_text()[:50])  # a truncated download
    with pytest.raises(ValueError, match=re.escape(str(meta_path)) + ".*not valid JSON"):
        MeViS(root, "train", train=False)
    refs_root, images = write_refcoco(tmp_path / "r")
    refs_path = refs_root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(refs_path.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(str(refs_path)) + ".*not a readable pickle"):
        RefCOCO(refs_root, images, split="train", train=False)


@pytest.mark.parametrize("text", ["", "   ", None, 7])
def test_empty_expressions_are_errors_that_name_the_video(tmp_path, text):
    root = write_mevis(tmp_path)
    meta_path = root / "train" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["v1"]["expressions"]["1"]["exp"] = text
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['v1'\]\['expressions'\]\['1'\] has an empty expression"):
        MeViS(root, "train", train=False)


def test_scalar_ids_and_refs_without_sentences(tmp_path):
    root = write_mevis(tmp_path / "m")
    meta_path = root / "train" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["v1"]["expressions"]["0"].update(obj_id=0, anno_id=10)  # one id, not a list
    meta_path.write_text(json.dumps(meta))
    sample = MeViS(root, "train", train=False).samples[0]
    assert (sample["obj_ids"], sample["anno_ids"]) == ([0], ["10"])
    refs_root, images = write_refcoco(tmp_path / "r")
    refs_path = refs_root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[1]["sentences"] = []
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.warns(UserWarning, match=r"skipped 1 refs of split 'train' with no sentences .*ref_id 1"):
        ds = RefCOCO(refs_root, images, split="train", train=False)
    assert [s["ref_id"] for s in ds.samples] == [0, 0, 2]


def test_valid_u_needs_its_masks_and_valid_does_not(tmp_path):
    root = write_mevis(tmp_path, split="valid_u", masks=False)
    with pytest.raises(FileNotFoundError, match=r"split 'valid_u' needs masks, expected .*valid_u.mask_dict\.json"):
        MeViS(root, "valid_u", train=False)
    root = write_mevis(tmp_path, split="valid", masks=False)
    assert MeViS(root, "valid", train=False)[0]["gt"] is None


def test_a_tiny_target_is_redrawn_until_it_survives_the_resize(tmp_path):
    """A 2x2 target at full size vanishes when 72x96 frames shrink to 12x16; the clip is drawn again
    until a frame where the target is large enough is in it (the official loader checks visibility
    after resizing)."""
    split_dir = tmp_path / "train"
    tiny, big = np.zeros((72, 96), np.uint8), np.zeros((72, 96), np.uint8)
    tiny[1:3, 1:3] = 1  # between the pixels that nearest and nearest-exact sample at scale 1/6
    big[24:48, 24:48] = 1
    for t in range(6):
        write_jpeg(split_dir / "JPEGImages" / "v" / f"{t:05d}.jpg", np.full((72, 96, 3), 90, np.uint8))
    masks = {"1": [rle_encode(big if t == 5 else tiny) for t in range(6)], "2": [rle_encode(tiny)] * 6}
    meta = {"videos": {"v": {"frames": [f"{t:05d}" for t in range(6)], "expressions": {
        "0": {"exp": "the dot", "obj_id": [1], "anno_id": [1]},
        "1": {"exp": "the speck", "obj_id": [2], "anno_id": [2]}}}}}
    (split_dir / "meta_expressions.json").write_text(json.dumps(meta))
    (split_dir / "mask_dict.json").write_text(json.dumps(masks))
    ds = MeViS(tmp_path, "train", train=True, num_frames=2, frame_range=2, short_side=12, max_size=16, flip=False)
    torch.manual_seed(0)
    for _ in range(10):
        item = ds[0]
        assert item["masks"].any() and 5 in item["frame_idx"].tolist()
    with pytest.raises(RuntimeError, match="no target pixel left after resizing .*'v', exp_id '1'"):
        ds[1]  # never large enough


def test_masks_stay_aligned_with_the_frames_when_resized():
    """nearest-exact samples pixel centres, as the frames' bilinear resize does; plain nearest
    shifts a mask by up to a pixel. A 4x4 block at (4, 4) of a 16x16 frame halves to (2, 2)."""
    from common.datasets import resize_clip
    frames = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    frames[..., 4:8, 4:8] = 255
    masks = (frames[:, :1] > 0)[None, :, 0]  # (1, 1, 16, 16)
    small_frames, small_masks = resize_clip(frames, masks, short_side=8, max_size=8)
    bright = small_frames[0, 0] > 127
    assert torch.equal(small_masks[0, 0], bright) and bright[2:4, 2:4].all() and bright.sum() == 4


def test_one_frame_videos_are_skipped_in_training(tmp_path):
    root = write_mevis(tmp_path)
    split_dir = root / "train"
    write_jpeg(split_dir / "JPEGImages" / "v3" / "00000.jpg", gray_frame(50))
    meta = json.loads((split_dir / "meta_expressions.json").read_text())
    masks = json.loads((split_dir / "mask_dict.json").read_text())
    meta["videos"]["v3"] = {"frames": ["00000"], "expressions": {"0": {"exp": "a still", "obj_id": [0],
                                                                      "anno_id": ["30"]}}}
    masks["30"] = [rle_encode(box(0, 8, 0, 8))]
    (split_dir / "meta_expressions.json").write_text(json.dumps(meta))
    (split_dir / "mask_dict.json").write_text(json.dumps(masks))
    with pytest.warns(UserWarning) as caught:
        train = MeViS(root, "train", train=True)
    assert any(re.search(r"skipped 1 training expressions of videos with a single frame .*'v3'", str(w.message))
               for w in caught)
    assert "v3" not in {s["video"] for s in train.samples}
    assert "v3" in {s["video"] for s in MeViS(root, "train", train=False).samples}  # evaluation keeps it


# ---------------------------------------------------------------- Ref-YouTube-VOS / Ref-DAVIS17

def write_palette_png(path: Path, ids: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(ids.astype(np.uint8), mode="L")
    png.putpalette([v for i in range(256) for v in (i * 40 % 256, i * 90 % 256, i * 160 % 256)])
    png.save(path)


def write_palette_tree(root: Path, split="train", annotations=True, frame_lists=True) -> Path:
    """Video "a": 4 frames; object 1 in every frame, object 2 in frames 2-3; object 3 never appears."""
    names = ["00000", "00005", "00010", "00015"]
    for t, name in enumerate(names):
        write_jpeg(root / split / "JPEGImages" / "a" / f"{name}.jpg", gray_frame(40 * t + 30))
        if annotations:
            write_palette_png(root / split / "Annotations" / "a" / f"{name}.png",
                              box(0, 16, 32, 64) * 1 + (box(32, 48, 0, 16) * 2 if t >= 2 else 0))
    meta = {"videos": {"a": {"frames": names[::-1], "expressions": {
        "0": {"exp": "A Cat jumping", "obj_id": "1"},
        "1": {"exp": "the dog on the right", "obj_id": "2"},
        "2": {"exp": "nobody", "obj_id": "3"},
    }}}}
    (root / "meta_expressions" / split).mkdir(parents=True, exist_ok=True)
    (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))
    if frame_lists:
        objects = {"videos": {"a": {"objects": {"1": {"category": "cat", "frames": names},
                                                "2": {"category": "dog", "frames": names[2:]},
                                                "3": {"category": "ghost", "frames": []}}}}}
        (root / split / "meta.json").write_text(json.dumps(objects))
    return root


def test_ytvos_valid_keeps_only_the_valid_videos(tmp_path, capsys):
    """The release's valid expression file also lists the test videos; as ReferFormer, they go."""
    root = write_palette_tree(tmp_path, split="valid", annotations=False)
    meta_path = root / "meta_expressions" / "valid" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["t"] = {"frames": ["00000"], "expressions": {"0": {"exp": "a test video"}}}
    meta_path.write_text(json.dumps(meta))  # its frames are not on disk, as in the release
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "meta_expressions" / "test"))):
        RefYouTubeVOS(root, "valid", train=False)
    write_json_text(root / "meta_expressions" / "test" / "meta_expressions.json",
                    json.dumps({"videos": {"t": meta["videos"]["t"]}}))
    ds = RefYouTubeVOS(root, "valid", train=False, short_side=24)
    assert {s["video"] for s in ds.samples} == {"a"} and ds[0]["gt"] is None
    assert "valid keeps 1 of the 2 videos" in capsys.readouterr().out


@pytest.mark.parametrize("reader, frame_lists", [(RefYouTubeVOS, True), (RefDAVIS17, False)])
def test_palette_readers(tmp_path, reader, frame_lists):
    root = write_palette_tree(tmp_path, frame_lists=frame_lists)
    with pytest.warns(UserWarning, match=r"skipped 1 training expressions .*exp_id '2'"):
        ds = reader(root, "train", train=True, num_frames=4, short_side=24, flip=False)
    assert [s["exp_id"] for s in ds.samples] == ["0", "1"]
    assert ds.samples[1] == {"video": "a", "exp_id": "1", "expression": "the dog on the right", "obj_ids": [2],
                             "anno_ids": ["2"], "frames": ["00000", "00005", "00010", "00015"]}
    item = ds[1]
    assert item["frame_idx"].tolist() == [0, 1, 2, 3] and item["obj_ids"] == [2]
    assert item["frames"].shape == (4, 3, 24, 32) and item["masks"].shape == (1, 4, 24, 32)
    dog = torch.from_numpy(box(16, 24, 0, 8, size=(24, 32))).bool()
    for t in range(4):
        assert torch.equal(item["masks"][0, t], dog if t >= 2 else torch.zeros_like(dog)), t
    levels = denormalise(item["frames"])[:, :, :, 8:].mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(levels, torch.tensor([30.0, 70, 110, 150]), atol=2)
    evaluation = reader(root, "train", train=False, short_side=24)
    assert len(evaluation) == 3
    item = evaluation[0]
    assert item["expression"] == "a cat jumping" and item["gt"].shape == (4, 48, 64)
    assert all(np.array_equal(item["gt"][t].numpy(), box(0, 16, 32, 64).astype(bool)) for t in range(4))


def test_palette_valid_split_and_bad_inputs(tmp_path):
    root = write_palette_tree(tmp_path, split="valid", annotations=False, frame_lists=False)
    write_json_text(root / "meta_expressions" / "test" / "meta_expressions.json", json.dumps({"videos": {}}))
    item = RefYouTubeVOS(root, "valid", train=False, short_side=24)[1]
    assert item["gt"] is None and item["frames"].shape == (4, 3, 24, 32) and item["exp_id"] == "1"
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "valid" / "Annotations"))):
        RefYouTubeVOS(root, "valid", train=True)
    missing = root / "meta_expressions" / "train" / "meta_expressions.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        RefDAVIS17(root, "train", train=False)
    root = write_palette_tree(tmp_path / "t")
    (root / "train" / "Annotations" / "a" / "00010.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "train" / "Annotations" / "a" / "00010.png"))):
        RefYouTubeVOS(root, "train", train=False)[0]
    Image.fromarray(np.zeros((H0, W0, 3), dtype=np.uint8)).save(root / "train" / "Annotations" / "a" / "00010.png")
    with pytest.raises(ValueError, match=re.escape(str(root / "train" / "Annotations" / "a" / "00010.png")) + ".*palette"):
        RefYouTubeVOS(root, "train", train=False)[0]


# ---------------------------------------------------------------- RefCOCO

def write_refcoco(root: Path):
    """Image 1: two referred objects (a polygon and a compressed-RLE segmentation); image 2: one object
    (an uncompressed-RLE segmentation); image 3 is in val."""
    images = root / "images"
    for image_id in (1, 2, 3):
        write_jpeg(images / f"COCO_train2014_{image_id:012d}.jpg", gray_frame(60 * image_id))
    rle_list = {"size": [H0, W0], "counts": [W0 // 2 * H0, H0 * 8, W0 // 2 * H0 - H0 * 8]}  # columns 32..39
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H0, "width": W0} for i in (1, 2, 3)],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 18, "bbox": [8, 4, 16, 12],
             "segmentation": [[8, 4, 24, 4, 24, 16, 8, 16]]},
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [40, 20, 20, 20],
             "segmentation": rle_encode(box(20, 40, 40, 60))},
            {"id": 102, "image_id": 2, "category_id": 3, "bbox": [32, 0, 8, 48], "segmentation": rle_list},
            {"id": 103, "image_id": 3, "category_id": 3, "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    sentence = lambda sid, text: {"sent_id": sid, "sent": text, "raw": text.upper(), "tokens": text.split()}
    refs = [
        {"ref_id": 0, "ann_id": 100, "image_id": 1, "split": "train", "category_id": 18,
         "sentences": [sentence(0, "dog on the left"), sentence(1, "brown  dog")]},
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [sentence(2, "person at right")]},
        {"ref_id": 2, "ann_id": 102, "image_id": 2, "split": "train", "category_id": 3,
         "sentences": [sentence(3, "the car")]},
        {"ref_id": 3, "ann_id": 103, "image_id": 3, "split": "val", "category_id": 3,
         "sentences": [sentence(4, "small car")]},
    ]
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root, images


def test_refcoco_train_items(tmp_path):
    root, images = write_refcoco(tmp_path)
    ds = RefCOCO(root, images, split="train", train=True, short_side=24, max_size=640, flip=False)
    assert [s["sent_id"] for s in ds.samples] == [0, 1, 2, 3]
    item = ds[1]
    assert set(item) == {"image", "mask", "expression", "sent_id", "ref_id", "ann_id", "image_id", "category_id",
                         "index", "orig_size", "flipped"}
    assert item["image"].shape == (3, 24, 32) and item["image"].dtype == torch.float32
    assert item["mask"].dtype == torch.bool
    assert torch.equal(item["mask"], torch.from_numpy(box(2, 8, 4, 12, size=(24, 32))).bool())
    assert (item["expression"], item["sent_id"], item["ref_id"], item["ann_id"], item["image_id"], item["category_id"],
            item["index"], item["orig_size"], item["flipped"]) == ("brown dog", 1, 0, 100, 1, 18, 1, (48, 64), False)
    # what methods need to draw other sentences of the same ref or image (VATEX's consistency pairs)
    assert ds.sentences == {0: ["dog on the left", "brown dog"], 1: ["person at right"], 2: ["the car"]}
    assert ds.image_refs == {1: [0, 1], 2: [2]} and ds.ref_ann == {0: 100, 1: 101, 2: 102}
    lone = ds[2]
    assert torch.equal(lone["mask"], torch.from_numpy(box(10, 20, 20, 30, size=(24, 32))).bool())
    car = ds[3]
    assert torch.equal(car["mask"], torch.from_numpy(box(0, 24, 16, 20, size=(24, 32))).bool())


def test_refcoco_flip_and_eval(tmp_path):
    root, images = write_refcoco(tmp_path)
    ds = RefCOCO(root, images, split="train", train=True, short_side=24, flip=True, seed=1)
    seen = set()
    for _ in range(30):
        item = ds[0]
        flipped = item["expression"] == "dog on the right"
        assert item["flipped"] == flipped and item["expression"] in ("dog on the left", "dog on the right")
        cols = torch.nonzero(item["mask"].any(0)).flatten()
        assert (cols.min().item(), cols.max().item()) == ((20, 27) if flipped else (4, 11))
        seen.add(flipped)
    assert seen == {True, False}
    val = RefCOCO(root, images, split="val", train=False, short_side=48, max_size=64)
    assert len(val) == 1
    item = val[0]
    assert not item["flipped"] and item["expression"] == "small car"
    assert item["gt"].shape == (48, 64) and np.array_equal(item["gt"].numpy(), box(0, 4, 0, 4).astype(bool))
    assert torch.equal(item["mask"], item["gt"])
    assert torch.allclose(item["image"], read_normalised(images / "COCO_train2014_000000000003.jpg"), atol=1e-5)


def test_refcoco_split_rule(tmp_path):
    root, images = write_refcoco(tmp_path)
    refs_path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[3]["split"] = "testAB"  # the refer API puts such refs in testA, testB and test
    refs_path.write_bytes(pickle.dumps(refs))
    for split in ("testA", "testB", "test"):
        assert [s["sent_id"] for s in RefCOCO(root, images, split=split, train=False).samples] == [4], split
    assert len(RefCOCO(root, images, split="train", train=False)) == 4


def test_refcoco_bad_inputs(tmp_path):
    root, images = write_refcoco(tmp_path)
    with pytest.raises(ValueError, match=r"'google' for dataset 'refcoco\+'.*refcocog \(umd/google\)"):
        RefCOCO(root, images, dataset="refcoco+", split_by="google", train=False)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "refcocog" / "refs(umd).p"))):
        RefCOCO(root, images, dataset="refcocog", split_by="umd", train=False)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "coco"))):
        RefCOCO(root, tmp_path / "coco", train=False)
    with pytest.raises(ValueError, match=r"no refs with split 'testA' .*\['train', 'val'\]"):
        RefCOCO(root, images, split="testA", train=False)
    instances_path = root / "refcoco" / "instances.json"
    instances = json.loads(instances_path.read_text())
    instances["annotations"][0]["segmentation"] = {"size": [H0, W0], "counts": [3]}
    instances_path.write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=re.escape(str(instances_path)) + ", annotation 100"):
        RefCOCO(root, images, train=False)[0]
    instances_path.write_text(json.dumps({"images": instances["images"]}))
    with pytest.raises(KeyError, match=re.escape(str(instances_path)) + ".*'annotations'"):
        RefCOCO(root, images, train=False)
    instances_path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(instances_path))):
        RefCOCO(root, images, train=False)
    root, images = write_refcoco(tmp_path / "b")
    (images / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(images / "COCO_train2014_000000000002.jpg"))):
        RefCOCO(root, images, train=False)[3]


# ---------------------------------------------------------------- YouTube-VIS / OVIS

def list_counts(mask: np.ndarray) -> list:
    """Uncompressed COCO RLE counts, written out independently of the codec: column-major runs,
    the first one of zeros."""
    flat = mask.T.reshape(-1).astype(bool).tolist()
    runs, value, run = [], False, 0
    for pixel in flat:
        if pixel != value:
            runs.append(run)
            value, run = pixel, 0
        run += 1
    return runs + [run]


VIS_DOG, VIS_CAT = box(8, 16, 16, 32), box(24, 40, 0, 16)
VIS_BOX = [0, 0, 8, 0, 8, 8, 0, 8]  # polygon of the 8x8 box at the top-left corner


def write_vis(root: Path, annotations=True) -> Path:
    """Video 1 "a": 5 frames of grey level 30t+20; instance 11 (category 7, compressed-string RLE)
    everywhere but frame 2, 12 (category 12, list counts) only in frame 4, 13 (category 3) an RLE
    without a pixel in frames 0-1, 14 a crowd; video 2 "b": 3 frames, instance 21 a polygon;
    video 3 "c": no annotation. Category ids are given out of order: 3 -> label 0, 7 -> 1, 12 -> 2."""
    for video, length in (("a", 5), ("b", 3), ("c", 2)):
        for t in range(length):
            write_jpeg(root / "JPEGImages" / video / f"{t:05d}.jpg", gray_frame(30 * t + 20))
    videos = [{"id": i, "file_names": [f"{v}/{t:05d}.jpg" for t in range(n)], "height": H0,
               "width": W0, "length": n} for i, (v, n) in enumerate((("a", 5), ("b", 3), ("c", 2)), 1)]
    anns = [
        {"id": 11, "video_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentations": [None if t == 2 else rle_encode(VIS_DOG) for t in range(5)]},
        {"id": 12, "video_id": 1, "category_id": 12, "iscrowd": 0,
         "segmentations": [{"size": [H0, W0], "counts": list_counts(VIS_CAT)} if t == 4 else None
                           for t in range(5)]},
        {"id": 13, "video_id": 1, "category_id": 3,
         "segmentations": [rle_encode(np.zeros((H0, W0))) if t < 2 else None for t in range(5)]},
        {"id": 14, "video_id": 1, "category_id": 3, "iscrowd": 1,
         "segmentations": [rle_encode(VIS_CAT)] * 5},
        {"id": 21, "video_id": 2, "category_id": 3, "iscrowd": 0, "segmentations": [[VIS_BOX]] * 3},
    ]
    categories = [{"id": 12, "name": "cat"}, {"id": 3, "name": "box"}, {"id": 7, "name": "dog"}]
    path = root / "vis.json"
    path.write_text(json.dumps({"videos": videos, "annotations": anns if annotations else None,
                                "categories": categories}))
    return path


def vis_masks(frame_idx) -> dict:
    """The expected masks of video "a" over frame_idx by annotation id (crowd 14 never; 13 has none)."""
    return {11: [VIS_DOG * (t != 2) for t in frame_idx], 12: [VIS_CAT * (t == 4) for t in frame_idx]}


def test_vis_labels_are_contiguous_in_category_id_order(tmp_path):
    ds = YouTubeVIS(write_vis(tmp_path), tmp_path / "JPEGImages", train=False)
    assert ds.classes == ["box", "dog", "cat"] and ds.label_of == {3: 0, 7: 1, 12: 2}
    assert [v["name"] for v in ds.videos] == ["a", "b", "c"]  # evaluation keeps every video
    truth = ds.instance_masks(0)
    assert truth["ids"].tolist() == [11, 12, 13] and truth["labels"].tolist() == [1, 2, 0]
    assert truth["labels"].dtype == torch.long and truth["masks"].shape == (3, 5, H0, W0)
    # compressed-string counts (11) and uncompressed list counts (12) decode to the masks encoded
    for t in range(5):
        assert np.array_equal(truth["masks"][0, t].numpy(), VIS_DOG.astype(bool) * (t != 2)), t
        assert np.array_equal(truth["masks"][1, t].numpy(), VIS_CAT.astype(bool) * (t == 4)), t
    assert not truth["masks"][2].any()
    polygon = ds.instance_masks(1)
    assert polygon["ids"].tolist() == [21] and polygon["masks"][0].sum() == 3 * 64
    assert np.array_equal(polygon["masks"][0, 1].numpy(), box(0, 8, 0, 8).astype(bool))


def test_vis_train_clips_match_the_segmentations_and_drop_absent_instances(tmp_path):
    path = write_vis(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 training videos without a non-crowd annotation"):
        ds = YouTubeVIS(path, tmp_path / "JPEGImages", train=True, num_frames=2, frame_range=1,
                        short_side=H0, max_size=W0, flip=False)
    assert [v["name"] for v in ds.videos] == ["a", "b"]
    seen = set()
    for _ in range(40):
        item = ds[0]
        clip = item["frame_idx"].tolist()
        expected = {i: m for i, m in vis_masks(clip).items() if any(x.any() for x in m)}
        assert item["ids"].tolist() == sorted(expected), clip  # no pixel in the clip: dropped
        assert item["labels"].tolist() == [{11: 1, 12: 2}[i] for i in sorted(expected)]
        assert item["masks"].shape == (len(expected), 2, H0, W0) and item["masks"].dtype == torch.bool
        for k, i in enumerate(sorted(expected)):
            for j in range(2):
                assert np.array_equal(item["masks"][k, j].numpy(), expected[i][j].astype(bool)), clip
        levels = denormalise(item["frames"])[:, :, :, 8:].mean(dim=(1, 2, 3)) * 255
        assert torch.allclose(levels, torch.tensor([30.0 * t + 20 for t in clip]), atol=2)
        seen.add(12 in expected)
    assert seen == {True, False}  # clips with and without the one-frame instance were drawn
    item = ds[1]
    assert item["ids"].tolist() == [21] and item["labels"].tolist() == [0]
    assert item["video"] == "b" and item["video_id"] == 2 and item["orig_size"] == (H0, W0)
    with pytest.warns(UserWarning):
        half = YouTubeVIS(path, tmp_path / "JPEGImages", train=True, num_frames=5, frame_range=4,
                          short_side=24, flip=False)
    item = half[0]  # every frame: 13 is not null in frames 0-1 but has no pixel, so it is dropped
    assert item["frame_idx"].tolist() == [0, 1, 2, 3, 4] and item["ids"].tolist() == [11, 12]
    assert item["frames"].shape == (5, 3, 24, 32) and item["masks"].shape == (2, 5, 24, 32)
    cat = torch.from_numpy(box(12, 20, 0, 8, size=(24, 32))).bool()  # the box at half resolution
    assert torch.equal(item["masks"][1, 4], cat) and not item["masks"][1, :4].any()


def test_vis_eval_items_and_collate(tmp_path):
    path = write_vis(tmp_path)
    ds = YouTubeVIS(path, tmp_path / "JPEGImages", train=False, short_side=24)
    item = ds[0]
    assert set(item) == {"frames", "orig_size", "file_names", "video", "video_id", "index"}
    assert item["frames"].shape == (5, 3, 24, 32) and item["orig_size"] == (H0, W0)
    assert item["file_names"] == [f"a/{t:05d}.jpg" for t in range(5)]
    assert collate_vis([item])["frames"].shape == (1, 5, 3, 32, 32)
    with pytest.warns(UserWarning):
        train = YouTubeVIS(path, tmp_path / "JPEGImages", train=True, num_frames=3, short_side=24)
    a, b = train[0], train[1]
    batch = collate_vis([a, b])
    assert batch["frames"].shape == (2, 3, 3, 32, 32) and batch["video"] == ["a", "b"]
    assert "labels" not in batch and "ids" not in batch
    for target, item in zip(batch["targets"], (a, b)):
        assert torch.equal(target["labels"], item["labels"]) and torch.equal(target["ids"], item["ids"])
        assert torch.equal(target["masks"][..., :24, :32], item["masks"])
        assert not target["masks"][..., 24:, :].any()


def test_vis_bad_inputs(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"YouTube-VIS: expected the annotation file at "
                                                          f"{missing} (see data/README.md)")):
        YouTubeVIS(missing, tmp_path, train=True)
    path = write_vis(tmp_path)
    images = tmp_path / "JPEGImages"
    data = json.loads(path.read_text())

    def expect(bad, error, pattern, train=False):
        path.write_text(json.dumps(bad))
        with pytest.raises(error, match=pattern):
            YouTubeVIS(path, images, train=train)

    expect({k: v for k, v in data.items() if k != "videos"}, KeyError, re.escape(str(path)) + ".*'videos'")
    bad = json.loads(json.dumps(data))
    bad["annotations"][1]["segmentations"] = bad["annotations"][1]["segmentations"][:4]
    expect(bad, ValueError, r"annotations\[1\] should list one segmentation or null per frame of "
                            r"video_id 1 \(5\), got 4")
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 99
    expect(bad, KeyError, r"annotations\[0\] has category_id 99")
    bad = json.loads(json.dumps(data))
    bad["videos"][1]["file_names"][2] = "b/00009.jpg"
    expect(bad, FileNotFoundError, r"1 of the 3 frames .*videos\[1\].*00009\.jpg")
    expect({**data, "annotations": None}, ValueError, "training needs annotations", train=True)
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segmentations"][3] = {"size": [H0, W0], "counts": [5, 5]}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotation 11, frame 3 of video 1: .*sum to 10"):
        YouTubeVIS(path, images, train=False).instance_masks(0)
    path.write_text(json.dumps({**data, "annotations": None}))  # a valid / test file: frames only
    assert YouTubeVIS(path, images, train=False).instance_masks(0)["masks"].shape == (0, 5, H0, W0)


# ---------------------------------------------------------------- collate

def test_collate_video_pads_to_multiple_of_32():
    a = {"frames": torch.rand(2, 3, 24, 32), "masks": torch.ones(3, 2, 24, 32, dtype=torch.bool), "video": "x", "index": 0}
    b = {"frames": torch.rand(2, 3, 40, 50), "masks": torch.ones(1, 2, 40, 50, dtype=torch.bool), "video": "y", "index": 1}
    batch = collate_video([a, b])
    assert batch["frames"].shape == (2, 2, 3, 64, 64)
    assert torch.equal(batch["frames"][0, :, :, :24, :32], a["frames"]) and batch["frames"][0, :, :, 24:].abs().sum() == 0
    assert batch["frames"][0, :, :, :, 32:].abs().sum() == 0
    assert torch.equal(batch["frames"][1, :, :, :40, :50], b["frames"])
    expected = torch.ones(2, 64, 64, dtype=torch.bool)
    expected[0, :24, :32] = False
    expected[1, :40, :50] = False
    assert torch.equal(batch["pad_mask"], expected)
    assert batch["image_sizes"] == [(24, 32), (40, 50)]
    assert batch["targets"][0]["masks"].shape == (3, 2, 64, 64) and batch["targets"][0]["masks"].dtype == torch.bool
    assert torch.equal(batch["targets"][1]["masks"][0, 0], ~expected[1])
    assert batch["targets"][0]["labels"].tolist() == [0, 0, 0] and batch["targets"][0]["labels"].dtype == torch.long
    assert batch["video"] == ["x", "y"] and batch["index"] == [0, 1] and "masks" not in batch
    with pytest.raises(ValueError, match=r"same number of frames, got \[2, 3\]"):
        collate_video([a, {**b, "frames": torch.rand(3, 3, 40, 50)}])
    evaluation = collate_video([{"frames": torch.rand(5, 3, 32, 33), "gt": None}])
    assert evaluation["frames"].shape == (1, 5, 3, 32, 64) and "targets" not in evaluation and evaluation["gt"] == [None]


def test_collate_image():
    a = {"image": torch.rand(3, 30, 20), "mask": torch.ones(30, 20, dtype=torch.bool), "expression": "a"}
    b = {"image": torch.rand(3, 64, 65), "mask": torch.zeros(64, 65, dtype=torch.bool), "expression": "b"}
    batch = collate_image([a, b])
    assert batch["images"].shape == (2, 3, 64, 96) and batch["pad_mask"].shape == (2, 64, 96)
    assert batch["pad_mask"][0].sum() == 64 * 96 - 30 * 20 and not batch["pad_mask"][1, :64, :65].any()
    assert torch.equal(batch["images"][1, :, :, :65], b["image"]) and batch["images"][1, :, :, 65:].abs().sum() == 0
    assert batch["targets"][0]["masks"].shape == (1, 64, 96) and batch["targets"][0]["masks"].sum() == 600
    assert batch["targets"][1]["labels"].tolist() == [0] and batch["expression"] == ["a", "b"]


def test_decode_segmentation_reads_every_coco_form_and_names_bad_input():
    a = np.zeros((6, 8), dtype=np.uint8)
    a[1:3, 2:5] = 1
    b = np.zeros((6, 8), dtype=np.uint8)
    b[4:6, 0:2] = 1
    kw = dict(dataset="RefCOCO", where="annotation 7")
    assert np.array_equal(decode_segmentation(rle_encode(a), 6, 8, **kw), a.astype(bool))
    merged = decode_segmentation([rle_encode(a), rle_encode(b)], 6, 8, **kw)  # a list of RLEs
    assert np.array_equal(merged, (a | b).astype(bool))
    square = decode_segmentation([[2, 1, 5, 1, 5, 3, 2, 3]], 6, 8, **kw)  # one polygon
    assert np.array_equal(square, polygons_to_mask([[2, 1, 5, 1, 5, 3, 2, 3]], 6, 8).astype(bool))
    for bad in ([], None, "x", [[1, 2, 3, 4, 5, 6], {"size": [6, 8]}]):
        with pytest.raises(ValueError, match="RefCOCO: bad segmentation in annotation 7"):
            decode_segmentation(bad, 6, 8, **kw)
    with pytest.raises(ValueError, match=r"RefCOCO: segmentation in annotation 7 is \[6, 8\], expected \[6, 9\]"):
        decode_segmentation(rle_encode(a), 6, 9, **kw)
