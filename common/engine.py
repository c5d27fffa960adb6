"""Low-level pieces of a training run: the run toolkit (common/run.py) and each method's `train()`
call them. Plain functions and one small class; no Trainer, no callbacks, no hooks (house rule R11).

  seeding         seed_everything
  torchrun/DDP    setup_distributed -> Dist, cleanup_distributed, is_main, barrier, reduce_mean,
                  reduce_dict, all_gather_cat, all_gather_object, unwrap, to_device
  mixed precision autocast (bf16 on CUDA, nothing on CPU)
  checkpoints     save_checkpoint (atomic), load_checkpoint, read_checkpoint, CheckpointError
  progress        Progress (tqdm bar and log.jsonl, rank 0 only)
  overlays        save_overlays (prediction and ground truth on the frames, PNGs + GIF), denormalize
"""

import contextlib
import json
import os
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

# Shapes: T frames, H W image size, N rows (first dimension) of a gathered tensor.


# ---------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices (lazily, if CUDA is used later)


# ---------------------------------------------------------------------------------- torchrun / DDP
@dataclass(frozen=True)
class Dist:
    """Where this process runs. `distributed` is False for a plain `python x.py` run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def setup_distributed(*, device: str | torch.device | None = None) -> Dist:
    """Join the process group when launched by torchrun; otherwise describe a single process.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without RANK this is a
    plain single-process run and no process group is created. `device` is "cuda", "cpu" or None
    (CUDA when available). On CUDA each process takes GPU `LOCAL_RANK` and the backend is NCCL; on
    CPU the backend is gloo.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"setup_distributed: device must be 'cuda' or 'cpu', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("setup_distributed: device 'cuda' was asked for but "
                           "torch.cuda.is_available() is False")

    if "RANK" not in os.environ:
        single = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=single, distributed=False)

    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError(f"RANK is set but {', '.join(missing)} is not; launch with torchrun "
                           f"(python -m torch.distributed.run), which sets all of them")
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), \
        int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               f"device(s) are visible; use torchrun --nproc_per_node <= "
                               f"{torch.cuda.device_count()}")
        # NCCL collectives and all_gather_object use the current device
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", rank=rank,
                                world_size=world_size)
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                distributed=True)


def cleanup_distributed() -> None:
    """Leave the process group (no-op for a single process). Every rank first waits for the others:
    a rank that tears gloo down while a peer is still using it can abort the peer at exit
    ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        # without it NCCL guesses the GPU and warns
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors, gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks, as a detached float32 copy on the tensor's device.

    Every rank must call it with the same shape. For logging; gradients are averaged by DDP itself.
    """
    if not dist.is_initialized():
        return tensor.detach().float().clone()
    mean = tensor.detach().to(_comm_device(), dtype=torch.float32, copy=True)
    dist.all_reduce(mean)
    return (mean / dist.get_world_size()).to(tensor.device)


