"""A2D-Sentences and JHMDB-Sentences: the readers on synthetic trees in their (converted) layouts,
the release's quirks, data/convert_a2d.py without PyAV / h5py, the ReferFormer evaluation loop,
and `dshmp.py --data a2d|jhmdb`."""

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import dshmp
from common.datasets import (A2DSentences, JHMDBSentences, a2d_instance_masks, annotated_window,
                             collate_video, sample_annotated_clip)
from common.engine import save_checkpoint
from common.matching import annotated_frames
from common.run import evaluate_video, parse_config, video_query_masks
from data import convert_a2d
from test_dshmp import FixedVideoTokens  # a stand-in for DsHmp.infer

H, W = 48, 64  # frame size of the synthetic videos (the toy backbone needs 2 x 2 at stride 32)


def gray(t):  # the grey level of frame t (0-based): tells the frames of a clip apart
    return 10 + 20 * t


def level(frames):  # normalised (T, 3, H, W) -> the grey level of each frame
    return (frames[:, 0].mean((1, 2)) * 0.229 + 0.485) * 255


def box(y0, x0, y1, x1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------- A2D tree
# (video, split, frames, {annotated frame (1-based): {instance id: (H, W) mask}})
A2D_VIDEOS = [
    ("vidA", 1, 10, {3: {1: box(2, 3, 10, 12), 2: box(12, 15, 20, 30)}, 7: {2: box(5, 5, 15, 20)}}),
    ("vidC", 1, 3, {1: {1: box(0, 0, 6, 6)}}),
    ("vidM", 1, 4, {2: {1: box(0, 0, 6, 6)}}),  # listed in a2d_missed_videos.txt
    ("vidB", 0, 6, {2: {1: box(4, 4, 14, 20), 3: np.zeros((H, W), bool)}}),  # train; 3: empty
]
A2D_ROWS = [("vidA", "1", "The man  RUNNING"), ("vidA", "2", "a dog jumping"),
            ("vidA", "1 (copy)", "the release's one copied row"), ("vidM", "1", "missed video"),
            ("vidB", "1", "a car on the left"), ("vidB", "3", "an absent actor"),
            ("vidC", "1", "a ball")]


def frame_arrays(instances: dict) -> dict:
    """One annotated frame as the release's .h5 holds it: reMask transposed, (N, W, H), or (W, H)
    for one instance; reBBox (4, N); instance (N,)."""
    ids = list(instances)
    masks = np.stack([instances[i].T for i in ids]).astype(np.uint8)  # (N, W, H)
    return {"reMask": masks[0] if len(ids) == 1 else masks,
            "reBBox": np.zeros((4, len(ids))), "instance": np.array(ids, dtype=np.float64)}


def write_a2d_release_text(root: Path):
    (root / "Release").mkdir(parents=True, exist_ok=True)
    (root / "text_annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "Release" / "videoset.csv", "w", newline="") as f:
        for video, split, length, _ in A2D_VIDEOS:
            csv.writer(f).writerow([video, 11, 0, 1, H, W, length, 1, split])
    (root / "text_annotations" / "a2d_missed_videos.txt").write_text("vidM\n")
    with open(root / "text_annotations" / "a2d_annotation.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "instance_id", "query"])
        writer.writerows(A2D_ROWS)


def write_a2d(root: Path) -> Path:
    """The converted layout data/convert_a2d.py writes."""
    write_a2d_release_text(root)
    for video, _, length, annotated in A2D_VIDEOS:
        convert_a2d.write_frames([np.full((H, W, 3), gray(t), np.uint8) for t in range(length)],
                                 root / "JPEGImages" / video, quality=95)
        for frame, instances in annotated.items():
            convert_a2d.write_annotation(frame_arrays(instances), root / convert_a2d.MASK_DIR /
                                         video / f"{frame:05d}.npz")
    return root


@pytest.fixture(scope="module")
def a2d_root(tmp_path_factory):
    return write_a2d(tmp_path_factory.mktemp("a2d"))


def a2d(root, split="test", **kwargs):
    return A2DSentences(root, split, train=split == "train",
                        **{"short_side": H, "max_size": W, **kwargs})


def test_a2d_reads_the_samples_as_mttr_builds_them(a2d_root):
    samples = a2d(a2d_root).samples
    # one sample per (sentence row, annotated frame listing its instance); '1 (copy)' and the
    # missed video dropped; vidA's instance 1 is not in frame 7
    assert [s["image_id"] for s in samples] == ["v_vidA_f_3_i_1", "v_vidA_f_3_i_2", "v_vidA_f_7_i_2",
                                                "v_vidC_f_1_i_1"]
    assert samples[0]["expression"] == "the man running"
    assert [s["exp_id"] for s in samples] == ["0", "1", "1", "6"]
    assert [(s["frame"], s["length"]) for s in samples] == [(2, 10), (2, 10), (6, 10), (0, 3)]
    assert [s["image_id"] for s in a2d(a2d_root, "train").samples] == ["v_vidB_f_2_i_1",
                                                                     "v_vidB_f_2_i_3"]


def test_a2d_masks_undo_the_transposition_of_both_layouts(a2d_root):
    dataset = a2d(a2d_root)
    expected = [A2D_VIDEOS[0][3][3][1], A2D_VIDEOS[0][3][3][2],  # (N, W, H) stored
                A2D_VIDEOS[0][3][7][2], A2D_VIDEOS[1][3][1][1]]  # (W, H) stored: one instance
    for i, mask in enumerate(expected):
        assert torch.equal(dataset[i]["gt"], torch.from_numpy(mask))
    # the first listed mask of an id, as MTTR's `instances.index`
    ids, masks = a2d_instance_masks({"instance": np.array([4, 4]), "reMask": np.stack([
        box(0, 0, 2, 2).T, box(5, 5, 9, 9).T])}, "x")
    assert ids.tolist() == [4, 4] and masks.shape == (2, H, W) and masks[0].sum() == 4
    with pytest.raises(ValueError, match="reMask of shape"):
        a2d_instance_masks({"instance": np.array([1, 2]), "reMask": np.zeros((W, H))}, "x")


def test_a2d_evaluation_window_and_scored_frame(a2d_root):
    dataset = a2d(a2d_root)
    item = dataset[2]  # frame 7 of 10: frames 5-9, the annotated one in the middle
    assert item["frame_idx"].tolist() == [4, 5, 6, 7, 8] and item["frame"] == 2
    assert torch.allclose(level(item["frames"]), torch.tensor([gray(t) for t in range(4, 9)],
                                                              dtype=torch.float), atol=2)
    item = dataset[3]  # frame 1 of 3: clamped to the edges; the first occurrence is scored
    assert item["frame_idx"].tolist() == [0, 0, 0, 1, 2] and item["frame"] == 0
    assert item["orig_size"] == (H, W) and item["gt"].shape == (H, W)
    assert annotated_window(10, 9, num_frames=8) == ([5, 6, 7, 8, 9, 9, 9, 9], 4)


def test_a2d_training_items_supervise_the_annotated_frame_only(a2d_root):
    dataset = a2d(a2d_root, "train", num_frames=4)
    torch.manual_seed(0)
    for _ in range(3):
        item = dataset[0]
        frame_idx, t = item["frame_idx"].tolist(), item["annotated_frame"]
        assert len(frame_idx) == 4 and frame_idx == sorted(frame_idx) and frame_idx[t] == 1
        assert item["masks"].shape == (1, 1, H, W) and item["masks"].any()
        assert abs(level(item["frames"][t:t + 1]).item() - gray(1)) < 2
    # instance 3's mask is empty: ReferFormer draws another sample instead
    assert dataset[1]["index"] == 0
    batch = collate_video([dataset[0], dataset[1]])
    assert len(batch["annotated_frame"]) == 2 and batch["targets"][0]["masks"].shape[1] == 1


def test_referformer_training_clip():
    generator = torch.Generator().manual_seed(0)
    for length, frame in [(30, 0), (30, 29), (30, 12), (5, 2), (2, 1)]:
        for _ in range(20):
            frame_idx, position = sample_annotated_clip(length, frame, num_frames=8,
                                                        generator=generator)
            assert len(frame_idx) == 8 and frame_idx == sorted(frame_idx)
            assert frame_idx[position] == frame and frame not in frame_idx[:position]
            assert all(0 <= i < length for i in frame_idx)
            near = [i for i in frame_idx if i != frame and abs(i - frame) <= 3]
            assert near or frame in (0, length - 1)  # a frame 1-3 away on some side
    with pytest.raises(ValueError, match="at least 3 frames"):
        sample_annotated_clip(10, 2, num_frames=2, generator=generator)


@pytest.mark.parametrize("remove, named", [
    ("text_annotations/a2d_missed_videos.txt", "a2d_missed_videos.txt"),
    ("Release/videoset.csv", "videoset.csv"),
    ("text_annotations/a2d_annotation.txt", "a2d_annotation.txt"),
    ("JPEGImages/vidA/00004.jpg", "00004.jpg"),
    ("text_annotations/a2d_annotation_with_instances/vidC", "vidC"),
])
def test_a2d_missing_file_is_named(tmp_path, remove, named):
    root = write_a2d(tmp_path)
    shutil.rmtree(root / remove) if (root / remove).is_dir() else (root / remove).unlink()
    with pytest.raises(FileNotFoundError, match=named) as excinfo:
        a2d(root)
    assert "data/README.md" in str(excinfo.value)


def test_a2d_annotation_beyond_the_video_is_an_error(tmp_path):
    root = write_a2d(tmp_path)
    convert_a2d.write_annotation(frame_arrays({1: box(0, 0, 3, 3)}),
                                 root / convert_a2d.MASK_DIR / "vidC" / "00009.npz")
    with pytest.raises(FileNotFoundError, match="annotates frame 9"):
        a2d(root)


# ---------------------------------------------------------------------------------- JHMDB tree
JHMDB_VIDEOS = [("pullup", "vidJ", 10, 7, [2, 5, 7], "Man  pulling UP"),  # 7 masks for 10 PNGs
                ("walk", "vidK", 6, 6, [1, 3, 6], "a woman walking")]


def jhmdb_mask(video_index, t):
    return box(2 + t, 3 * video_index, 10 + t, 12 + 3 * video_index)


def write_jhmdb(root: Path) -> Path:
    metadata = []
    for v, (cls, video, pngs, masks, frames, text) in enumerate(JHMDB_VIDEOS):
        folder = root / "Rename_Images" / cls / video
        folder.mkdir(parents=True)
        for t in range(pngs):
            Image.fromarray(np.full((H, W, 3), gray(t), np.uint8)).save(folder / f"{t + 1:05d}.png")
        mask_dir = root / "puppet_mask" / cls / video
        mask_dir.mkdir(parents=True)
        part_mask = np.stack([jhmdb_mask(v, t) for t in range(masks)], axis=2)  # (H, W, T)
        scipy.io.savemat(mask_dir / "puppet_mask.mat", {"part_mask": part_mask.astype(np.uint8)})
        for frame in frames:  # as MTTR's shipped json lists them
            metadata.append([video, f"./jhmdb_sentences/Rename_Images/{cls}/{video}/{frame:05d}.png",
                             f"./jhmdb_sentences/puppet_mask/{cls}/{video}/puppet_mask.mat",
                             min(pngs, masks), text])
    (root / "jhmdb_sentences_samples_metadata.json").write_text(json.dumps(metadata))
    return root


@pytest.fixture(scope="module")
def jhmdb_root(tmp_path_factory):
    return write_jhmdb(tmp_path_factory.mktemp("jhmdb"))


def test_jhmdb_reads_mttrs_samples_and_masks(jhmdb_root):
    dataset = JHMDBSentences(jhmdb_root, "test", short_side=H, max_size=W)
    assert [s["image_id"] for s in dataset.samples] == [
        "v_vidJ_f_2", "v_vidJ_f_5", "v_vidJ_f_7", "v_vidK_f_1", "v_vidK_f_3", "v_vidK_f_6"]
    item = dataset[2]  # frame 7, the last with a mask: the window stops at 7, not at the 10th PNG
    assert item["frame_idx"].tolist() == [4, 5, 6, 6, 6] and item["frame"] == 2
    assert item["expression"] == "man pulling up"
    assert torch.equal(item["gt"], torch.from_numpy(jhmdb_mask(0, 6)))
    assert torch.allclose(level(item["frames"]), torch.tensor(
        [gray(t) for t in [4, 5, 6, 6, 6]], dtype=torch.float), atol=2)
    assert torch.equal(dataset[3]["gt"], torch.from_numpy(jhmdb_mask(1, 0)))
    with pytest.raises(ValueError, match="evaluation only"):
        JHMDBSentences(jhmdb_root, "test", train=True)


@pytest.mark.parametrize("remove", ["jhmdb_sentences_samples_metadata.json",
                                    "puppet_mask/walk/vidK/puppet_mask.mat",
                                    "Rename_Images/pullup/vidJ/00006.png"])
def test_jhmdb_missing_file_is_named(tmp_path, remove):
    root = write_jhmdb(tmp_path)
    (root / remove).unlink()
    with pytest.raises(FileNotFoundError, match=Path(remove).name) as excinfo:
        JHMDBSentences(root, "test")
    assert "data/README.md" in str(excinfo.value)


def test_jhmdb_mask_file_shorter_than_the_json_says(tmp_path):
    root = write_jhmdb(tmp_path)
    metadata = json.loads((root / "jhmdb_sentences_samples_metadata.json").read_text())
    metadata[2][1] = metadata[2][1].replace("00007", "00009")  # frame 9 of 10 PNGs, 7 masks
    metadata[2][3] = 10
    (root / "jhmdb_sentences_samples_metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="T >= 9"):
        JHMDBSentences(root, "test")[2]


# ---------------------------------------------------------------------------------- conversion
def test_conversion_without_av_or_h5py(tmp_path, monkeypatch):
    """data/convert_a2d.py on a release whose videos and .h5 files are stood in for: the tree it
    writes is the one A2DSentences reads, equal to the synthetic converted tree."""
    release = tmp_path / "release"
    write_a2d_release_text(release)
    for video, _, _, annotated in A2D_VIDEOS:
        (release / convert_a2d.MASK_DIR / video).mkdir(parents=True)
        for frame in annotated:
            (release / convert_a2d.MASK_DIR / video / f"{frame:05d}.h5").touch()
    assert convert_a2d.videos_to_convert(release) == ["vidA", "vidB", "vidC"]  # vidM missed
    lengths = {v: n for v, _, n, _ in A2D_VIDEOS}
    annotations = {v: a for v, _, _, a in A2D_VIDEOS}
    monkeypatch.setattr(convert_a2d, "decode_video", lambda path: (
        np.full((H, W, 3), gray(t), np.uint8) for t in range(lengths[path.stem])))
    monkeypatch.setattr(convert_a2d, "read_h5", lambda path: convert_a2d.h5_arrays(
        frame_arrays(annotations[path.parent.name][int(path.stem)])))
    monkeypatch.setattr(convert_a2d.importlib.util, "find_spec", lambda name: object())
    out = tmp_path / "converted"
    convert_a2d.main(["--release", str(release), "--out", str(out), "--workers", "1"])
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == ["vidA", "vidB", "vidC"]
    assert len(list((out / "JPEGImages" / "vidA").glob("*.jpg"))) == 10
    with np.load(out / convert_a2d.MASK_DIR / "vidA" / "00007.npz") as arrays:
        assert arrays["reMask"].shape == (W, H)  # kept as the release stores it
    converted, reference = a2d(out), a2d(write_a2d(tmp_path / "reference"))
    assert [s["image_id"] for s in converted.samples] == [s["image_id"] for s in reference.samples]
    assert all(torch.equal(converted[i]["gt"], reference[i]["gt"]) for i in range(len(converted)))
    convert_a2d.main(["--release", str(release), "--out", str(out), "--workers", "1"])  # resumes


def test_conversion_needs_av_and_h5py_and_says_how_to_install(tmp_path, capsys):
    if convert_a2d.importlib.util.find_spec("av") and convert_a2d.importlib.util.find_spec("h5py"):
        pytest.skip("PyAV and h5py are installed here")
    with pytest.raises(SystemExit, match="pip install av h5py"):
        convert_a2d.main(["--release", str(tmp_path)])


# ---------------------------------------------------------------------------------- evaluation
A2D_KEYS = {"oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "mAP", "AP@0.5",
            "AP@0.75", "AP_small", "AP_medium", "AP_large", "n"}


def test_evaluation_scores_the_annotated_frame(a2d_root, tmp_path):
    dataset = a2d(a2d_root)
    frames_seen = []

    def perfect(item):  # the target at the annotated frame, nothing elsewhere
        masks = torch.zeros(len(item["frame_idx"]), H, W, dtype=torch.bool)
        masks[item["frame"]] = item["gt"]
        frames_seen.append(item["frame"])
        return masks, torch.tensor(0.9)

    result = evaluate_video(dataset, perfect, model=torch.nn.Identity(), out=tmp_path, data="a2d",
                            split="test")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert A2D_KEYS <= set(saved) and saved["n"] == len(dataset) == 4
    assert all(saved[k] == 1.0 for k in ("oIoU", "mIoU", "P@0.9", "mAP", "AP@0.75", "AP_small"))
    assert saved["AP_large"] == -1.0  # no target of 96 x 96 pixels: COCOeval's -1
    assert [r["key"] for r in saved["per_expression"]] == [s["image_id"] for s in dataset.samples]
    assert frames_seen == [2, 2, 2, 0] and result["mAP"] == 1.0

    def shifted(item):  # K = 2 predictions: a wrong one scored higher, the target lower
        masks = torch.zeros(2, len(item["frame_idx"]), H, W, dtype=torch.bool)
        masks[0, item["frame"]] = item["gt"].roll(8, dims=1)
        masks[1, item["frame"]] = item["gt"]
        return masks, torch.tensor([0.8, 0.3])

    result = evaluate_video(dataset, shifted, model=torch.nn.Identity(), out=tmp_path, data="a2d",
                            split="test")
    assert result["mIoU"] < 1 and 0 < result["mAP"] < 1  # IoU from the best-scored one


def test_video_query_masks_every_gives_each_tokens_mask_and_score():
    masks = torch.full((3, 2, 8, 8), -5.0)
    masks[1, :, :4, :4] = 5.0
    masks[2, :, 4:, 4:] = 5.0
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])  # target scores 0.5, 0.88, 0.27
    frames = torch.zeros(2, 3, 32, 32)
    every, scores = video_query_masks(FixedVideoTokens(logits, masks), frames, "x", (32, 32),
                                      threshold=0.5, chunk=8, top1=True, every=True)
    assert every.shape == (3, 2, 32, 32) and not every[0].any()
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([0.0, 2.0, -1.0])))
    top1 = video_query_masks(FixedVideoTokens(logits, masks), frames, "x", (32, 32), threshold=0.5,
                             chunk=8, top1=True)
    assert torch.equal(every[scores.argmax()], top1)  # oIoU / mIoU's mask: the top-1 one
    assert top1[:, :14, :14].all() and not top1[:, 18:].any() and not top1[:, :, 18:].any()
    assert every[2][:, 18:, 18:].all() and not every[2][:, :14].any()


