"""Ref-ZOM: the reader on a small tree in the release layout (one-, many- and zero-target sentences,
splits, missing files), RIS-DMMI's metrics at 480 x 480 by hand (PIL's nearest neighbour, Pr@X with
>=, the no-target accuracy), the evaluation loop, and MRaCL's --data refzom (train, eval, no data)."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mracl
from common.coco_mask import rle_encode
from common.datasets import RefZOM, collate_image
from common.metrics import REFZOM_SIZE, RefZOMMetrics, pil_nearest_index, resize_nearest
from common.run import DATA_ROOTS, evaluate_image, parse_config
from common.text import build_vocab

REPO = Path(__file__).resolve().parents[1]
H0, W0 = 48, 64


def box(top, bottom, left, right, size=(H0, W0)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def sentence(sent_id, text):
    return {"sent_id": sent_id, "sent": text, "raw": text.capitalize(), "tokens": text.split()}


def write_refzom(base: Path):
    """The release layout: <root>/refs(final).p, <root>/instances.json; COCO train2014 and val2014
    images merged in one folder. Image 1 (train2014): annotations 100 (polygon), 101 (RLE), 102
    (polygon overlapping 100); image 2 (val2014): annotation 103. Train: a one-target sentence (int
    ann_id), a many-target ref with two sentences (list ann_id), a zero-target sentence (its ann_id
    names an annotation that is not in instances.json: never read); test: a one-target sentence
    (a list of one id) and a zero-target one."""
    root, images = base / "ref-zom", base / "trainval2014"
    files = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_val2014_000000000002.jpg"}
    images.mkdir(parents=True)
    for image_id, name in files.items():
        Image.fromarray(np.full((H0, W0, 3), 50 * image_id, dtype=np.uint8)).save(images / name)
    instances = {
        "images": [{"id": i, "file_name": name, "height": H0, "width": W0} for i, name in files.items()],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 18, "segmentation": [[8, 4, 24, 4, 24, 16, 8, 16]]},
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": rle_encode(box(20, 40, 40, 60))},
            {"id": 102, "image_id": 1, "category_id": 18, "segmentation": [[16, 10, 32, 10, 32, 20, 16, 20]]},
            {"id": 103, "image_id": 2, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    refs = [
        {"ref_id": 0, "ann_id": 100, "image_id": 1, "split": "train", "source": "one", "category_id": 18,
         "sentences": [sentence(0, "the dog on the left")]},
        {"ref_id": 1, "ann_id": [100, 101, 102], "image_id": 1, "split": "train", "source": "many",
         "category_id": 18, "sentences": [sentence(1, "all the things"), sentence(2, "every  object")]},
        {"ref_id": 2, "ann_id": 999, "image_id": 1, "split": "train", "source": "zero", "category_id": 5,
         "sentences": [sentence(3, "a cat jumping over the fence")]},
        {"ref_id": 3, "ann_id": [103], "image_id": 2, "split": "test", "source": "one", "category_id": 3,
         "sentences": [sentence(4, "a small car")]},
        {"ref_id": 4, "ann_id": 103, "image_id": 2, "split": "test", "source": "zero", "category_id": 3,
         "sentences": [sentence(5, "the horse running")]},
    ]
    root.mkdir(parents=True)
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "refs(final).p").write_bytes(pickle.dumps(refs))
    return root, images


@pytest.fixture
def tree(tmp_path):
    return write_refzom(tmp_path)


# ------------------------------------------------------------------------------------ reader
def test_reader_reads_one_many_and_zero_target_sentences(tree):
    root, images = tree
    ds = RefZOM(root, images, split="train", train=False, short_side=H0, max_size=W0)
    assert [s["sent_id"] for s in ds.samples] == [0, 1, 2, 3]  # every sentence its own sample
    assert [(s["ann_ids"], s["no_target"]) for s in ds.samples] == [
        ([100], False), ([100, 101, 102], False), ([100, 101, 102], False), ([], True)]
    # ann_id: the first target, or -1 - ref_id for no target; category: the first target's, or 0
    assert [(s["ann_id"], s["category_id"]) for s in ds.samples] == [(100, 18), (100, 18), (100, 18), (-3, 0)]
    one, many, many2, zero = (ds[i] for i in range(4))
    assert set(one) == {"gt", "image", "mask", "expression", "sent_id", "ref_id", "ann_id", "image_id",
                        "category_id", "index", "orig_size", "flipped"}  # RefCOCO's item
    assert np.array_equal(one["gt"].numpy(), box(4, 16, 8, 24))
    union = box(4, 16, 8, 24) | box(20, 40, 40, 60) | box(10, 20, 16, 32)  # overlapping 100 and 102
    assert np.array_equal(many["gt"].numpy(), union) and np.array_equal(many2["gt"].numpy(), union)
    assert many2["expression"] == "every object" and many2["sent_id"] == 2
    assert zero["gt"].shape == (H0, W0) and not zero["gt"].any() and not zero["mask"].any()
    assert zero["expression"] == "a cat jumping over the fence"
    assert ds.sentences[1] == ["all the things", "every object"] and ds.image_refs == {1: [0, 1, 2]}
    test = RefZOM(root, images, split="test", train=False, short_side=H0, max_size=W0)
    assert [(s["sent_id"], s["no_target"], s["file_name"]) for s in test.samples] == [
        (4, False, "COCO_val2014_000000000002.jpg"), (5, True, "COCO_val2014_000000000002.jpg")]
    assert np.array_equal(test[0]["gt"].numpy(), box(0, 4, 0, 4)) and not test[1]["gt"].any()
    with pytest.raises(ValueError, match=r"no refs with split 'val' .*\['test', 'train'\]"):
        RefZOM(root, images, split="val", train=False)


def test_training_items_collate_with_an_empty_target(tree):
    root, images = tree
    ds = RefZOM(root, images, split="train", train=True, short_side=24, max_size=32, flip=False)
    batch = collate_image([ds[i] for i in range(4)])
    masks = torch.stack([t["masks"][0] for t in batch["targets"]])  # (4, 32, 32)
    assert masks.shape == (4, 32, 32) and masks[3].sum() == 0 and masks[0].sum() == 6 * 8


@pytest.mark.parametrize("missing", ["refs(final).p", "instances.json", "trainval2014",
                                     "COCO_val2014_000000000002.jpg"])
def test_a_missing_file_is_named(tree, missing):
    root, images = tree
    path = {"refs(final).p": root / missing, "instances.json": root / missing, "trainval2014": images,
            "COCO_val2014_000000000002.jpg": images / missing}[missing]
    if path.is_dir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + r".*data/README\.md"):
        RefZOM(root, images, split="test", train=False)[0]


def test_bad_refs_are_named(tree):
    root, images = tree
    refs = pickle.loads((root / "refs(final).p").read_bytes())
    refs[0]["ann_id"] = 998  # a target that instances.json does not have
    (root / "refs(final).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(KeyError, match="annotations"):
        RefZOM(root, images, split="train", train=False)
    refs[0]["ann_id"] = []
    (root / "refs(final).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match="ref 0 has source 'one' but an empty ann_id"):
        RefZOM(root, images, split="train", train=False)
    del refs[0]["source"]
    (root / "refs(final).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(KeyError, match="'source' in ref 0"):
        RefZOM(root, images, split="train", train=False)


# ------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("size", [(640, 427), (427, 640), (2, 3), (960, 960), (481, 479), (7, 1000)])
def test_resize_is_pils_nearest_neighbour(size):
    """RIS-DMMI resizes the target with torchvision's F.resize(..., Image.NEAREST) on a PIL image,
    that is PIL's Image.resize: a running sum of the step, not (i + 0.5) * step."""
    mask = (np.random.default_rng(sum(size)).random(size) < 0.5).astype(np.uint8)
    pil = np.asarray(Image.fromarray(mask, mode="P").resize(REFZOM_SIZE[::-1], Image.NEAREST))
    assert np.array_equal(resize_nearest(mask, REFZOM_SIZE), pil)


