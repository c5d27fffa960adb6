"""common/run.py, the run toolkit: config from a dataclass + presets + argv, run folders, optimizer
groups, training scaffolding, the evaluation loops, prediction on a user's files, CLI errors."""
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.engine import CheckpointError, Dist
from common.run import (RunConfig, check_finite, cli_errors, config_from_dict, evaluate_image, evaluate_video,
                        field_comments, param_groups, parse_config, predict_files, run_dir, train_batches)

REPO = Path(__file__).resolve().parents[1]
SINGLE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


@dataclass
class Config(RunConfig):
    data: str = "real"  # the paper's dataset
    lr: float = 1e-4  # paper Sec. 4 (a made-up source)
    # ablations
    fancy: bool = True  # the paper's module; --no-fancy drops it
    loss: str = "ours"  # ours | theirs
    width: int = 8
    diagnostic: bool = False  # (ours) off by default


PRESETS = {"real": dict(), "toy": dict(lr=1e-3, width=2)}


# ---------------------------------------------------------------------------------- config
def test_parse_config_applies_defaults_then_preset_then_command_line():
    cfg = parse_config(Config, PRESETS, ["--eval"])
    assert (cfg.data, cfg.lr, cfg.width, cfg.fancy) == ("real", 1e-4, 8, True)
    cfg = parse_config(Config, PRESETS, ["--data", "toy", "--train", "--width", "5", "--no-fancy", "--lr", "1"])
    assert (cfg.data, cfg.lr, cfg.width, cfg.fancy, cfg.train) == ("toy", 1.0, 5, False, True)
    assert isinstance(cfg.lr, float)


@pytest.mark.slow
def test_help_lists_every_field_with_its_source_comment():
    comments = field_comments(Config)
    assert comments["lr"] == "paper Sec. 4 (a made-up source)"
    assert comments["width"] == "ablations"  # no comment on its line: the section heading above it
    assert comments["resume"] == "continue training from <out>/last.pt"  # inherited from RunConfig
    text = subprocess.run([sys.executable, "dshmp.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120).stdout
    import dshmp
    flat = "".join(text.split())  # argparse wraps lines, also at hyphens
    for name, comment in field_comments(dshmp.Config).items():
        assert "--" + name.replace("_", "-") in text, name
        assert "".join(comment.split()) in flat, (name, comment)
    assert "presets(--data):toy:" in flat


@pytest.mark.parametrize("argv, message", [
    (["--data", "nope", "--eval"], "--data must be one of"),
    ([], "nothing to do"),
    (["--train", "--predict", "x.jpg"], "does not go with --train"),
])
def test_bad_command_lines_stop_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        parse_config(Config, PRESETS, argv)
    assert excinfo.value.code == 2 and message in capsys.readouterr().err


def test_davis_is_evaluation_only(capsys):
    presets = {"davis": dict(), "ytvos": dict()}
    with pytest.raises(SystemExit):
        parse_config(Config, presets, ["--data", "davis", "--train"])
    assert "train with --data ytvos" in capsys.readouterr().err
    assert parse_config(Config, presets, ["--data", "davis", "--eval"]).eval


def test_presets_may_only_name_fields():
    with pytest.raises(ValueError, match="widht"):
        parse_config(Config, {"real": dict(widht=3)}, ["--eval"])


def test_config_from_a_checkpoint_dict():
    old = {"data": "toy", "lr": 0.5, "retired": 1}  # saved before `width` existed, with a field since removed
    with pytest.warns(UserWarning, match="retired"):
        cfg = config_from_dict(Config, old)
    assert (cfg.data, cfg.lr, cfg.width) == ("toy", 0.5, 8)


def test_run_dir_names_the_ablations():
    ablations = ("fancy", "loss")
    assert run_dir(Config(data="toy"), "m", ablations) == Path("runs/m-toy")
    assert run_dir(Config(data="toy", fancy=False, loss="theirs"), "m", ablations) == Path("runs/m-toy-no-fancy-loss-theirs")
    assert run_dir(Config(data="toy", fancy=False, out="elsewhere"), "m", ablations) == Path("elsewhere")
    assert run_dir(Config(data="toy", width=1), "m", ("width",)) == Path("runs/m-toy-width-1")  # not "-width"
    assert run_dir(Config(data="toy", diagnostic=True), "m", ("diagnostic",)) == Path("runs/m-toy-diagnostic")


# ---------------------------------------------------------------------------------- optimiser
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.queries = nn.Embedding(2, 4)
        self.head = nn.Linear(4, 1)
        self.norm = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_param_groups_follow_detectron2():
    """Backbone lr multiplier; no weight decay on normalisation layers, embeddings and Swin's
    position tables; biases and weights elsewhere decay (Mask2Former's build_optimizer)."""
    model = Tiny()
    groups = param_groups(model, lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1, backbone=("backbone",))
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expect = {
        model.backbone[0].weight: (0.1, 0.05), model.backbone[0].bias: (0.1, 0.05),
        model.backbone[1].weight: (0.1, 0.0), model.backbone[1].bias: (0.1, 0.0),
        model.backbone.relative_position_bias_table: (0.1, 0.0),
        model.queries.weight: (1.0, 0.0), model.head.weight: (1.0, 0.05), model.head.bias: (1.0, 0.05),
        model.norm.weight: (1.0, 0.0), model.norm.bias: (1.0, 0.0),
    }
    assert len(setting) == len(expect)  # the frozen layer is left out
    for p, want in expect.items():
        assert setting[id(p)] == want


# ---------------------------------------------------------------------------------- training
class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, torch.randint(1000, ()).item()])  # the index and a random draw


