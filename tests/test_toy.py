"""The toy sets (data/toy.py): determinism, the exact MeViS / RefCOCO layouts, loading through the
real readers, masks that match the drawn pixels, and the motion semantics the sets exist for."""
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.coco_mask import polygons_to_mask, rle_decode
from common.datasets import MeViS, RefCOCO, YouTubeVIS
from data.toy import (CATEGORY_IDS, COLOURS, IMAGE_SIZE, NOUNS, SIZE_WORDS, VIDEO_H, VIDEO_W, make_toy,
                      make_toy_video, motion_only_keys, motion_only_order_keys, motion_sentence_keys,
                      phrase_predicates, toy_ready, video_motion_facts, write_toy_vis)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(train_videos=6, valid_videos=6, train_images=10, val_images=6, test_images=6)
SMALL_CLI = ["--train-videos", "6", "--valid-videos", "6", "--train-images", "10", "--val-images", "6",
             "--test-images", "6", "--quiet"]
SPLITS = ("train", "valid_u")
NOUN_SHAPE = {n: s for s, nouns in NOUNS.items() for n in nouns}
SIZE_OF = {w: s for s, words in SIZE_WORDS.items() for w in words}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy"
    make_toy(out, seed=0, verbose=False, **SMALL)
    return out


def _load_video_split(toy, split):
    root = toy / "mevis" / split
    read = lambda name: json.loads((root / name).read_text())
    return (root, read("meta_expressions.json")["videos"], read("mask_dict.json"),
            read("motion_only.json")["motion_only"], read("toy_objects.json")["videos"])


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


# ---------------------------------------------------------------- generation
@pytest.mark.slow
def test_deterministic_by_seed_and_cli_matches_api(toy, tmp_path):
    again = tmp_path / "again"
    make_toy(again, seed=0, verbose=False, **SMALL)
    assert _files(again) == _files(toy)
    other = tmp_path / "other"
    subprocess.run([sys.executable, str(REPO / "data" / "toy.py"), "--out", str(other), "--seed", "1", *SMALL_CLI],
                   check=True, cwd=tmp_path, timeout=120)
    a, b = _files(toy), _files(other)
    assert a["mevis/valid_u/meta_expressions.json"] != b["mevis/valid_u/meta_expressions.json"]
    assert a["refcoco/refcoco/refs(unc).p"] != b["refcoco/refcoco/refs(unc).p"]
    images = [k for k in a.keys() & b.keys() if k.startswith("refcoco/images/")]
    assert len(images) == 28 and all(a[k] != b[k] for k in images)
    make_toy(again, seed=1, verbose=False, **SMALL)  # replaces a finished toy set in place
    assert _files(again) == b


