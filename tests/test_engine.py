"""Tests for common/engine.py: bitwise resume, DDP on two CPU processes, checkpoint errors and
atomic saves, progress log, overlays, autocast, seeding."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import engine
from ddp_launch import run_two_ranks
from common.datasets import IMAGENET_MEAN, IMAGENET_STD
from common.engine import (CheckpointError, Progress, all_gather_cat, all_gather_object, autocast, denormalize, is_main,
                           load_checkpoint, reduce_dict, reduce_mean, save_checkpoint, save_overlays, seed_everything,
                           setup_distributed, to_device, unwrap)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- seeding
def test_seed_everything_repeats_all_three_rngs():
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    seed_everything(4)
    second = (random.random(), np.random.rand(), torch.rand(1).item())
    assert all(a != b for a, b in zip(first, second))


# ---------------------------------------------------------------------------------- resume
class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def _fresh_run():
    model = TinyMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        # python random, numpy and torch all feed the batch (and torch the dropout masks)
        x = torch.randn(8, 4) + float(np.random.randn()) + random.random()  # (8, 4)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _resumed_run(path, n, m, *, restore_rng):
    seed_everything(0)
    model, optimizer, scheduler = _fresh_run()
    _train(model, optimizer, scheduler, n)
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, step=n,
                    config={"lr": 1e-2, "name": "tiny", "sizes": [4, 16, 1]}, extra={"best": 0.25})
    seed_everything(123)  # a new process would start from other RNG states
    model, optimizer, scheduler = _fresh_run()
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    _train(model, optimizer, scheduler, m)
    return model, scheduler, state


def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    n, m = 5, 7
    seed_everything(0)
    model, optimizer, scheduler = _fresh_run()
    _train(model, optimizer, scheduler, n + m)

    resumed, resumed_scheduler, state = _resumed_run(tmp_path / "last.pt", n, m, restore_rng=True)
    assert state == {"step": n, "config": {"lr": 1e-2, "name": "tiny", "sizes": [4, 16, 1]}, "extra": {"best": 0.25}}
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert resumed_scheduler.last_epoch == scheduler.last_epoch == n + m
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()

    # the same resume without the RNG states draws other batches and dropout masks
    unrestored, _, _ = _resumed_run(tmp_path / "other.pt", n, m, restore_rng=False)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), unrestored.parameters()))


def test_checkpoint_holds_only_weights_only_types(tmp_path):
    model = TinyMLP()
    with pytest.raises(TypeError, match=r"config\['root'\] is a pathlib\.\w*Path"):
        save_checkpoint(tmp_path / "a.pt", model=model, step=0, config={"root": Path("data")})
    with pytest.raises(TypeError, match=r"extra\['score'\].*float64"):
        save_checkpoint(tmp_path / "a.pt", model=model, step=0, config={}, extra={"score": np.float64(0.5)})
    assert list(tmp_path.iterdir()) == []
    # evaluation-only load: no optimizer saved, none asked for
    save_checkpoint(tmp_path / "b.pt", model=model, step=3, config={})
    other = TinyMLP()
    assert load_checkpoint(tmp_path / "b.pt", model=other)["step"] == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "b.pt", model=other, optimizer=optimizer)


# ---------------------------------------------------------------------------------- bad files, atomic save
def _assert_single_clear_error(excinfo, path, words):
    message = str(excinfo.value)
    assert str(path) in message and words in message
    assert isinstance(excinfo.value, RuntimeError)
    error = excinfo.value  # no chained zip/pickle traceback below it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_truncated_checkpoint_gives_one_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=TinyMLP(), step=1, config={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, model=TinyMLP())
    _assert_single_clear_error(excinfo, path, "truncated or corrupt")

    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path, model=TinyMLP())
    _assert_single_clear_error(excinfo, path, "truncated or corrupt")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", model=TinyMLP())
    foreign = tmp_path / "weights.pt"
    torch.save(TinyMLP().state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint written by save_checkpoint"):
        load_checkpoint(foreign, model=TinyMLP())


def test_failed_save_keeps_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = TinyMLP()
    save_checkpoint(path, model=model, step=1, config={"run": "first"})
    before = path.read_bytes()

    def disk_full(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model=model, step=2, config={"run": "second"})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert path.read_bytes() == before
    assert load_checkpoint(path, model=TinyMLP())["config"] == {"run": "first"}


# ---------------------------------------------------------------------------------- single process, DDP
def test_single_process_helpers_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    d = setup_distributed(device="cpu")
    assert (d.rank, d.world_size, d.local_rank, d.device, d.distributed) == (0, 1, 0, torch.device("cpu"), False)
    assert is_main()
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(reduce_mean(x), x) and torch.equal(all_gather_cat(x), x)
    assert reduce_dict({"b": torch.tensor(2.0), "a": 0.5}) == {"b": 2.0, "a": 0.5}
    assert all_gather_object({"k": 1}) == [{"k": 1}]
    model = TinyMLP()
    assert unwrap(model) is model and unwrap(nn.DataParallel(model)) is model
    batch = to_device({"frames": x, "targets": [{"masks": x, "id": 7}], "pair": (x, "s")}, torch.device("cpu"))
    assert torch.equal(batch["targets"][0]["masks"], x) and batch["targets"][0]["id"] == 7 and batch["pair"][1] == "s"

    monkeypatch.setenv("RANK", "0")  # half a torchrun environment
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        setup_distributed(device="cpu")


DDP_SCRIPT = r'''
import contextlib, io, sys
from pathlib import Path
import torch
from torch.nn.parallel import DistributedDataParallel
from common.engine import (Progress, all_gather_cat, all_gather_object, barrier, cleanup_distributed, is_main,
                           reduce_dict, reduce_mean, save_checkpoint, seed_everything, setup_distributed, unwrap)

out = Path(sys.argv[1])
ddp = setup_distributed(device="cpu")
(out / f"log{ddp.rank}.jsonl").unlink(missing_ok=True)  # a retried launch starts a fresh log
seed_everything(1234 + ddp.rank)  # different initial weights per rank: DDP must broadcast rank 0's
model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr), Progress(total=STEPS, log_path=out / f"log{ddp.rank}.jsonl") as progress:
    for step in range(STEPS):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * step + ddp.rank))
        loss = ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.log(step + 1, reduce_dict({"loss": loss}), lr=0.1)
if is_main():
    save_checkpoint(out / "last.pt", model=model, optimizer=optimizer, step=STEPS, config={})
barrier()
torch.save({
    "dist": (ddp.rank, ddp.world_size, ddp.local_rank, str(ddp.device), ddp.distributed, is_main()),
    "params": {k: v.clone() for k, v in unwrap(model).state_dict().items()},
    "gathered": all_gather_cat(torch.arange(6).reshape(3, 2) + 100 * ddp.rank),
    "gathered_bool": all_gather_cat(torch.tensor([True, ddp.rank == 1])),
    "reduced": reduce_dict({"a": float(ddp.rank), "b": torch.tensor(2.0 * ddp.rank)}),
    "mean": reduce_mean(torch.tensor([1.0, 3.0]) * ddp.rank),
    "objects": all_gather_object({"rank": ddp.rank}),
    "stderr": stderr.getvalue(),
}, out / f"rank{ddp.rank}.pt")
cleanup_distributed()
'''
DDP_STEPS = 4


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT.replace("STEPS", str(DDP_STEPS)))
    run_two_ranks([script, tmp_path], env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
                  timeout=180)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    assert r0["dist"] == (0, 2, 0, "cpu", True, True) and r1["dist"] == (1, 2, 1, "cpu", True, False)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name

    # DDP on two ranks = one process on the concatenated batch (equal sizes, mean loss)
    seed_everything(1234)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(DDP_STEPS):
        x = torch.cat([torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * step + r))
                       for r in (0, 1)])  # (12, 4): both ranks' batches
        loss = ((reference(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in reference.state_dict().items():
        assert torch.allclose(r0["params"][name], p, atol=1e-6), name

    expected = torch.cat([torch.arange(6).reshape(3, 2), torch.arange(6).reshape(3, 2) + 100])
    for r in (r0, r1):
        assert torch.equal(r["gathered"], expected)
        assert torch.equal(r["gathered_bool"], torch.tensor([True, False, True, True]))
        assert r["reduced"] == {"a": 0.5, "b": 1.0}
        assert torch.equal(r["mean"], torch.tensor([0.5, 1.5]))
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]

    # only rank 0 shows a bar and writes the log
    assert "loss=" in r0["stderr"] and r1["stderr"] == ""
    assert (tmp_path / "log0.jsonl").exists() and not (tmp_path / "log1.jsonl").exists()
    logged = [json.loads(line) for line in (tmp_path / "log0.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in logged] == list(range(1, DDP_STEPS + 1))

    # saved from the DDP-wrapped model, it loads into a plain one
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    assert load_checkpoint(tmp_path / "last.pt", model=plain, restore_rng=False)["step"] == DDP_STEPS
    for name, p in plain.state_dict().items():
        assert torch.equal(p, r0["params"][name]), name


# ---------------------------------------------------------------------------------- progress
def test_progress_log_jsonl_and_resume(tmp_path, monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    log_path = tmp_path / "run" / "log.jsonl"
    with Progress(total=100, log_path=log_path) as progress:
        now[0] = 105.0
        progress.log(10, {"loss": torch.tensor(0.5), "dice": 0.25}, lr=1e-3)
        now[0] = 107.0
        progress.log(20, {"loss": torch.tensor(0.375), "dice": 0.125}, lr=5e-4)
    now[0] = 200.0
    with Progress(total=100, log_path=log_path, initial=20) as progress:  # resumed
        now[0] = 230.0
        progress.log(30, {"loss": 0.25, "dice": 0.0625}, lr=2.5e-4)
        with pytest.raises(ValueError, match="clash"):
            progress.log(40, {"lr": 0.1}, lr=0.1)

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert [r["loss"] for r in records] == [0.5, 0.375, 0.25]
    assert [r["dice"] for r in records] == [0.25, 0.125, 0.0625]
    assert [r["lr"] for r in records] == [1e-3, 5e-4, 2.5e-4]
    # (105-100)/10 = 0.5; then 0.3 * (107-105)/10 + 0.7 * 0.5 = 0.41; resumed: (230-200)/10 = 3
    assert [r["s/it"] for r in records] == pytest.approx([0.5, 0.41, 3.0])
    assert all(isinstance(r["time"], float) for r in records)
    shown = capsys.readouterr().err
    assert "loss=0.375" in shown and "dice=0.125" in shown and "lr=0.0005" in shown and "s/it=0.41" in shown


def test_progress_is_silent_off_the_main_rank(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "is_main", lambda: False)
    with Progress(total=10, log_path=tmp_path / "log.jsonl") as progress:
        progress.log(1, {"loss": 1.0}, lr=0.1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "log.jsonl").exists()


# ---------------------------------------------------------------------------------- overlays
def _frames_and_masks(t=3, h=20, w=24):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)  # (T, H, W, 3)
    masks = np.zeros((t, h, w), dtype=bool)  # (T, H, W)
    for i in range(t):
        masks[i, 5:12, 6 + i: 15 + i] = True  # a 7x9 box moving right
    return frames, masks


def test_overlays_png_and_gif(tmp_path):
    frames, masks = _frames_and_masks()
    color, alpha = np.array([255, 64, 64]), 0.5
    paths = save_overlays(frames, masks, tmp_path / "vis", name="clip", color=tuple(color), alpha=alpha, fps=5)
    assert [p.name for p in paths] == ["clip_0000.png", "clip_0001.png", "clip_0002.png", "clip.gif"]

    for t, path in enumerate(paths[:3]):
        image = Image.open(path)
        assert image.size == (24, 20) and image.mode == "RGB"
        out, frame = np.asarray(image).astype(int), frames[t].astype(int)
        assert np.array_equal(out[~masks[t]], frame[~masks[t]])  # outside the mask: untouched
        assert (out[masks[t]] != frame[masks[t]]).any(axis=-1).all()  # every masked pixel changed colour
        interior = np.zeros_like(masks[t])
        interior[6:11, 7 + t: 14 + t] = True  # the box without its 1-pixel edge
        ring = masks[t] & ~interior
        assert np.array_equal(out[ring], np.broadcast_to(color, out[ring].shape))
        blend = (1 - alpha) * frame[interior] + alpha * color
        assert np.abs(out[interior] - blend).max() <= 0.5

    gif = Image.open(paths[3])
    assert gif.n_frames == 3 and gif.size == (24, 20)

    # float (T, 3, H, W) in [0, 1] gives the same pictures
    as_float = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
    again = save_overlays(as_float, torch.from_numpy(masks), tmp_path / "float", name="clip")
    for a, b in zip(paths[:3], again[:3]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))

    single = save_overlays(frames[:1], masks[:1], tmp_path / "one")
    assert [p.name for p in single] == ["overlay.png"]


def test_overlays_with_ground_truth_caption_and_scale(tmp_path):
    frames, masks = _frames_and_masks()
    gt = np.roll(masks, 2, axis=1)  # the target two rows lower than the prediction
    paths = save_overlays(frames, masks, tmp_path, gt=gt, caption="the box moving right", scale=3)
    out = np.asarray(Image.open(paths[1])).astype(int)
    assert out.shape == (60, 72, 3)  # 20x24 enlarged 3x, nearest neighbour
    big = lambda m: m.repeat(3, 0).repeat(3, 1)
    frame, pred, target = big(frames[1]).astype(int), big(masks[1]), big(gt[1])
    caption_box = np.zeros_like(pred)
    caption_box[:16] = True  # the caption is written at the top left, on a black box 16 rows high
    # the ground truth's edge is outlined green where it is not covered by the caption
    edge = target & ~np.roll(target, 1, 0) & ~caption_box
    assert edge.any() and np.array_equal(out[edge], np.broadcast_to((64, 255, 64), out[edge].shape))
    outside = ~pred & ~target & ~caption_box
    assert np.array_equal(out[outside], frame[outside])  # elsewhere the frame is untouched
    assert (out[:16, :40] > 200).all(-1).any() and (out[:16, :40] == 0).all(-1).any()  # light text, black box
    with pytest.raises(ValueError, match="gt of shape"):
        save_overlays(frames, masks, tmp_path, gt=gt[:, :5])


def test_overlays_reject_bad_input(tmp_path):
    frames, masks = _frames_and_masks()
    with pytest.raises(ValueError, match="do not match"):
        save_overlays(frames, masks[:, :10], tmp_path)
    with pytest.raises(ValueError, match="denormalize"):
        save_overlays(torch.randn(3, 3, 20, 24) * 3, masks, tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        save_overlays(frames, masks.astype(np.float32), tmp_path)


def test_denormalize_inverts_imagenet_normalisation():
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)  # (T, H, W, 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    restored = denormalize(normalised, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert restored.dtype == np.uint8 and restored.shape == (2, 5, 6, 3)
    assert np.array_equal(restored, frames)
    assert np.array_equal(denormalize(normalised[0], mean=IMAGENET_MEAN, std=IMAGENET_STD), frames[0])


# ---------------------------------------------------------------------------------- autocast
def test_autocast_is_a_no_op_on_cpu():
    layer, x = nn.Linear(8, 8), torch.randn(4, 8)
    with autocast(torch.device("cpu")):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what it avoids: torch's CPU autocast
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_is_bf16_on_cuda():
    layer, x = nn.Linear(8, 8).cuda(), torch.randn(4, 8, device="cuda")
    with autocast(x.device):
        assert layer(x).dtype == torch.bfloat16
    with autocast(x.device, enabled=False):
        assert layer(x).dtype == torch.float32