def reduce_dict(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Mean over all ranks of each scalar in `values`, as python floats (one collective for all).

    Every rank must pass the same keys. Single process: the values as floats.
    """
    if not values:
        return {}
    names = sorted(values)  # the same order on every rank, however each built its dict
    for name in names:
        if isinstance(values[name], torch.Tensor) and values[name].numel() != 1:
            raise ValueError(f"reduce_dict: {name!r} has shape {tuple(values[name].shape)}, "
                             f"expected a scalar")
    device = _comm_device() if dist.is_initialized() else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[n]).detach().to(device, torch.float32).reshape(())
                           for n in names])  # (K,) K names
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked = stacked / dist.get_world_size()
    means = dict(zip(names, stacked.tolist()))
    return {name: means[name] for name in values}


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N, ...) from all ranks along dim 0, in rank order; detached, no
    gradient. Every rank must pass the same shape (a per-rank batch of anchors, say)."""
    if not dist.is_initialized():
        return tensor.detach()
    rows = tensor.detach().to(_comm_device())  # (N, ...)
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    return torch.cat(gathered).to(tensor.device)  # (world * N, ...)


def all_gather_object(obj) -> list:
    """List of `obj` from every rank, in rank order (pickled; for small things like eval
    records)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        return unwrap(model.module)
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        return unwrap(model._orig_mod)
    return model


def to_device(obj, device: torch.device):
    """`obj` with every tensor inside (nested dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


# ---------------------------------------------------------------------------------- mixed precision
def autocast(device: str | torch.device, *, enabled: bool = True):
    """bf16 autocast on CUDA; on CPU (or with enabled=False) a context that changes nothing.

    bf16 has float32's exponent range, so no GradScaler is needed. CPU stays in float32: CPU bf16
    autocast is slow on most CPUs and would make CPU tests differ from the float32 reference.
    """
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used: truncated, corrupt, or not from
    save_checkpoint."""


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "config", "extra", "rng")


def _check_weights_only(value, where: str) -> None:
    """Raise TypeError unless `value` is something torch.load(weights_only=True) reads back."""
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__} ({k!r}); use str or "
                                f"int keys")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_weights_only(v, f"{where}[{i}]")
        return
    # numpy scalars subclass float but are refused by weights_only, hence type() instead of
    # isinstance
    kind = f"{type(value).__module__}.{type(value).__name__}"
    raise TypeError(f"{where} is a {kind} ({value!r}); a checkpoint holds only "
                    f"tensors, str, int, float, bool, None and dict/list/tuple of them, so that "
                    f"torch.load(weights_only=True) can read it back (convert it, e.g. str(path) "
                    f"or float(x))")


def _rng_state() -> dict:
    """RNG states as tensors and plain python values (readable with weights_only=True)."""
    py_version, py_state, py_gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss_next},
        "numpy": {"bit_generator": np_name,
                  "keys": torch.from_numpy(np_keys.astype(np.int64)),  # (624,)
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the current device: each process drives one GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].cpu().numpy().astype(np.uint32),
                         npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(path: str | Path, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, step: int, config: dict, extra: dict | None = None) -> Path:
    """Write a resumable checkpoint atomically: a crash mid-write leaves the previous file intact.

    Holds the model's state dict (of the unwrapped module, so a DDP-wrapped model loads into a plain
    one), optimizer, scheduler, step, `config` (a plain dict, e.g. dataclasses.asdict(cfg)), the RNG
    states of python random, numpy, torch CPU and CUDA (the current device, if CUDA was used), and
    `extra`. `config` and `extra` may hold only tensors, str, int, float, bool, None, and
    dicts/lists/tuples of those; anything else raises TypeError before writing.

    The file is written to a temporary name in the same directory, flushed to disk, then renamed
    over `path` (os.replace). Call it on the main process only (`if is_main():`); under DDP the RNG
    states saved are rank 0's.
    """
    path = Path(path)
    _check_weights_only(config, "config")
    _check_weights_only(extra or {}, "extra")
    checkpoint = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "config": config,
        "extra": extra or {},
        "rng": _rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # same directory: os.replace is atomic only within one file system
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb+") as f:
            # the bytes are on disk before the rename makes them the checkpoint
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The whole checkpoint dict of save_checkpoint (model, optimizer, scheduler, step, config,
    extra, rng), read with torch.load(weights_only=True): FileNotFoundError when `path` is not a
    file, one clear CheckpointError for every kind of bad file. Use it to read the saved config
    before building the model; load_checkpoint restores the states."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line),
                      lines[0] if lines else "")
        raise CheckpointError(f"checkpoint file {path} holds objects that "
                              f"torch.load(weights_only=True) refuses (it was not written by "
                              f"save_checkpoint, or is corrupt): {reason}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:  # OSError: an empty file
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {error}") from None
    if not isinstance(checkpoint, dict) or not set(_CHECKPOINT_KEYS) <= checkpoint.keys():
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a checkpoint written by save_checkpoint: expected "
                              f"keys "
                              f"{list(_CHECKPOINT_KEYS)}, found {found}")
    return checkpoint


def load_checkpoint(path: str | Path, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True, map_location="cpu") -> dict:
    """Restore a checkpoint from save_checkpoint into `model` (and optimizer, scheduler, RNG
    states).

    `model` may be DDP-wrapped; its state dict is loaded strictly. Pass the optimizer and scheduler
    to resume training, leave them out to evaluate. With `restore_rng` the python, numpy, torch CPU
    and (when present and CUDA is available) CUDA RNG states continue exactly where they were
    saved, so a resumed run repeats an uninterrupted one bit for bit (under DDP every rank gets the
    states rank 0 saved).

    Returns dict(step=int, config=dict, extra=dict). Raises FileNotFoundError if `path` is not a
    file, and CheckpointError (a RuntimeError) naming the file if it is truncated, corrupt, not
    from save_checkpoint, or lacks the optimizer/scheduler state asked for.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    unwrap(model).load_state_dict(checkpoint["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint[name] is None:
            raise CheckpointError(f"checkpoint file {path} holds no {name} state (saved without "
                                  f"one); "
                                  f"load it without {name}= to evaluate")
        target.load_state_dict(checkpoint[name])
    if restore_rng:
        _set_rng_state(checkpoint["rng"])
    return {"step": checkpoint["step"], "config": checkpoint["config"],
            "extra": checkpoint["extra"]}


# ---------------------------------------------------------------------------------- progress
class Progress:
    """tqdm bar and `log.jsonl` for a training loop; everything happens on the main rank only.

    `log(step, scalars, lr=...)` moves the bar to `step`, shows each scalar, the lr and the seconds
    per iteration, and appends one JSON line {"step", <scalars>, "lr", "s/it", "time"} to
    `log_path` ("time" is the unix time). s/it is the time since the previous `log` call divided
    by the steps since then, smoothed by an exponential moving average (weight `smoothing` on the
    newest value, as tqdm does). A resumed run (`initial` = resumed step) appends to the same file,
    so lines of steps after the last checkpoint of the interrupted run stay in it.

    Scalars are not averaged over ranks here (that needs every rank): pass `reduce_dict(losses)`.
    """

    def __init__(self, *, total: int, log_path: str | Path | None, initial: int = 0,
                 smoothing: float = 0.3, desc: str = "train"):
        self.enabled = is_main()
        self.smoothing = smoothing
        self.sec_per_it: float | None = None
        self._last_step, self._last_time = initial, time.perf_counter()
        self._bar = None
        self._file = None
        if not self.enabled:
            return
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                    "[{elapsed}<{remaining}{postfix}]")  # s/it is in the postfix
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "a", encoding="utf-8")

    def log(self, step: int, scalars: dict[str, torch.Tensor | float], *, lr: float) -> None:
        if not self.enabled:
            return
        reserved = {"step", "lr", "s/it", "time"} & scalars.keys()
        if reserved:
            raise ValueError(f"Progress.log: scalar names {sorted(reserved)} clash with the log's "
                             f"own fields")
        now = time.perf_counter()
        if step > self._last_step:
            measured = (now - self._last_time) / (step - self._last_step)
            self.sec_per_it = measured if self.sec_per_it is None else (
                self.smoothing * measured + (1 - self.smoothing) * self.sec_per_it)
        self._last_step, self._last_time = step, now
        values = {name: float(v.detach() if torch.is_tensor(v) else v)  # no autograd warning
                  for name, v in scalars.items()}
        shown = [f"{name}={v:.4g}" for name, v in values.items()]
        shown += [f"lr={lr:.3g}",
                  f"s/it={self.sec_per_it:.3g}" if self.sec_per_it is not None else "s/it=?"]
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(" ".join(shown))
        if self._file is not None:
            record = {"step": step, **values, "lr": float(lr), "s/it": self.sec_per_it,
                      "time": time.time()}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        self._bar = self._file = None
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------- overlays
def denormalize(frames: torch.Tensor | np.ndarray, *, mean, std) -> np.ndarray:
    """Undo `(x / 255 - mean) / std`: float (..., 3, H, W) -> uint8 numpy (..., H, W, 3), mean and
    std per channel in [0, 1] scale (e.g. common.datasets.IMAGENET_MEAN / IMAGENET_STD)."""
    x = torch.as_tensor(frames).detach().float().cpu()  # (..., 3, H, W)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"denormalize: expected frames of shape (..., 3, H, W), got "
                         f"{tuple(x.shape)}")
    # (..., 3, H, W) in [0, 1]
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return rearrange(x, "... c h w -> ... h w c").numpy()  # (..., H, W, 3)