def test_train_batches_are_endless_and_resume_in_their_epoch():
    batches = train_batches(Numbers(6), batch_size=2, collate=torch.stack, ddp=SINGLE, seed=0, workers=0)
    epochs = [torch.cat([next(batches) for _ in range(3)])[:, 0] for _ in range(2)]
    assert all(sorted(e.tolist()) == list(range(6)) for e in epochs)  # every item once per epoch
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    resumed = train_batches(Numbers(6), batch_size=2, collate=torch.stack, ddp=SINGLE, seed=0, workers=0,
                            start_step=4)  # step 4 is in epoch 1: that epoch starts again
    assert torch.equal(torch.cat([next(resumed) for _ in range(3)])[:, 0], epochs[1])
    with pytest.raises(SystemExit, match="not divisible"):
        next(train_batches(Numbers(6), batch_size=3, collate=torch.stack, ddp=Dist(0, 2, 0, torch.device("cpu"), True),
                           seed=0, workers=0))
    with pytest.raises(SystemExit, match="make no batch"):
        next(train_batches(Numbers(1), batch_size=2, collate=torch.stack, ddp=SINGLE, seed=0, workers=0))


def test_worker_seeds_differ_between_processes():
    """Two processes (rank 0 and 1 of 2, faked) with the same global RNG: their workers draw differently."""
    draws = []
    for rank in (0, 1):
        torch.manual_seed(0)
        ddp = Dist(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), distributed=False)
        batches = train_batches(Numbers(8), batch_size=4, collate=torch.stack, ddp=ddp, seed=0, workers=1)
        draws.append(next(batches)[:, 1])
    assert not torch.equal(draws[0], draws[1])


def test_check_finite_names_every_term():
    check_finite(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, step=3)
    with pytest.raises(RuntimeError, match=r"step 7.*'dice': nan"):
        check_finite(torch.tensor(float("nan")), {"ce": torch.tensor(1.0), "dice": torch.tensor(float("nan"))}, step=7)