def test_toy_ready_and_refusing_foreign_folders(toy, tmp_path):
    assert toy_ready(toy) and not toy_ready(tmp_path)
    assert not [p for p in toy.parent.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no DONE"):
        make_toy(foreign, verbose=False, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- MeViS layout
@pytest.mark.parametrize("split", SPLITS)
def test_mevis_layout(toy, split):
    root, meta, mask_dict, motion_only, objects = _load_video_split(toy, split)
    assert len(meta) == 6 and set(objects) == set(meta) and set(motion_only) <= set(meta)
    owner = {}
    for vid, entry in meta.items():
        frames = entry["frames"]
        assert frames == sorted(frames) and frames[0] == "00000" and 12 <= len(frames) <= 24
        assert sorted(p.stem for p in (root / "JPEGImages" / vid).glob("*.jpg")) == frames
        with Image.open(root / "JPEGImages" / vid / f"{frames[-1]}.jpg") as im:
            assert (im.mode, im.size) == ("RGB", (VIDEO_W, VIDEO_H))
        objs = objects[vid]
        assert 2 <= len(objs) <= 4 and [o["obj_id"] for o in objs] == list(range(len(objs)))
        for o in objs:
            assert o["anno_id"] not in owner, "anno_ids must be unique within the split"
            owner[o["anno_id"]] = vid
            rles = mask_dict[o["anno_id"]]
            assert len(rles) == len(frames) and any(r is not None for r in rles)
            assert all(r["size"] == [VIDEO_H, VIDEO_W] and isinstance(r["counts"], str) for r in rles if r is not None)
        exps = entry["expressions"]
        assert list(exps) == [str(i) for i in range(len(exps))] and 4 <= len(exps) <= 8
        assert len({e["exp"] for e in exps.values()}) == len(exps)
        for exp_id, e in exps.items():
            assert e["exp"] == " ".join(e["exp"].lower().split())
            assert len(e["obj_id"]) == len(e["anno_id"]) >= 1 and all(isinstance(o, int) for o in e["obj_id"])
            assert [objs[o]["anno_id"] for o in e["obj_id"]] == e["anno_id"]
            assert any(mask_dict[a][t] is not None for a in e["anno_id"] for t in range(len(frames)))
        assert set(motion_only.get(vid, [])) <= set(exps)
    assert set(mask_dict) == set(owner)
    words = {w for e in meta.values() for x in e["expressions"].values() for w in x["exp"].split()}
    assert len(words) <= 130


def test_mevis_reader_reads_toy(toy):
    _, meta, mask_dict, motion_only, _ = _load_video_split(toy, "valid_u")
    ds = MeViS(toy / "mevis", "valid_u", train=False, short_side=VIDEO_H, max_size=VIDEO_W)
    assert len(ds) == sum(len(v["expressions"]) for v in meta.values())
    keys = motion_only_keys(toy / "mevis", "valid_u")["motion_only"]  # what the evaluation reports on
    assert keys == {f"{vid}/{e}" for vid, ids in motion_only.items() for e in ids}
    assert keys <= {f"{s['video']}/{s['exp_id']}" for s in ds.samples} and len(keys) >= 5
    assert motion_only_keys(toy / "nowhere", "valid_u") == {}
    item = ds[0]
    e = meta[item["video"]]["expressions"][item["exp_id"]]
    union = np.zeros((len(item["frame_names"]), VIDEO_H, VIDEO_W), bool)
    for a in e["anno_id"]:
        union |= np.stack([rle_decode(r) if r else np.zeros((VIDEO_H, VIDEO_W), np.uint8) for r in mask_dict[a]]).astype(bool)
    assert item["frames"].shape == (len(union), 3, VIDEO_H, VIDEO_W)
    assert np.array_equal(item["gt"].numpy(), union) and item["expression"] == e["exp"]
    train = MeViS(toy / "mevis", "train", train=True, num_frames=8, short_side=VIDEO_H, max_size=VIDEO_W, flip=False)
    item = train[1]
    assert item["masks"].shape == (len(item["obj_ids"]), 8, VIDEO_H, VIDEO_W) and item["masks"].any()


@pytest.mark.parametrize("split", SPLITS)
def test_video_masks_match_drawn_pixels(toy, split):
    root, meta, mask_dict, _, objects = _load_video_split(toy, split)
    for vid, objs in objects.items():
        for t, name in enumerate(meta[vid]["frames"]):
            frame = np.asarray(Image.open(root / "JPEGImages" / vid / f"{name}.jpg"), dtype=float)
            masks = [rle_decode(mask_dict[o["anno_id"]][t]).astype(bool) if mask_dict[o["anno_id"]][t] else
                     np.zeros((VIDEO_H, VIDEO_W), bool) for o in objs]
            assert not np.any(np.sum(masks, 0) > 1), "visible masks must not overlap"
            for k, (o, m) in enumerate(zip(objs, masks)):
                # objects are drawn with hard edges, so around each mask (away from the other objects)
                # the pixels of the object's colour are exactly the mask, up to JPEG noise
                close = np.abs(frame - o["rgb"]).max(-1) < 40          # (H, W)
                others = np.any([q for j, q in enumerate(masks) if j != k], 0)
                region = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(others)
                assert ((close != m) & region).sum() <= 2, (vid, t, o)
            for a in range(len(objs)):  # identical-looking objects never touch
                for b in range(a + 1, len(objs)):
                    if [objs[a][k] for k in ("shape", "colour", "size")] == [objs[b][k] for k in ("shape", "colour", "size")]:
                        assert not (ndimage.binary_dilation(masks[a]) & masks[b]).any(), (vid, t)


# ---------------------------------------------------------------- video semantics
def _appearance(o):
    return o["shape"], o["colour"], o["size"]


KEYWORDS = {  # phrase pattern -> motion kinds that make it true (a kind outside the set makes it false)
    r"\b(jump|jumps|jumping|bouncing|bounces|hops|hopping)\b": {"jump"},
    r"\b(still|motionless|not move|not moving|in place)\b": {"still"},
    r"\b(entering|enters|comes in|coming in|into view|appears)\b": {"enter_left", "enter_right"},
    r"\b(leaving|leaves|out of view|disappears|goes out|going out)\b": {"leave_left", "leave_right"},
    r"\b(turning|turns|direction|and then)\b": {"turn_lr", "turn_rl"},
    r"from the left": {"enter_left"}, r"from the right": {"enter_right"},
    r"left and then (back )?right": {"turn_lr"}, r"right and then (back )?left": {"turn_rl"},
}
# direction words count only where no jumping ("up and down"), entering ("from the left" = moving
# right) or turning ("left and then right") phrase holds them
NO_DIRECTION = r"\b(jump|jumps|jumping|bouncing|bounces|hops|hopping|entering|enters|comes in|coming in|turning|turns|direction|and then)\b"
DIRECTIONS = {
    r"\bleft\b": {"left", "leave_left", "enter_right"}, r"\bright\b": {"right", "leave_right", "enter_left"},
    r"\b(up|upward|rising|rises)\b": {"up"}, r"\b(down|downward|sinking|sinks)\b": {"down"},
}


@pytest.mark.parametrize("split", SPLITS)
def test_video_expressions_name_their_targets(toy, split):
    """Appearance words hold for every target; motion keywords hold for every target and, in
    single-object expressions, fail for every other object the appearance words also describe;
    the motion-only flag is set exactly when a non-target looks like a target and moves differently."""
    _, meta, _, motion_only, objects = _load_video_split(toy, split)
    n_mo = n_all = 0
    for vid, entry in meta.items():
        objs = objects[vid]
        for exp_id, e in entry["expressions"].items():
            words = e["exp"].split()
            targets = set(e["obj_id"])
            stems = [w[:-2] if w == "boxes" else w.rstrip("s") for w in words]
            said = {"colour": {w for w in words if w in COLOURS}, "size": {SIZE_OF[w] for w in words if w in SIZE_OF},
                    "shape": {NOUN_SHAPE[s] for s in stems if s in NOUN_SHAPE}}
            assert all(len(v) <= 1 for v in said.values()), e["exp"]
            described = [j for j, o in enumerate(objs) if all(o[k] in v for k, v in said.items() if v)]
            assert targets <= set(described), e["exp"]
            patterns = dict(KEYWORDS)
            if not re.search(NO_DIRECTION, e["exp"]):
                patterns.update(DIRECTIONS)
            holds = [lambda o, kinds=kinds: o["motion"] in kinds for p, kinds in patterns.items() if re.search(p, e["exp"])]
            for speed, pattern in (("fast", r"\b(fast|quickly)\b"), ("slow", r"\b(slow|slowly)\b")):
                if re.search(pattern, e["exp"]):
                    holds.append(lambda o, speed=speed: o["speed"] == speed)
            assert all(h(objs[t]) for h in holds for t in targets), (e["exp"], objs)
            if holds and len(targets) == 1:  # the motion words rule out every look-alike the words describe
                assert not any(all(h(objs[j]) for h in holds) for j in described if j not in targets), (e["exp"], objs)
            twins = [j for j in range(len(objs)) if j not in targets
                     and any(_appearance(objs[j]) == _appearance(objs[t]) for t in targets)]
            flagged = exp_id in motion_only.get(vid, [])
            assert flagged == bool(twins), (e["exp"], objs)
            if flagged:
                assert any((objs[j]["motion"], objs[j]["speed"]) != (objs[t]["motion"], objs[t]["speed"])
                           for j in twins for t in targets if _appearance(objs[j]) == _appearance(objs[t]))
                assert not set(described) <= targets, "the appearance words alone must not single out the targets"
            n_mo += flagged
            n_all += 1
        kinds = {}
        for o in objs:
            kinds.setdefault(_appearance(o), []).append((o["motion"], o["speed"]))
        assert any(len(k) > 1 for k in kinds.values()), "every video holds identical-looking objects"
        assert all(len(set(k)) == len(k) for k in kinds.values()), "identical-looking objects move differently"
    assert n_mo >= 0.3 * n_all  # MOTION_ONLY_SHARE aims at 0.35 per video; small videos add more


@pytest.mark.parametrize("split", SPLITS)
def test_video_motion_labels_match_masks(toy, split):
    _, meta, mask_dict, _, objects = _load_video_split(toy, split)
    for vid, objs in objects.items():
        for o in objs:
            rles = mask_dict[o["anno_id"]]
            masks = [rle_decode(r).astype(bool) if r else None for r in rles]
            areas = np.array([m.sum() if m is not None else 0 for m in masks])
            # frames neither much occluded nor cut off; rasterising at sub-pixel positions alone
            # changes a small triangle's area by up to ~15%
            whole = [t for t in range(len(masks)) if areas[t] >= 0.75 * areas.max()]
            x, y = np.array([_centroid(masks[t]) for t in whole]).T
            kind, where = o["motion"], (vid, o)
            if kind == "still":  # every unoccluded frame has the very same mask
                full = [masks[t] for t in range(len(masks)) if areas[t] == areas.max()]
                assert all(np.array_equal(full[0], m) for m in full), where
            elif kind in ("left", "right", "up", "down"):
                along, across = (x, y) if kind in ("left", "right") else (y, x)
                slope = np.polyfit(np.array(whole, float), along, 1)[0]  # px per frame
                assert (slope < -0.5 if kind in ("left", "up") else slope > 0.5), where
                assert np.ptp(across) < 2.0, where
                if o["speed"]:
                    assert (abs(slope) > 2.0 if o["speed"] == "fast" else abs(slope) < 1.3), (slope, where)
            elif kind == "jump":
                y_all = np.array([_centroid(m)[1] for m in masks if m is not None])
                assert np.ptp(x) < 2.0 and np.ptp(y_all) > 6, where
                assert np.sum(np.diff(np.sign(np.diff(y_all))) != 0) >= 1, where  # goes up and comes down
            elif kind.startswith(("enter_", "leave_")):
                present = [m is not None for m in masks]
                assert present[-1] != present[0] and present[-1] == kind.startswith("enter_"), where
                seen = [m for m in masks if m is not None]
                edge_mask = seen[0] if kind.startswith("enter_") else seen[-1]
                column = 0 if kind.endswith("_left") else VIDEO_W - 1
                assert edge_mask[:, column].any(), where
                assert np.ptp(y) < 2.0, where
            else:  # turn_lr / turn_rl
                turn = int(np.argmin(x) if kind == "turn_lr" else np.argmax(x))
                assert 0 < turn < len(x) - 1 and min(abs(x[0] - x[turn]), abs(x[-1] - x[turn])) > 2, where


# ---------------------------------------------------------------- RefCOCO layout
def _load_refcoco(toy):
    data = toy / "refcoco" / "refcoco"
    refs = pickle.loads((data / "refs(unc).p").read_bytes())
    instances = json.loads((data / "instances.json").read_text())
    motion = json.loads((data / "motion_sent_ids.json").read_text())["sent_ids"]
    objects = json.loads((data / "toy_objects.json").read_text())["annotations"]
    return refs, instances, set(motion), objects


def _ann_mask(ann):
    seg = ann["segmentation"]
    return (rle_decode(seg) if isinstance(seg, dict) else polygons_to_mask(seg, IMAGE_SIZE, IMAGE_SIZE)).astype(bool)


def test_refcoco_layout(toy):
    refs, instances, motion, objects = _load_refcoco(toy)
    images = {i["id"]: i for i in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    assert len(images) == 10 + 6 + 6 + 6 and len(anns) == len(instances["annotations"]) and set(objects) == {str(a) for a in anns}
    for img in images.values():
        assert img["file_name"] == f"COCO_train2014_{img['id']:012d}.jpg"
        with Image.open(toy / "refcoco" / "images" / img["file_name"]) as im:
            assert (im.mode, im.size, img["height"], img["width"]) == ("RGB", (IMAGE_SIZE,) * 2, IMAGE_SIZE, IMAGE_SIZE)
    kinds = {type(a["segmentation"]).__name__ for a in anns.values()}
    assert kinds == {"list", "dict"}, "both polygon and RLE segmentations occur, as in COCO"
    for a in anns.values():
        m = _ann_mask(a)
        ys, xs = np.nonzero(m)
        assert a["iscrowd"] == 0 and a["image_id"] in images and a["area"] == m.sum()
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert cats[a["category_id"]] == objects[str(a["id"])]["shape"]
    keys = {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name"}
    sent_ids, split_of_image = [], {}
    for r in refs:
        assert set(r) == keys and r["image_id"] == anns[r["ann_id"]]["image_id"]
        assert r["category_id"] == anns[r["ann_id"]]["category_id"]
        assert split_of_image.setdefault(r["image_id"], r["split"]) == r["split"], "a split holds whole images"
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] and 1 <= len(r["sentences"]) <= 3
        for s in r["sentences"]:
            assert set(s) == {"sent_id", "sent", "raw", "tokens"}
            assert s["sent"] == s["raw"].lower() and s["tokens"] == s["sent"].split()
        sent_ids += r["sent_ids"]
        if r["split"] == "testA":
            assert cats[r["category_id"]] == "circle"
        if r["split"] == "testB":
            assert cats[r["category_id"]] != "circle"
    assert len(set(sent_ids)) == len(sent_ids) and motion <= set(sent_ids)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}


def test_refcoco_reader_reads_toy_and_masks_match_pixels(toy):
    refs, _, motion, objects = _load_refcoco(toy)
    for split in ("train", "val", "testA", "testB"):
        ds = RefCOCO(toy / "refcoco", toy / "refcoco" / "images", dataset="refcoco", split_by="unc", split=split,
                     train=False, short_side=IMAGE_SIZE, max_size=IMAGE_SIZE)
        mine = [s for r in refs if r["split"] == split for s in r["sentences"]]
        assert len(ds) == len(mine)
        keys = motion_sentence_keys(toy / "refcoco")["motion"]
        assert {str(s["sent_id"]) for s in ds.samples} & keys == {str(s["sent_id"]) for s in mine} & {str(m) for m in motion}
        for index in range(len(ds)):
            item = ds[index]
            mask = item["gt"].numpy()
            rgb = objects[str(ds.samples[index]["ann_id"])]["rgb"]
            path = toy / "refcoco" / "images" / ds.samples[index]["file_name"]
            pixels = np.asarray(Image.open(path), dtype=float)
            close = np.abs(pixels - rgb).max(-1) < 40  # the streak is at most 55% of the colour, so it is not close
            region = ndimage.binary_dilation(mask, iterations=3)
            assert ((close != mask) & region).sum() <= 2


def test_refcoco_motion_sentences_and_streaks(toy):
    """Motion-only sentences have a look-alike with another motion; every moving shape trails a
    streak of its own colour behind it, and a still one has none."""
    refs, instances, motion, objects = _load_refcoco(toy)
    by_image = {}
    for a in instances["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    look = lambda a: _appearance(objects[str(a["id"])])
    n_motion = 0
    for r in refs:
        target = next(a for a in by_image[r["image_id"]] if a["id"] == r["ann_id"])
        twins = [a for a in by_image[r["image_id"]] if a["id"] != target["id"] and look(a) == look(target)]
        for s in r["sentences"]:
            if s["sent_id"] in motion:
                n_motion += 1
                assert twins and all(objects[str(a["id"])]["motion"] != objects[str(target["id"])]["motion"] for a in twins)
                assert not re.search(r"\b(on the (left|right)|top|bottom|middle|upper|lower)\b", s["sent"]), s["sent"]
                assert re.search(r"\b(moving|flying|going|rising|falling|dropping|still|rest|motion|motionless)\b",
                                 s["sent"]), s["sent"]
    assert n_motion >= 10
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for image in instances["images"]:
        pixels = np.asarray(Image.open(toy / "refcoco" / "images" / image["file_name"]), dtype=float)
        anns = by_image[image["id"]]
        masks = [_ann_mask(a) for a in anns]
        near_any = ndimage.binary_dilation(np.any(masks, 0), iterations=2)
        background = np.median(pixels[~near_any], 0)  # (3,) streaks cover far less than half of the rest
        tinted = (np.abs(pixels - background).max(-1) > 30) & ~near_any
        for a, m in zip(anns, masks):
            o = objects[str(a["id"])]
            x, y, w, h = (int(v) for v in a["bbox"])
            if o["motion"] == "still":
                ring = ndimage.binary_dilation(m, iterations=4) & ~near_any
                assert tinted[ring].mean() < 0.05, (image["id"], o)
                continue
            dx, dy = step[o["motion"]]
            behind = np.zeros_like(m)  # the box of the shape moved back by its own size
            x0, y0 = x - dx * w, y - dy * h
            behind[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] = True
            streak = behind & tinted
            assert streak.sum() > 0.3 * m.sum(), (image["id"], o)
            direction = np.asarray(o["rgb"], float) - background
            mean_shift = (pixels[streak] - background).mean(0)
            cosine = mean_shift @ direction / (np.linalg.norm(mean_shift) * np.linalg.norm(direction))
            assert cosine > 0.9, (image["id"], o, cosine)


def test_motion_only_floors_by_hand(tmp_path):
    """Two look-alike squares (one moving), a red circle; the motion-only expression refers to the
    moving square. "every look-alike" predicts both squares, "wrong look-alikes" the other one."""
    from common.coco_mask import rle_encode
    from data.toy import motion_only_references
    split = tmp_path / "valid_u"
    split.mkdir()
    frames = 2
    a, b, c = (np.zeros((frames, VIDEO_H, VIDEO_W), bool) for _ in range(3))
    a[:, 0:4, 0:4] = True  # the target square: 16 pixels
    b[:, 10:14, 10:12] = True  # its look-alike: 8 pixels, elsewhere
    c[:, 30:35, 30:35] = True
    masks = {str(i): [rle_encode(m[t]) for t in range(frames)] for i, m in enumerate((a, b, c))}
    look = dict(shape="square", colour="blue", size="small")
    objects = {"v": [dict(obj_id=0, anno_id="0", motion="left", **look), dict(obj_id=1, anno_id="1", motion="still", **look),
                     dict(obj_id=2, anno_id="2", shape="circle", colour="red", size="big", motion="still")]}
    meta = {"videos": {"v": {"frames": ["00000", "00001"], "expressions": {
        "0": {"exp": "the square moving left", "obj_id": [0], "anno_id": ["0"]},
        "1": {"exp": "the red circle", "obj_id": [2], "anno_id": ["2"]}}}}}
    for name, content in (("meta_expressions.json", meta), ("mask_dict.json", masks),
                          ("toy_objects.json", {"videos": objects}), ("motion_only.json", {"motion_only": {"v": ["0"]}})):
        (split / name).write_text(json.dumps(content))
    refs = motion_only_references(tmp_path, "valid_u")
    every, wrong = refs["every_look_alike"], refs["wrong_look_alikes"]
    assert every["n"] == wrong["n"] == 1
    assert every["J"] == pytest.approx(16 / 24) and wrong["J"] == 0.0  # J = |A| / |A u B|; A and B disjoint
    assert 0 < every["F"] < 1 and wrong["F"] == 0.0
    assert motion_only_references(tmp_path / "nowhere", "valid_u") == {}


def test_look_alikes_share_shape_colour_and_size():
    """One differing attribute (size, colour or shape) is enough to tell two objects apart."""
    from data.toy import look_alikes
    square = dict(shape="square", colour="blue", size="small")
    objects = [dict(obj_id=0, **square), dict(obj_id=1, **square), dict(obj_id=2, **{**square, "size": "big"}),
               dict(obj_id=3, **{**square, "colour": "red"}), dict(obj_id=4, **{**square, "shape": "circle"})]
    ids = lambda targets: [o["obj_id"] for o in look_alikes(objects, targets)]  # noqa: E731
    assert ids({0}) == ids({1}) == [0, 1]
    assert ids({2}) == [2] and ids({3}) == [3] and ids({4}) == [4]
    assert ids({0, 4}) == [0, 1, 4]


@pytest.mark.parametrize("split", SPLITS)
def test_phrase_predicates_read_back_what_separates_the_look_alikes(toy, split):
    """The predicates read off each motion-only expression's wording hold for every target and
    fail for every look-alike it does not refer to; the order split covers the motion-only set."""
    _, meta, _, motion_only, objects = _load_video_split(toy, split)
    for vid, exp_ids in motion_only.items():
        objs = objects[vid]
        for exp_id in exp_ids:
            e = meta[vid]["expressions"][exp_id]
            preds = phrase_predicates(e["exp"])
            facts = [video_motion_facts(o["motion"], o["speed"]) for o in objs]
            holds = [all(facts[j][p] is True for p in preds) for j in range(len(objs))]
            twins = [j for j in range(len(objs)) if j not in e["obj_id"]
                     and any(_appearance(objs[j]) == _appearance(objs[t]) for t in e["obj_id"])]
            assert preds and all(holds[t] for t in e["obj_id"]), e["exp"]
            assert not any(holds[j] for j in twins), e["exp"]
    keys = motion_only_order_keys(toy / "mevis", split)
    dependent, free = keys["motion_only_order_dependent"], keys["motion_only_order_free"]
    assert not dependent & free
    assert dependent | free == motion_only_keys(toy / "mevis", split)["motion_only"]
    assert phrase_predicates("the red circle") == ()
    assert phrase_predicates("the square moving fast to the left") == ("fast", "left")
    assert phrase_predicates("both squares that move left") == ("left",)


@pytest.mark.parametrize("twin, expected", [("still", "free"), ("right", "dependent"),
                                            ("leave_right", "dependent"), ("jump", "free")])
def test_order_split_by_hand(tmp_path, twin, expected):
    """"the square moving left" against a look-alike that is still (or bouncing) holds backwards
    too; against one moving right (or leaving to the right) it points at the look-alike."""
    split = tmp_path / "valid_u"
    split.mkdir()
    look = dict(shape="square", colour="blue", size="small", speed="")
    objects = {"v": [dict(obj_id=0, motion="left", **look), dict(obj_id=1, motion=twin, **look)]}
    meta = {"videos": {"v": {"expressions": {"0": {"exp": "the square moving left", "obj_id": [0]}}}}}
    for name, content in (("meta_expressions.json", meta), ("toy_objects.json", {"videos": objects}),
                          ("motion_only.json", {"motion_only": {"v": ["0"]}})):
        (split / name).write_text(json.dumps(content))
    keys = motion_only_order_keys(tmp_path, "valid_u")
    assert keys[f"motion_only_order_{expected}"] == {"v/0"}
    assert motion_only_order_keys(tmp_path / "nowhere", "valid_u") == {}


# ---------------------------------------------------------------- YouTube-VIS format (for VITA)
@pytest.fixture(scope="module")
def toy_vis(tmp_path_factory):
    """A small video set of its own, so adding instances_vis.json leaves the `toy` fixture as
    make_toy wrote it (its determinism test compares every file)."""
    root = tmp_path_factory.mktemp("toy_vis") / "mevis"
    make_toy_video(root, seed=0, train_videos=3, valid_videos=3, verbose=False)
    before = _files(root)
    paths = write_toy_vis(root)
    return root, before, paths


@pytest.mark.parametrize("split", SPLITS)
def test_write_toy_vis_round_trips_the_toy_masks(toy_vis, split):
    root, _, paths = toy_vis
    assert paths == [root / s / "instances_vis.json" for s in SPLITS]
    _, meta, mask_dict, _, objects = _load_video_split(root.parent, split)
    vis = json.loads((root / split / "instances_vis.json").read_text())
    assert vis["categories"] == [{"id": i, "name": s, "supercategory": "shape"} for s, i in CATEGORY_IDS.items()]
    assert [v["id"] for v in vis["videos"]] == [1, 2, 3]
    video_of = {}
    for v, vid in zip(vis["videos"], sorted(meta)):
        frames = meta[vid]["frames"]
        assert v["file_names"] == [f"{vid}/{f}.jpg" for f in frames] and v["length"] == len(frames)
        assert (v["height"], v["width"]) == (VIDEO_H, VIDEO_W)
        assert all((root / split / "JPEGImages" / name).is_file() for name in v["file_names"])
        video_of[v["id"]] = vid
    shape_of = {o["anno_id"]: o["shape"] for objs in objects.values() for o in objs}
    assert sorted(a["anno_id"] for a in vis["annotations"]) == sorted(shape_of)  # one per object
    assert [a["id"] for a in vis["annotations"]] == list(range(1, len(shape_of) + 1))
    for a in vis["annotations"]:
        vid = video_of[a["video_id"]]
        assert objects[vid][a["obj_id"]]["anno_id"] == a["anno_id"]  # the object of its own video
        assert a["category_id"] == CATEGORY_IDS[shape_of[a["anno_id"]]] and a["iscrowd"] == 0
        rles = mask_dict[a["anno_id"]]
        assert len(a["segmentations"]) == len(a["areas"]) == len(a["bboxes"]) == len(rles)
        for seg, rle, area, bbox in zip(a["segmentations"], rles, a["areas"], a["bboxes"]):
            assert (seg is None) == (rle is None) == (area is None) == (bbox is None)
            if seg is None:
                continue
            mask = rle_decode(seg)
            assert np.array_equal(mask, rle_decode(rle)) and mask.sum() == area > 0
            x, y, w, h = (int(c) for c in bbox)
            assert mask[y:y + h, x:x + w].sum() == area  # the box holds the mask ...
            assert mask[y, x:x + w].any() and mask[y + h - 1, x:x + w].any()  # ... and is tight
            assert mask[y:y + h, x].any() and mask[y:y + h, x + w - 1].any()


def test_write_toy_vis_keeps_the_toy_files_and_writes_only_when_asked(toy_vis, tmp_path):
    root, before, paths = toy_vis
    after = _files(root)
    assert {k: v for k, v in after.items() if not k.endswith("instances_vis.json")} == before
    assert sorted(set(after) - set(before)) == [f"{s}/instances_vis.json" for s in SPLITS]
    assert not [p for p in root.rglob(".*")]  # no temporary file left behind
    original = paths[0].read_bytes()
    paths[0].write_text("{}")
    write_toy_vis(root)  # the file exists: left alone
    assert paths[0].read_text() == "{}"
    write_toy_vis(root, splits=("train",), overwrite=True)
    assert paths[0].read_bytes() == original  # and rewritten the same, byte for byte
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train" / "meta_expressions.json"))):
        write_toy_vis(tmp_path)


def test_youtube_vis_reader_reads_the_toy_vis_file(toy_vis):
    root, _, paths = toy_vis
    _, meta, mask_dict, _, objects = _load_video_split(root.parent, "train")
    ds = YouTubeVIS(paths[0], root / "train" / "JPEGImages", train=True, num_frames=4, frame_range=3,
                    short_side=VIDEO_H, max_size=VIDEO_W, flip=False)
    assert ds.classes == list(CATEGORY_IDS) and len(ds) == 3
    vis = json.loads(paths[0].read_text())
    anno_of = {a["id"]: a["anno_id"] for a in vis["annotations"]}
    shape_of = {o["anno_id"]: o["shape"] for objs in objects.values() for o in objs}
    for index in range(3):
        for _ in range(3):
            item = ds[index]
            clip = item["frame_idx"].tolist()
            vid = item["video"]
            visible = [o["anno_id"] for o in objects[vid]
                       if any(mask_dict[o["anno_id"]][t] is not None for t in clip)]
            assert sorted(anno_of[i] for i in item["ids"].tolist()) == sorted(visible)
            for k, i in enumerate(item["ids"].tolist()):
                anno = anno_of[i]
                assert item["labels"][k] == list(CATEGORY_IDS).index(shape_of[anno])
                for j, t in enumerate(clip):
                    rle = mask_dict[anno][t]
                    expected = np.zeros((VIDEO_H, VIDEO_W), bool) if rle is None else rle_decode(rle)
                    assert np.array_equal(item["masks"][k, j].numpy(), expected.astype(bool))