def _frames_uint8(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.is_floating_point() else frames).numpy()
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.dtype == np.uint8 and frames.shape[-1] == 3:
        return frames  # (T, H, W, 3)
    if frames.ndim == 4 and np.issubdtype(frames.dtype, np.floating) and frames.shape[1] == 3:
        if frames.size and (frames.min() < -1e-3 or frames.max() > 1 + 1e-3):
            raise ValueError(f"save_overlays: float frames must be in [0, 1], got "
                             f"[{frames.min():.3g}, {frames.max():.3g}]; ImageNet-normalised "
                             f"frames go through denormalize() first")
        return np.round(np.clip(rearrange(frames, "t c h w -> t h w c"), 0, 1)
                        * 255).astype(np.uint8)  # (T, H, W, 3)
    raise ValueError(f"save_overlays: frames must be uint8 (T, H, W, 3) or float (T, 3, H, W) in "
                     f"[0, 1], "
                     f"got {frames.dtype} {frames.shape}")


def _inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Mask pixels within `width` pixels (4-neighbourhood) of a pixel outside the mask. (H, W)
    bool."""
    eroded = mask
    for _ in range(width):
        # (H+2, W+2); the image border is not an object edge
        padded = np.pad(eroded, 1, mode="edge")
        eroded = eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] \
            & padded[1:-1, 2:]
    return mask & ~eroded


PRED_COLOR, GT_COLOR = (255, 64, 64), (64, 255, 64)


def save_overlays(frames, masks, out_dir: str | Path, *, name: str = "overlay", gt=None,
                  caption: str | None = None, scale: int = 1, color=PRED_COLOR, gt_color=GT_COLOR,
                  alpha: float = 0.5, fps: float = 6) -> list[Path]:
    """Draw predicted `masks` (and the ground truth `gt`) on `frames`; write one PNG per frame and,
    for T > 1, an animated GIF.

    frames: uint8 (T, H, W, 3) or float (T, 3, H, W) in [0, 1], numpy or torch (use denormalize()
    for normalised frames). masks, gt: (T, H, W) bool or integer (non-zero = object), numpy or
    torch.
    The prediction is filled: (1 - alpha) * frame + alpha * color, with a band along its inner edge
    painted `color`; the ground truth, when given, is only outlined, in `gt_color`, so both show.
    The band is 1 px per 160 px of the shorter side (at least 1); other pixels keep their values.
    scale > 1 first enlarges frames and masks by that integer factor (nearest neighbour: small toy
    frames become readable); `caption` (the expression) is written at the top left of every frame.

    Writes `{name}.png` for T = 1, else `{name}_0000.png`... and `{name}.gif` (`fps` frames per
    second, looping; Pillow merges identical consecutive frames into one longer frame). Returns the
    paths, PNGs first.
    """
    rgb = _frames_uint8(frames)  # (T, H, W, 3)
    layers = {"masks": masks} if gt is None else {"masks": masks, "gt": gt}
    for key, value in layers.items():
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) \
            else np.asarray(value)
        if value.dtype != bool and not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"save_overlays: {key} must be bool or integer (threshold predictions "
                             f"first), "
                             f"got {value.dtype}")
        if value.shape != rgb.shape[:3]:
            raise ValueError(f"save_overlays: {key} of shape {value.shape} do not match frames (T, "
                             f"H, W) = "
                             f"{rgb.shape[:3]}")
        layers[key] = value != 0  # (T, H, W)
    if not 0 <= alpha <= 1:
        raise ValueError(f"save_overlays: alpha must be in [0, 1], got {alpha}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"save_overlays: scale must be a positive integer, got {scale}")
    if scale > 1:
        rgb = rgb.repeat(scale, 1).repeat(scale, 2)  # (T, H*s, W*s, 3)
        layers = {k: v.repeat(scale, 1).repeat(scale, 2) for k, v in layers.items()}

    # (3,)
    color, gt_color = np.asarray(color, dtype=np.float32), np.asarray(gt_color, dtype=np.float32)
    width = max(1, min(rgb.shape[1:3]) // 160)
    images = []
    for t, frame in enumerate(rgb):
        out = frame.astype(np.float32)  # (H, W, 3)
        mask = layers["masks"][t]  # (H, W)
        out[mask] = (1 - alpha) * out[mask] + alpha * color
        out[_inner_boundary(mask, width)] = color
        if "gt" in layers:
            out[_inner_boundary(layers["gt"][t], width)] = gt_color
        image = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
        if caption:
            draw = ImageDraw.Draw(image)
            left, top, right, bottom = draw.textbbox((2, 1), caption)
            draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
            draw.text((2, 1), caption, fill=(255, 255, 255))
        images.append(image)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / (f"{name}.png" if len(images) == 1 else f"{name}_{t:04d}.png")
             for t in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    if len(images) > 1:
        gif = out_dir / f"{name}.gif"
        images[0].save(gif, save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)
        paths.append(gif)
    return paths