def test_nearest_index_by_hand():
    assert pil_nearest_index(960, 480)[:3].tolist() == [1, 3, 5]  # halving reads the odd rows
    assert pil_nearest_index(2, 480)[[0, 239, 240, 479]].tolist() == [0, 0, 1, 1]
    assert pil_nearest_index(640, 480)[4] == 5  # int(4.5 * 4 / 3) would be 6


def test_refzom_metrics_by_hand():
    """Two sentences with a target, both scored at 480 x 480, and two without.
    A: gt (2, 2), its top-left pixel -> a 240 x 240 block (57,600 px); the prediction covers the left
       half of that block: I = 28,800, U = 57,600, IoU 0.5.
    B: gt (4, 4), its top row -> rows 0-119 (57,600 px), predicted exactly: IoU 1.
    At their own sizes A's target is 1 pixel and B's 4; at 480 x 480 both weigh 57,600 pixels:
    oIoU = (28,800 + 57,600) / (57,600 + 57,600) = 0.75.
    C: no target, empty prediction: correct. D: no target, one predicted pixel: wrong."""
    gt_a, gt_b = np.zeros((2, 2), bool), np.zeros((4, 4), bool)
    gt_a[0, 0], gt_b[0] = True, True
    pred_a, pred_b = np.zeros(REFZOM_SIZE, bool), np.zeros(REFZOM_SIZE, bool)
    pred_a[:240, :120], pred_b[:120] = True, True
    pred_d = torch.zeros(REFZOM_SIZE, dtype=torch.bool)
    pred_d[300, 300] = True
    metrics = RefZOMMetrics()
    assert metrics.add(pred_a, gt_a, no_target=False, key="a") == {
        "key": "a", "no_target": False, "I": 28_800, "U": 57_600, "IoU": 0.5}
    metrics.add(torch.from_numpy(pred_b), torch.from_numpy(gt_b), no_target=False, key="b")
    assert metrics.add(np.zeros(REFZOM_SIZE), np.zeros((5, 7)), no_target=True, key="c")["correct"] == 1
    assert metrics.add(pred_d, np.zeros((5, 7)), no_target=True, key="d")["correct"] == 0
    s = metrics.summary()
    assert s["oIoU"] == 0.75 and s["mIoU"] == 0.75 and (s["n"], s["n_zero"]) == (2, 2)
    assert s["Pr@0.5"] == 1.0 and s["Pr@0.6"] == s["Pr@0.9"] == 0.5  # IoU >= X: A counts at 0.5
    assert s["acc_zero"] == 0.5 and (s["cum_I"], s["cum_U"]) == (86_400, 115_200)