# ---------------------------------------------------------------------------------- evaluation
class Videos(torch.utils.data.Dataset):
    """Two videos, three expressions; `with_masks=False` is a split without public masks."""

    def __init__(self, with_masks=True):
        self.items = []
        for video, exp_id, box in (("v1", "0", (2, 6)), ("v1", "1", (4, 8)), ("v2", "0", (0, 3))):
            gt = torch.zeros(3, 8, 12, dtype=torch.bool)
            gt[:, box[0]:box[1], box[0]:box[1]] = True
            self.items.append({"frames": torch.zeros(3, 3, 4, 6), "gt": gt if with_masks else None, "orig_size": (8, 12),
                               "frame_names": ["00000", "00001", "00002"], "expression": f"expression {exp_id}",
                               "video": video, "exp_id": exp_id})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_video_scores_and_subsets(tmp_path):
    dataset = Videos()
    perfect = {"v1/0"}

    def predict(item):  # right on v1/0, empty elsewhere
        key = f"{item['video']}/{item['exp_id']}"
        return item["gt"].clone() if key in perfect else torch.zeros_like(item["gt"])

    result = evaluate_video(dataset, predict, model=torch.nn.Identity(), out=tmp_path, data="toy", split="valid_u", checkpoint="c.pt",
                            subsets={"motion_only": {"v1/0", "v2/0"}}, show=1)
    assert (result["J"], result["F"], result["n"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 3)
    assert result["motion_only"] == {"J": 0.5, "F": 0.5, "J&F": 0.5, "n": 2}
    assert json.loads((tmp_path / "eval.json").read_text())["per_expression"][0]["key"] == "v1/0"
    assert len(list((tmp_path / "vis").iterdir())) == 1  # one expression drawn
    overlay = Image.open(tmp_path / "vis" / "v1_0" / "overlay_0000.png")
    assert overlay.size == (12 * 32, 8 * 32)  # small frames enlarged to a short side of 256


@pytest.mark.parametrize("kind", ["video", "image", "files"])
def test_scoring_runs_the_model_in_eval_mode(tmp_path, kind):
    """evaluate_video / evaluate_image / predict_files put the model in eval mode, as DETR's
    evaluate() starts, however it comes in (a model straight from train() is in train mode)."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    modes = []

    def record(result):
        modes.append(model.training)
        return result

    if kind == "video":
        evaluate_video(Videos(), lambda item: record(item["gt"].clone()), model=model, out=tmp_path, data="toy",
                       split="valid_u", show=0)
    elif kind == "image":
        dataset = Sentences()
        evaluate_image(dataset, lambda item: record(dataset.gt[1].clone()), model=model, out=tmp_path, split="val",
                       show=0)
    else:
        Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "00000.jpg")
        predict_files(tmp_path / "00000.jpg", "a ball", lambda f, e, size: record(torch.zeros(1, *size, dtype=torch.bool)),
                      model=model, out=tmp_path / "out", short_side=10, max_size=100)
    assert modes and not any(modes)


@pytest.mark.parametrize("data, folder", [("mevis", ""), ("ytvos", "Annotations/")])
def test_evaluate_video_writes_a_submission_without_masks(tmp_path, data, folder):
    dataset = Videos(with_masks=False)
    assert evaluate_video(dataset, lambda item: torch.ones(3, 8, 12, dtype=torch.bool), model=torch.nn.Identity(),
                          out=tmp_path, data=data, split="valid", show=0) is None
    with zipfile.ZipFile(tmp_path / "submission-valid.zip") as archive:
        names = sorted(archive.namelist())
    pngs = [n for n in names if n.endswith(".png")]
    assert pngs == sorted(f"{folder}{v}/{e}/{f:05d}.png" for v, e in (("v1", "0"), ("v1", "1"), ("v2", "0"))
                          for f in range(3))
    png = np.asarray(Image.open(tmp_path / "submission-valid" / f"{folder}v1/0/00000.png"))
    assert png.shape == (8, 12) and set(np.unique(png)) == {255}
    assert not (tmp_path / "eval.json").exists()


class Sentences(torch.utils.data.Dataset):
    """Two objects: ann 1 with two expressions, ann 2 with one."""

    def __init__(self):
        self.samples = [{"ann_id": 1, "sent_id": 10}, {"ann_id": 2, "sent_id": 20}, {"ann_id": 1, "sent_id": 11}]
        self.gt = {1: torch.zeros(4, 4, dtype=torch.bool), 2: torch.zeros(4, 4, dtype=torch.bool)}
        self.gt[1][:2, :2] = True  # 4 pixels
        self.gt[2][2:, 2:] = True

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return {"image": torch.zeros(3, 4, 4), "gt": self.gt[s["ann_id"]], "orig_size": (4, 4),
                "sent_id": s["sent_id"], "expression": f"sentence {s['sent_id']}"}


def test_evaluate_image_with_oc_iou(tmp_path):
    dataset = Sentences()
    preds = {10: dataset.gt[1].clone(), 11: dataset.gt[1].clone(), 20: dataset.gt[2].clone()}
    preds[11][0, 0] = False  # 3 of the 4 pixels: IoU 0.75
    preds[20][0, 0] = True  # 4 pixels and one false positive: IoU 0.8
    result = evaluate_image(dataset, lambda item: preds[item["sent_id"]], model=torch.nn.Identity(), out=tmp_path, split="val",
                            subsets={"motion": {"20"}}, show=0)
    assert result["mIoU"] == pytest.approx((1 + 0.75 + 0.8) / 3)
    assert result["oIoU"] == pytest.approx((4 + 3 + 4) / (4 + 4 + 5))
    assert result["Pr@0.8"] == pytest.approx(2 / 3)  # IoU >= 0.8 (LAVT); strict_pr would count 1 of 3
    # Oc-IoU (VATEX Eqs. 9-10): object 1: |GT ∩ P10 ∩ P11| / |GT ∪ P10 ∪ P11| = 3 / 4; object 2: 4 / 5
    assert result["Oc-IoU"] == pytest.approx((0.75 + 0.8) / 2)
    assert result["motion"]["mIoU"] == pytest.approx(0.8) and result["motion"]["n"] == 1
    strict = evaluate_image(dataset, lambda item: preds[item["sent_id"]], model=torch.nn.Identity(), out=tmp_path, split="val", strict_pr=True,
                            show=0)
    assert strict["Pr@0.8"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------- prediction, errors
def test_predict_files_on_a_folder_and_one_image(tmp_path):
    for t in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * t, dtype=np.uint8)).save(tmp_path / f"{t:05d}.jpg")
    (tmp_path / "notes.txt").write_text("not a frame")
    seen = {}

    def predict(frames, expression, orig_size):
        seen.update(shape=tuple(frames.shape), expression=expression, orig_size=orig_size)
        masks = torch.zeros(len(frames), *orig_size, dtype=torch.bool)
        masks[:, 5:10, 5:10] = True
        return masks

    files = predict_files(tmp_path, "  The Red  BALL ", predict, model=torch.nn.Identity(), out=tmp_path / "out", short_side=10, max_size=100)
    assert seen == {"shape": (3, 3, 10, 15), "expression": "the red ball", "orig_size": (20, 30)}
    assert [f.name for f in files] == ["overlay_0000.png", "overlay_0001.png", "overlay_0002.png", "overlay.gif"]
    one = predict_files(tmp_path / "00001.jpg", "a ball", predict, model=torch.nn.Identity(), out=tmp_path / "one", short_side=10, max_size=100)
    assert [f.name for f in one] == ["overlay.png"]
    with pytest.raises(SystemExit, match="folder of .jpg/.png frames"):
        predict_files(tmp_path / "notes.txt", "x", predict, model=torch.nn.Identity(), out=tmp_path, short_side=10, max_size=100)
    with pytest.raises(SystemExit, match="needs an expression"):
        predict_files(tmp_path, "   ", predict, model=torch.nn.Identity(), out=tmp_path, short_side=10, max_size=100)


@pytest.mark.slow
def test_cli_errors_end_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as excinfo, cli_errors("m"):
        raise FileNotFoundError(f"checkpoint file not found: {tmp_path / 'last.pt'}")
    assert str(excinfo.value) == f"m: checkpoint file not found: {tmp_path / 'last.pt'}"
    with pytest.raises(SystemExit, match="m: bad file"), cli_errors("m"):
        raise CheckpointError("bad file")
    with pytest.raises(ValueError), cli_errors("m"):  # a programming error keeps its traceback
        raise ValueError("bug")
    result = subprocess.run([sys.executable, "dshmp.py", "--data", "toy", "--eval", "--checkpoint",
                             str(tmp_path / "none.pt"), "--data-root", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"dshmp: checkpoint file not found: {tmp_path / 'none.pt'}"


# ---------------------------------------------------------------------------------- Ref-DAVIS17 protocol
class DavisExpressions(torch.utils.data.Dataset):
    """One Ref-DAVIS17 video "s", two objects, four expressions each (expression i = 4 x object +
    annotator, in the json's order), 2 frames of 4x4; the DAVIS folder beside it."""

    def __init__(self, root):
        self.root = root
        self.samples = [{"video": "s", "exp_id": str(i)} for i in range(8)]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"video": "s", "exp_id": str(i), "index": i, "expression": f"e{i}"}


def write_davis(root: Path) -> np.ndarray:
    gt = np.zeros((2, 4, 4), dtype=np.uint8)
    gt[:, :2, :2] = 1
    gt[:, 2:, 2:] = 2
    davis = root / "DAVIS"
    (davis / "ImageSets" / "2017").mkdir(parents=True)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("s\n")
    for t, frame in enumerate(gt):
        path = davis / "Annotations_unsupervised" / "480p" / "s" / f"{t:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        png = Image.fromarray(frame, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        png.save(path)
    return gt


def test_ref_davis17_protocol_by_hand(tmp_path):
    gt = write_davis(tmp_path)
    one, two = torch.from_numpy(gt == 1).float(), torch.from_numpy(gt == 2).float()  # (2, 4, 4)
    scores = {  # (annotator, object) -> mask probabilities
        (0, 0): one, (0, 1): two,  # right: J = F = 1
        (1, 0): two, (1, 1): one,  # swapped: the Hungarian matching puts them right, 1 again
        (2, 0): 0.4 * one, (2, 1): 0.4 * two,  # below 0.5: no claim, empty masks, 0
        (3, 0): torch.full((2, 4, 4), 0.9), (3, 1): 0.95 * two,  # object 0 everywhere but where object 1 wins
    }

    def predict(item):
        i = item["index"]
        return scores[(i % 4, i // 4)]  # expression i = 4 x object + annotator

    result = evaluate_video(DavisExpressions(tmp_path), predict, model=torch.nn.Identity(), out=tmp_path / "run", data="davis", split="valid")
    from common.metrics import reference_boundary_f, reference_jaccard
    label = np.ones((2, 4, 4), dtype=bool) & (gt != 2)  # annotator 3's proposal 1
    j3 = (reference_jaccard(label, gt == 1).mean() + 1.0) / 2
    f3 = (reference_boundary_f(label, gt == 1).mean() + 1.0) / 2
    per = result["per_annotator"]
    assert [a["J"] for a in per] == pytest.approx([1.0, 1.0, 0.0, j3]) and j3 == pytest.approx((1 / 3 + 1) / 2)
    assert [a["F"] for a in per] == pytest.approx([1.0, 1.0, 0.0, f3])
    assert result["J&F"] == pytest.approx(np.mean([1.0, 1.0, 0.0, (j3 + f3) / 2]))
    assert result["J"] == pytest.approx(np.mean([1.0, 1.0, 0.0, j3]))
    # the merged palette PNGs, for the official eval_davis.py
    png = Image.open(tmp_path / "run" / "davis-valid" / "anno_3" / "s" / "00001.png")
    assert png.mode == "P" and np.array_equal(np.asarray(png), np.where(gt[1] == 2, 2, 1))
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["protocol"].startswith("ReferFormer")


def test_ref_davis17_protocol_needs_the_davis_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotations_unsupervised"):
        evaluate_video(DavisExpressions(tmp_path), lambda item: None, model=torch.nn.Identity(), out=tmp_path, data="davis", split="valid")



def test_default_dataset_folders_are_the_ones_data_readme_names():
    from common.run import DATA_ROOTS, TOY_ROOTS
    readme = (REPO / "data" / "README.md").read_text()
    for folder in [*DATA_ROOTS.values(), *TOY_ROOTS.values()]:
        assert folder in readme, folder