def test_annotated_frames_selects_each_clips_frame():
    B, M, T, Q = 2, 3, 4, 5
    video = torch.randn(B, M, T, 6, 6)
    per_frame = torch.randn(B * T, Q, 6, 6)
    outputs = {"pred_logits": torch.randn(B, M, 2), "pred_masks": video,
               "aux_outputs": [{"pred_logits": torch.randn(B, M, 2), "pred_masks": video + 1}],
               "frame_outputs": {"pred_masks": per_frame, "query_embeds": [per_frame[:, :, 0]],
                                 "aux_outputs": [{"pred_masks": per_frame}]}}
    out = annotated_frames(outputs, [3, 1])
    assert torch.equal(out["pred_masks"][:, :, 0], torch.stack([video[0, :, 3], video[1, :, 1]]))
    assert out["pred_masks"].shape == (B, M, 1, 6, 6)
    assert torch.equal(out["aux_outputs"][0]["pred_masks"], out["pred_masks"] + 1)
    assert torch.equal(out["frame_outputs"]["pred_masks"], per_frame[[3, 5]])
    assert torch.equal(out["frame_outputs"]["query_embeds"][0], per_frame[[3, 5], :, 0])
    assert annotated_frames(outputs, None) is outputs


# ---------------------------------------------------------------------------------- dshmp.py
@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A toy-size DsHmp with random weights, saved as --train saves it."""
    cfg = parse_config(dshmp.Config, dshmp.PRESETS, ["--data", "toy", "--eval", "--hmp-blocks", "1"])
    vocab = sorted({w for _, _, q in A2D_ROWS for w in q.lower().split()} | {"pulling", "up"})
    torch.manual_seed(0)
    model = dshmp.build_model(cfg, vocab=vocab)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, model=model, step=0, config=asdict(cfg), extra={"vocab": vocab})
    return cfg, model, path


def test_dshmp_a2d_training_losses_read_the_annotated_frame(a2d_root, toy_checkpoint):
    cfg, model, _ = toy_checkpoint
    dataset = a2d(a2d_root, "train", num_frames=4)
    batch = collate_video([dataset[0], dataset[0]])
    raw = model(batch["frames"], batch["expression"])
    frames, T = batch["annotated_frame"], batch["frames"].shape[1]

    def terms_with_frame_changed(positions):  # the final and per-frame masks there changed
        video, per_frame = raw["pred_masks"].clone(), raw["frame_outputs"]["pred_masks"].clone()
        for b, t in enumerate(positions):
            video[b, :, t] = video[b, :, t].flip(-1) * 10
            per_frame[b * T + t] = per_frame[b * T + t].flip(-1) * 10
        changed = {**raw, "pred_masks": video,
                   "frame_outputs": {**raw["frame_outputs"], "pred_masks": per_frame}}
        torch.manual_seed(0)  # the same sampled points (Mask2Former's point losses)
        return dshmp.compute_losses(cfg, annotated_frames(changed, frames), batch["targets"])[0]

    torch.manual_seed(0)
    terms, _, _ = dshmp.compute_losses(cfg, annotated_frames(raw, frames), batch["targets"])
    other = terms_with_frame_changed([(int(f) + 1) % T for f in frames])  # not annotated
    annotated = terms_with_frame_changed([int(f) for f in frames])
    for name in ("video_bce", "video_dice", "frame_bce", "frame_dice"):
        assert torch.equal(other[name], terms[name]) and not torch.equal(annotated[name], terms[name])
    sum(terms.values()).backward()
    assert model.mask_embed.layers[0].weight.grad.abs().sum() > 0


def test_dshmp_evaluates_a2d_and_jhmdb_zero_shot(a2d_root, jhmdb_root, toy_checkpoint, tmp_path):
    _, _, checkpoint = toy_checkpoint
    small = ["--num-frames", "4", "--short-side", str(H), "--max-size", str(W)]
    for data, root in (("a2d", a2d_root), ("jhmdb", jhmdb_root)):
        dshmp.main(["--data", data, "--eval", "--checkpoint", str(checkpoint), "--data-root",
                    str(root), "--out", str(tmp_path / data), *small])
        result = json.loads((tmp_path / data / "eval.json").read_text())
        assert A2D_KEYS <= set(result) and 0 <= result["mIoU"] <= 1 and 0 <= result["mAP"] <= 1
        assert result["n"] == (4 if data == "a2d" else 6)


@pytest.mark.parametrize("data", ["a2d", "jhmdb"])
def test_dshmp_without_the_dataset_ends_with_one_message(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    with pytest.raises(SystemExit) as excinfo:
        dshmp.main(["--data", data, "--eval"])
    message = str(excinfo.value.code)
    assert "data/README.md" in message and f"no {data} dataset" in message and "\n" not in message


def test_jhmdb_is_evaluation_only(capsys):
    with pytest.raises(SystemExit):
        parse_config(dshmp.Config, dshmp.PRESETS, ["--data", "jhmdb", "--train"])
    assert "train with --data a2d" in capsys.readouterr().err