def test_refzom_metrics_resize_edge_cases():
    """Halving a 960 x 960 target reads its odd rows: a target on row 0 vanishes (U = |P|, IoU 0),
    one on row 1 becomes row 0. A target that vanishes under an empty prediction has U = 0 and
    IoU 0 (test.py), and still counts in n and mIoU. A prediction of another size is resized too."""
    row0, row1 = np.zeros((960, 960), bool), np.zeros((960, 960), bool)
    row0[0], row1[1] = True, True
    top = np.zeros(REFZOM_SIZE, bool)
    top[0] = True
    metrics = RefZOMMetrics()
    assert metrics.add(top, row0, no_target=False)["IoU"] == 0.0  # I 0, U 480
    assert metrics.add(top, row1, no_target=False)["IoU"] == 1.0
    assert metrics.add(np.zeros(REFZOM_SIZE), row0, no_target=False) == {
        "key": None, "no_target": False, "I": 0, "U": 0, "IoU": 0.0}
    assert metrics.add(row1, row1, no_target=False)["IoU"] == 1.0  # both resized: row 0, 480 px
    s = metrics.summary()
    assert s["mIoU"] == 0.5 and s["oIoU"] == 960 / 1440 and np.isnan(s["acc_zero"])
    only_zero = RefZOMMetrics()
    only_zero.add(np.zeros((3, 3)), np.zeros((3, 3)), no_target=True)
    s = only_zero.summary()
    assert s["acc_zero"] == 1.0 and s["n"] == 0 and np.isnan(s["oIoU"]) and np.isnan(s["Pr@0.5"])
    with pytest.raises(ValueError, match="expected pred and gt"):
        RefZOMMetrics().add(np.zeros((1, 4, 4)), np.zeros((4, 4)), no_target=False)


# ------------------------------------------------------------------------------------ evaluation
def test_evaluation_asks_for_480_by_480_and_writes_the_metrics(tree, tmp_path):
    root, images = tree
    ds = RefZOM(root, images, split="test", train=False, short_side=H0, max_size=W0)
    sizes = []

    def predict(item):  # right on the one-target sentence, a stray pixel on the zero-target one
        sizes.append(item["orig_size"])
        if item["sent_id"] == 4:
            return torch.from_numpy(resize_nearest(item["gt"].numpy(), item["orig_size"]))
        mask = torch.zeros(item["orig_size"], dtype=torch.bool)
        mask[0, 0] = True
        return mask

    result = evaluate_image(ds, predict, model=torch.nn.Identity(), out=tmp_path / "run", split="test",
                            subsets={"motion": {"5"}}, show=1)
    assert sizes == [REFZOM_SIZE, REFZOM_SIZE]
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["protocol"].startswith("RIS-DMMI") and "Oc-IoU" not in saved
    assert (saved["oIoU"], saved["mIoU"], saved["Pr@0.9"], saved["acc_zero"]) == (1.0, 1.0, 1.0, 0.0)
    assert (saved["n"], saved["n_zero"]) == (1, 1) and saved["motion"]["n_zero"] == 1
    assert saved["per_expression"] == result["per_expression"] and len(saved["per_expression"]) == 2
    assert Image.open(tmp_path / "run" / "vis" / "sent4.png").size == REFZOM_SIZE[::-1]


def test_mracl_refzom_preset_and_data_root():
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--data", "refzom", "--eval"])
    assert (cfg.split_by, cfg.eval_split, cfg.image_root) == ("final", "test", "data/coco/trainval2014")
    assert DATA_ROOTS["refzom"] == "data/ref-zom"
    assert "data/ref-zom" in (REPO / "data" / "README.md").read_text()


def test_mracl_trains_and_evaluates_on_refzom_with_the_toy_model(tree, tmp_path, monkeypatch):
    """--data refzom end to end with the toy-size LAVT in place of the paper's (no weights offline):
    --train runs on the train split (one-, many- and zero-target sentences, with verb phrases) and
    scores test; --eval of its checkpoint writes the same Ref-ZOM metrics, equal to scoring the
    model's own rule at 480 x 480 by hand."""
    root, images = tree
    toy_cfg = parse_config(mracl.Config, mracl.PRESETS, ["--data", "toy", "--decoder-dim", "16",
                                                         "--toy-text-dim", "16", "--count-params"])
    words = build_vocab(["the dog on the left all things every object a cat jumping over fence small car horse"])
    build = mracl.build_model
    monkeypatch.setattr(mracl, "build_model", lambda cfg, vocab=None, pretrained=True: build(toy_cfg, vocab=words))
    out = tmp_path / "run"
    common = ["--data", "refzom", "--data-root", str(root), "--image-root", str(images), "--out", str(out),
              "--short-side", "48", "--max-size", "64", "--workers", "0", "--decoder-dim", "16"]
    mracl.main([*common, "--train", "--steps", "2", "--batch-size", "4", "--log-every", "1"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    trained = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()
    mracl.main([*common, "--eval"])
    result = json.loads((out / "eval.json").read_text())
    assert result["per_expression"] == trained["per_expression"]
    assert {"oIoU", "mIoU", "Pr@0.5", "Pr@0.9", "acc_zero", "n", "n_zero", "motion", "static"} <= set(result)
    assert (result["n"], result["n_zero"]) == (1, 1)
    # the same numbers from the rule called by hand at 480 x 480
    from common.run import load_trained
    model, _ = load_trained(out / "last.pt", mracl.Config, mracl.build_model, torch.device("cpu"))
    ds = RefZOM(root, images, split="test", train=False, short_side=48, max_size=64)
    by_hand = RefZOMMetrics()
    for i in range(len(ds)):
        item = ds[i]
        mask = mracl.predict_masks(model, item["image"][None], item["expression"], REFZOM_SIZE)
        by_hand.add(mask, item["gt"], no_target=ds.samples[i]["no_target"], key=str(item["sent_id"]))
    assert by_hand.records == result["per_expression"]


def test_mracl_refzom_trains_in_epochs(tree, tmp_path, monkeypatch):
    """The refzom preset's schedule is 40 epochs (RIS-DMMI), not a step count: --steps 0 trains
    --epochs x the training set's batches of --batch-size."""
    root, images = tree
    preset = parse_config(mracl.Config, mracl.PRESETS, ["--data", "refzom", "--eval"])
    assert (preset.steps, preset.epochs) == (0, 40)
    toy_cfg = parse_config(mracl.Config, mracl.PRESETS, ["--data", "toy", "--decoder-dim", "16",
                                                         "--toy-text-dim", "16", "--count-params"])
    words = build_vocab(["the dog on the left all things every object a cat jumping over fence"])
    build = mracl.build_model
    monkeypatch.setattr(mracl, "build_model",
                        lambda cfg, vocab=None, pretrained=True: build(toy_cfg, vocab=words))
    args = ["--data", "refzom", "--data-root", str(root), "--image-root", str(images),
            "--short-side", "48", "--max-size", "64", "--workers", "0", "--decoder-dim", "16",
            "--batch-size", "2", "--log-every", "1"]
    cfg = parse_config(mracl.Config, mracl.PRESETS, [*args, "--eval"])
    items = len(mracl.make_dataset(cfg, root, "train", train=True))
    assert items >= 4
    out = tmp_path / "run"
    mracl.main([*args, "--out", str(out), "--train", "--epochs", "2"])
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 * (items // 2) == len(steps)
    with pytest.raises(SystemExit, match="no step"):
        mracl.main([*args, "--out", str(tmp_path / "none"), "--train", "--epochs", "0"])


def test_mracl_refzom_without_data_ends_with_one_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    with pytest.raises(SystemExit) as excinfo:
        mracl.main(["--data", "refzom", "--eval"])
    message = str(excinfo.value.code)
    assert "data/README.md" in message and "no refzom dataset" in message and "\n" not in message
    assert str(tmp_path / "data" / "ref-zom") in message


@pytest.mark.slow
def test_mracl_refzom_cli_without_data_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "mracl.py"), "--data", "refzom", "--eval"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("no refzom dataset at ")
    assert "data/README.md" in result.stderr
