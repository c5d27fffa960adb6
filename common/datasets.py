"""Dataset readers for referring segmentation: MeViS, Ref-YouTube-VOS, Ref-DAVIS17,
A2D-Sentences and JHMDB-Sentences (video) and RefCOCO / RefCOCO+ / RefCOCOg and Ref-ZOM
(images); for video instance segmentation (VITA): YouTube-VIS and OVIS; clip sampling;
transforms; referred images as pseudo-videos and mixes of datasets (VITA's recipe); collate.
Masks are decoded by common/coco_mask.py.

The exact on-disk layout each reader expects, and where to get the data, is in data/README.md.
Items are plain dicts of tensors; `collate_video` / `collate_image` / `collate_vis` pad a batch
to a multiple of 32.
"""
import csv
import json
import math
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from common.coco_mask import polygons_to_mask, rle_decode, rle_has_pixels

# Shapes: B batch, T frames, N target objects, H W resized size, H0 W0 original size, Hp Wp padded
# size

# Input normalisation the pretrained image backbones were trained with (RGB, [0, 1] scale):
# ImageNet's, as Swin's and Mask2Former's preprocessor_config.json (CLIP's own: common.backbones)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- file helpers

def _read_json(path: Path, dataset: str, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected {what} at {path} (see data/README.md)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{dataset}: {what} {path} is not valid JSON (truncated or corrupt "
                         f"download?): {err}") from None


def _read_pickle(path: Path, dataset: str, what: str):
    """A pickle file (the refer API's refs(*.p)): only load files you trust."""
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected {what} at {path} (see data/README.md)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, ImportError) as err:
        raise ValueError(f"{dataset}: {what} {path} is not a readable pickle (truncated or corrupt "
                         f"download?): "
                         f"{type(err).__name__}: {err}") from None


def _expression(exp, path: Path, dataset: str, where: str, key: str = "exp") -> str:
    """The normalised expression text of a meta entry; an empty, blank or non-string one is an
    error."""
    text = _key(exp, key, path, dataset, where)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{dataset}: {path} {where} has an empty expression ({text!r}); every "
                         f"expression needs "
                         f"text (see data/README.md)")
    return " ".join(text.lower().split())  # lower case, whitespace collapsed (MeViS loaders)


def _as_list(value) -> list:
    """obj_id / anno_id as a list: the json may hold one id or a list of them."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _frame_files(image_dir: Path, video: str, frames: list, dataset: str) -> None:
    """Every frame the metadata names is on disk (one listing per video folder)."""
    folder = _require_dir(image_dir / video, dataset, f"video {video!r}")
    present = {p.stem for p in folder.iterdir() if p.suffix == ".jpg"}
    missing = [f for f in frames if f not in present]
    if missing:
        raise FileNotFoundError(f"{dataset}: {len(missing)} of the {len(frames)} frames the "
                                f"metadata lists for video {video!r} are not in {folder}, e.g. "
                                f"{missing[0]}.jpg (see data/README.md)")


def _key(mapping, key, path: Path, dataset: str, where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise KeyError(f"{dataset}: {path} has no key {key!r} in {where} (see data/README.md)")
    return mapping[key]


def _require_dir(path: Path, dataset: str, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: expected {what} folder {path} (see data/README.md)")
    return path


def _read_rgb(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"expected image file {path} (see data/README.md)")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H0, W0, 3)


def _stack_frames(paths, dataset: str, video) -> torch.Tensor:
    """The frames at `paths` -> (T, 3, H0, W0) uint8, a channels-last view; one size per video."""
    frames = [_read_rgb(path) for path in paths]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"{dataset}: frames of video {video} differ in size: "
                         f"{sorted({f.shape[:2] for f in frames})}; expected one size per video")
    return rearrange(torch.from_numpy(np.stack(frames)), "t h w c -> t c h w")


def load_rgb(path: Path) -> torch.Tensor:
    """JPEG/PNG file -> (3, H0, W0) uint8 RGB tensor; a clear FileNotFoundError when it is missing.

    The tensor is a channels-last view of the decoded pixels: `interpolate` resizes that layout
    directly, much faster than after a strided uint8 copy to the contiguous layout.
    """
    return rearrange(torch.from_numpy(_read_rgb(path).copy()), "h w c -> c h w")  # (3, H0, W0)


def decode_segmentation(segmentation, h: int, w: int, *, dataset: str, where: str) -> np.ndarray:
    """A COCO-format segmentation -> (h, w) bool mask: a RLE dict (compressed string or list
    counts), a non-empty polygon list, or a non-empty list of RLE dicts (merged). Anything else,
    or a mask of another size, raises ValueError naming the dataset and `where`."""
    try:
        if isinstance(segmentation, dict):
            mask = rle_decode(segmentation)
        elif isinstance(segmentation, list) and segmentation \
                and all(isinstance(p, list) for p in segmentation):
            mask = polygons_to_mask(segmentation, h, w)
        elif isinstance(segmentation, list) and segmentation \
                and all(isinstance(p, dict) for p in segmentation):
            mask = np.any([rle_decode(p) for p in segmentation], axis=0)
        else:
            raise ValueError("expected a COCO RLE dict, a polygon list or a list of RLE dicts")
    except ValueError as err:
        raise ValueError(f"{dataset}: bad segmentation in {where}: {err}") from err
    if mask.shape != (h, w):
        raise ValueError(f"{dataset}: segmentation in {where} is {list(mask.shape)}, expected "
                         f"{[h, w]}")
    return mask.astype(bool)  # (h, w)


# ---------------------------------------------------------------- transforms

def resized_size(height: int, width: int, *, short_side: int, max_size: int) -> tuple:
    """Shorter side to `short_side`, unless that makes the longer side exceed `max_size`."""
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_clip(frames: torch.Tensor, masks=None, *, short_side: int, max_size: int):
    """frames (T, 3, H0, W0) uint8 -> (T, 3, H, W) uint8, antialiased bilinear (like PIL's resize);
    masks (N, T, H0, W0) bool -> (N, T, H, W) nearest-exact (pixel centres, so masks stay aligned
    with the frames; plain "nearest" shifts them by up to a pixel). Resizing uint8 on the CPU is
    several times faster than float."""
    size = resized_size(*frames.shape[-2:], short_side=short_side, max_size=max_size)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False,
                           antialias=True)  # (T, 3, H, W)
    if masks is not None:
        masks = F.interpolate(masks.view(torch.uint8), size=size,
                              mode="nearest-exact").bool()  # (N, T, H, W)
    return frames, masks


def normalize(frames: torch.Tensor, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(..., 3, H, W) uint8 RGB -> contiguous float32, mean/std normalised
    (ImageNet's by default)."""
    mean = torch.tensor(mean)[:, None, None] * 255  # (3, 1, 1)
    std = torch.tensor(std)[:, None, None] * 255
    return frames.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|ward|wards|side|s)?\b)", re.IGNORECASE)
_SWAPPED = {"left": "right", "right": "left"}


def swap_left_right(expression: str) -> str:
    """Swap the words left/right (also leftmost, rightward, leftside, ...) in an expression, keeping
    their capitalisation ("Left" -> "Right", "LEFT" -> "RIGHT").

    Only whole words and these suffixes are touched, so "bright" or "leftover" are left alone; the
    verb "left" ("the man who left") is swapped too, which a word-level rule cannot tell apart.
    """
    def swap(match):
        word = match.group(1)
        other = _SWAPPED[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() \
            else other

    return _LEFT_RIGHT.sub(swap, expression)


def hflip_clip(frames: torch.Tensor, masks, expression: str):
    """Flip (..., H, W) frames and masks horizontally and swap left/right in the expression.

    The official DsHmp and VATEX pipelines flip without touching the text (VATEX does not flip
    at all), which makes "the leftmost dog" wrong on half of the flipped clips; we keep it true.
    """
    return frames.flip(-1), (None if masks is None else masks.flip(-1)), swap_left_right(expression)


# ---------------------------------------------------------------- clip sampling

def sample_clip(num_video_frames: int, *, num_frames: int, frame_range: int,
                generator: torch.Generator) -> list:
    """DsHmp's training clip (dshmp/data/dataset_mapper.py): a random reference frame plus
    num_frames-1 frames drawn from within +-frame_range of it (reference excluded), without
    replacement when enough are available, else with replacement; returned sorted.
    DsHmp switches to replacement when the window holds <= num_frames-1 frames; we only when it
    holds fewer.
    """
    ref = int(torch.randint(num_video_frames, (), generator=generator))
    window = [i for i in range(max(0, ref - frame_range),
                               min(num_video_frames, ref + frame_range + 1)) if i != ref]
    need = num_frames - 1
    if not window:
        picked = [ref] * need  # a one-frame video
    elif len(window) >= need:
        picked = [window[i] for i in torch.randperm(len(window),
                                                    generator=generator)[:need].tolist()]
    else:
        picked = [window[i] for i in torch.randint(len(window), (need,),
                                                   generator=generator).tolist()]
    return sorted([ref] + picked)


def item_generator(seed: int) -> torch.Generator:
    """A fresh generator per item, seeded by `seed` and one draw from the global torch RNG.

    DataLoader seeds each worker's torch RNG (base_seed + worker_id, base_seed drawn from the main
    process each epoch), so after torch.manual_seed the clips are reproducible, and they differ
    across workers, epochs and dataset seeds; Python's `random` is never used.
    """
    draw = int(torch.randint(2**62, (), dtype=torch.int64))
    return torch.Generator().manual_seed((seed * 1_000_003 + draw) % (2**63))


def _coin(generator: torch.Generator) -> bool:
    return bool(torch.rand((), generator=generator) < 0.5)


# ---------------------------------------------------------------- referring video datasets

def clip_item(frames, masks, expression, sample, frame_idx, index, orig_size) -> dict:
    """A referring-video training item, as collate_video takes it: frames (T, 3, H, W) (0-255)
    normalised, masks (N, T, H, W) bool, the expression as augmented, and the sample's ids."""
    return {
        "frames": normalize(frames),  # (T, 3, H, W)
        "masks": masks,  # (N, T, H, W)
        "expression": expression,
        "video": sample["video"],
        "exp_id": sample["exp_id"],
        "frame_idx": torch.as_tensor(frame_idx, dtype=torch.long),  # (T,)
        "obj_ids": list(sample["obj_ids"]),
        "index": index,
        "orig_size": orig_size,
    }


class _ReferringVideo(torch.utils.data.Dataset):
    """Shared item logic of MeViS, Ref-YouTube-VOS and Ref-DAVIS17.

    A subclass fills `self.samples` (one dict per expression: video, exp_id, expression, obj_ids,
    anno_ids, frames), `self.image_dir`, `self.has_masks`, and implements
    `_visible(sample) -> (L,) bool` (cheap per-frame "some target pixel" flags) and
    `_load_masks(sample, frame_idx, size) -> (N, T, H0, W0) bool numpy`.
    """

    name = "video dataset"
    # clip draws before giving up on an expression whose target is hardly ever visible
    max_tries = 100

    def __init__(self, *, train, num_frames, frame_range, short_side, max_size, flip, seed):
        self.train, self.num_frames, self.frame_range = train, num_frames, frame_range
        self.short_side, self.max_size, self.flip, self.seed = short_side, max_size, flip, seed
        self.samples = []

    def _finish(self, samples, empty: list):
        """Keep every sample for evaluation. In training drop, with one warning each, those whose
        target is never visible and those of one-frame videos (the official loaders drop both)."""
        if self.train:
            one_frame = [(s["video"], s["exp_id"]) for s in samples if len(s["frames"]) < 2]
            for skipped, why in ((empty, "whose target is absent from every frame"),
                                 (one_frame, "of videos with a single frame")):
                if skipped:
                    video, exp_id = skipped[0]
                    warnings.warn(f"{self.name}: skipped {len(skipped)} training expressions {why} "
                                  f"(e.g. video "
                                  f"{video!r}, exp_id {exp_id!r})", stacklevel=3)
            skip = set(empty) | set(one_frame)
            samples = [s for s in samples if (s["video"], s["exp_id"]) not in skip]
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def _load_frames(self, sample, frame_idx) -> torch.Tensor:
        folder = self.image_dir / sample["video"]
        return _stack_frames([folder / f"{sample['frames'][t]}.jpg" for t in frame_idx],
                             self.name, folder)  # (T, 3, H0, W0)

    def __getitem__(self, index):
        sample = self.samples[index]
        return self._train_item(index, sample) if self.train else self._eval_item(index, sample)

    def _train_item(self, index, sample):
        generator = item_generator(self.seed)
        visible = self._visible(sample)  # (L,)
        # redraw the whole clip until a target pixel survives the resize
        for _ in range(self.max_tries):
            frame_idx = sample_clip(len(sample["frames"]), num_frames=self.num_frames,
                                    frame_range=self.frame_range, generator=generator)
            if not visible[frame_idx].any():
                continue
            frames = self._load_frames(sample, frame_idx)  # (T, 3, H0, W0)
            orig_size = tuple(frames.shape[-2:])
            # (N, T, H0, W0)
            masks = torch.from_numpy(self._load_masks(sample, frame_idx, orig_size))
            # official: visibility is checked after resizing, where a target of a few pixels can
            # vanish
            frames, masks = resize_clip(frames, masks, short_side=self.short_side,
                                        max_size=self.max_size)
            if masks.any():
                break
        else:
            raise RuntimeError(f"{self.name}: no target pixel left after resizing in "
                               f"{self.max_tries} sampled clips of video {sample['video']!r}, "
                               f"exp_id {sample['exp_id']!r} (visible at full size in "
                               f"{int(visible.sum())} of {len(visible)} frames)")
        expression = sample["expression"]
        if self.flip and _coin(generator):  # flipping after the resize touches fewer pixels
            frames, masks, expression = hflip_clip(frames, masks, expression)
        return clip_item(frames, masks, expression, sample, frame_idx, index, orig_size)

    def _eval_item(self, index, sample):
        frame_idx = list(range(len(sample["frames"])))
        frames = []
        for t in frame_idx:  # one frame at a time, so only one full-resolution frame is in memory
            frame = self._load_frames(sample, [t])  # (1, 3, H0, W0)
            orig_size = tuple(frame.shape[-2:])
            frames.append(resize_clip(frame, short_side=self.short_side, max_size=self.max_size)[0])
        gt = None
        # the union of the targets, 16 frames at a time to bound memory on long videos
        if self.has_masks:
            gt = torch.cat([torch.from_numpy(self._load_masks(sample, frame_idx[i:i + 16],
                                                              orig_size).any(0))
                            for i in range(0, len(frame_idx), 16)])  # (T, H0, W0)
        return {
            "frames": normalize(torch.cat(frames)),  # (T, 3, H, W)
            "gt": gt,
            "orig_size": orig_size,
            "frame_names": list(sample["frames"]),
            "expression": sample["expression"],
            "video": sample["video"],
            "exp_id": sample["exp_id"],
            "index": index,
        }


def _split_dir(root, split, dataset: str) -> Path:
    root = Path(root)
    _require_dir(root, dataset, "dataset root")
    return _require_dir(root / split, dataset, f"split {split!r}")


class MeViS(_ReferringVideo):
    """MeViS (Ding et al., ICCV'23) in its release layout: <root>/<split>/{meta_expressions.json,
    mask_dict.json, JPEGImages/<video>/<frame>.jpg}. The online splits `valid` and `test` have no
    mask_dict.json (items get gt None); every other split must have one.

    Training items are DsHmp clips with one mask track per anno_id; evaluation items are whole
    videos with the union of the targets at original resolution. Expressions whose target is
    absent from every frame are skipped in training (one warning) and kept for evaluation.
    Checked at init: the json files and keys, the expressions (not empty), the mask lists (one
    entry per frame) and that every listed frame file exists; RLE contents are checked when read.
    """

    name = "MeViS"
    maskless_splits = ("valid", "test")  # scored by the challenge server

    def __init__(self, root, split, *, train: bool, num_frames=8, frame_range=10, short_side=360,
                 max_size=640,
                 flip=True, seed=0):
        super().__init__(train=train, num_frames=num_frames, frame_range=frame_range,
                         short_side=short_side,
                         max_size=max_size, flip=flip, seed=seed)
        split_dir = _split_dir(root, split, "MeViS")
        meta_path = split_dir / "meta_expressions.json"
        meta = _read_json(meta_path, "MeViS", "the expression file")
        videos = _key(meta, "videos", meta_path, "MeViS", "the top level")
        self.mask_path = split_dir / "mask_dict.json"
        self.has_masks = self.mask_path.is_file()
        if not self.has_masks and (train or split not in self.maskless_splits):
            raise FileNotFoundError(f"MeViS: {'training' if train else f'split {split!r}'} needs "
                                    f"masks, expected {self.mask_path} (only the online splits "
                                    f"{'/'.join(self.maskless_splits)} come "
                                    f"without them; see data/README.md)")
        mask_dict = _read_json(self.mask_path, "MeViS", "the mask file") if self.has_masks else {}
        self.image_dir = _require_dir(split_dir / "JPEGImages", "MeViS", "frame")
        samples, empty = [], []
        for video, entry in videos.items():
            where = f"videos[{video!r}]"
            frames = sorted(_key(entry, "frames", meta_path, "MeViS", where))
            _frame_files(self.image_dir, video, frames, "MeViS")
            for exp_id, exp in _key(entry, "expressions", meta_path, "MeViS", where).items():
                where_exp = f"{where}['expressions'][{exp_id!r}]"
                if self.has_masks:
                    anno_ids = _key(exp, "anno_id", meta_path, "MeViS", where_exp)
                else:
                    anno_ids = exp.get("anno_id", [])
                sample = {
                    "video": video,
                    "exp_id": str(exp_id),
                    "expression": _expression(exp, meta_path, "MeViS", where_exp),
                    "obj_ids": [int(o) for o in _as_list(exp.get("obj_id", []))],
                    "anno_ids": [str(a) for a in _as_list(anno_ids)],
                    "frames": frames,
                }
                for anno_id in sample["anno_ids"] if self.has_masks else []:
                    rles = _key(mask_dict, anno_id, self.mask_path, "MeViS",
                                f"the top level (anno_id of {where_exp})")
                    if not isinstance(rles, list) or len(rles) != len(frames):
                        raise ValueError(
                            f"MeViS: {self.mask_path}[{anno_id!r}] should list one RLE or null per "
                            f"frame of video {video!r} ({len(frames)}), got "
                            f"{len(rles) if isinstance(rles, list) else type(rles).__name__}")
                if train and not any(self._has_pixels(mask_dict[a], a, t)
                                              for a in sample["anno_ids"]
                                              for t in range(len(frames))):
                    empty.append((video, str(exp_id)))
                samples.append(sample)
        self._finish(samples, empty)
        # One numpy byte buffer instead of ~10^5 Python strings, so DataLoader workers share it
        # instead of copying it page by page through reference counts
        # (detectron2's DatasetFromList(serialize=True)
        # does the same for DsHmp).
        blobs = {a: json.dumps(mask_dict[a]).encode() for s in samples for a in s["anno_ids"]
                 if self.has_masks}
        ends = np.cumsum([len(b) for b in blobs.values()]).tolist()
        self._rle_spans = {a: (end - len(b), end) for (a, b), end in zip(blobs.items(), ends)}
        self._rle_buffer = np.frombuffer(b"".join(blobs.values()), dtype=np.uint8)

    def _rles(self, anno_id) -> list:
        start, end = self._rle_spans[anno_id]
        return json.loads(self._rle_buffer[start:end].tobytes())

    def _has_pixels(self, rles, anno_id, t) -> bool:
        try:
            return rle_has_pixels(rles[t])
        except (ValueError, TypeError) as err:
            raise ValueError(f"MeViS: bad RLE in "
                             f"{self.mask_path}[{anno_id!r}][{t}]: {err}") from err

    def _visible(self, sample) -> np.ndarray:
        rles = {a: self._rles(a) for a in sample["anno_ids"]}
        return np.array([any(self._has_pixels(rles[a], a, t) for a in rles)
                         for t in range(len(sample["frames"]))], dtype=bool)

    def _load_masks(self, sample, frame_idx, size) -> np.ndarray:
        # (N, T, H0, W0)
        masks = np.zeros((len(sample["anno_ids"]), len(frame_idx), *size), dtype=bool)
        for k, anno_id in enumerate(sample["anno_ids"]):
            rles = self._rles(anno_id)
            for i, t in enumerate(frame_idx):
                if rles[t] is None:
                    continue
                try:
                    mask = rle_decode(rles[t])
                except ValueError as err:
                    raise ValueError(f"MeViS: bad RLE in {self.mask_path}[{anno_id!r}][{t}] (video "
                                     f"{sample['video']!r}, frame "
                                     f"{sample['frames'][t]!r}): {err}") from err
                if mask.shape != size:
                    frame_path = self.image_dir / sample["video"] / f"{sample['frames'][t]}.jpg"
                    raise ValueError(f"MeViS: RLE {self.mask_path}[{anno_id!r}][{t}] has size "
                                     f"{list(mask.shape)}, "
                                     f"but frame {frame_path} is {list(size)}")
                masks[k, i] = mask.astype(bool)
        return masks


class _PaletteVideo(_ReferringVideo):
    """The Ref-YouTube-VOS layout (also ReferFormer's conversion of Ref-DAVIS17):
    <root>/meta_expressions/<split>/meta_expressions.json,
    <root>/<split>/JPEGImages/<video>/<frame>.jpg, <root>/<split>/Annotations/<video>/<frame>.png
    (palette PNG, pixel value = obj_id; absent for splits
    without public masks -> eval items get gt None) and an optional <root>/<split>/meta.json whose
    per-object "frames" lists say where each object is visible (used to skip and redraw cheaply;
    without it, training reads every annotation PNG once at init to find them).
    """

    def __init__(self, root, split, *, train, num_frames, frame_range, short_side,
                 max_size, flip, seed):
        super().__init__(train=train, num_frames=num_frames, frame_range=frame_range,
                         short_side=short_side,
                         max_size=max_size, flip=flip, seed=seed)
        self.root = root = _require_dir(Path(root), self.name, "dataset root")
        meta_path = root / "meta_expressions" / split / "meta_expressions.json"
        videos = _key(_read_json(meta_path, self.name, "the expression file"), "videos", meta_path,
                      self.name,
                      "the top level")
        videos = self._select_videos(root, split, videos)
        split_dir = _require_dir(root / split, self.name, f"split {split!r}")
        self.image_dir = _require_dir(split_dir / "JPEGImages", self.name, "frame")
        self.annotation_dir = split_dir / "Annotations"
        self.has_masks = self.annotation_dir.is_dir()
        if train and not self.has_masks:
            raise FileNotFoundError(f"{self.name}: training needs masks, expected folder "
                                    f"{self.annotation_dir} "
                                    "(see data/README.md)")
        objects_path = split_dir / "meta.json"
        objects = {}
        if objects_path.is_file():
            objects = _key(_read_json(objects_path, self.name, "the object file"), "videos",
                           objects_path, self.name,
                           "the top level")
        samples, empty, scanned = [], [], set()
        # (video, obj_id) -> set of frame names where the object is visible
        self._object_frames = {}
        for video, entry in videos.items():
            where = f"videos[{video!r}]"
            frames = sorted(_key(entry, "frames", meta_path, self.name, where))
            _frame_files(self.image_dir, video, frames, self.name)
            for exp_id, exp in _key(entry, "expressions", meta_path, self.name, where).items():
                where_exp = f"{where}['expressions'][{exp_id!r}]"
                obj_id = _key(exp, "obj_id", meta_path, self.name, where_exp) if self.has_masks \
                    else exp.get("obj_id")
                obj_ids = [] if obj_id is None else [int(o) for o in _as_list(obj_id)]
                sample = {
                    "video": video,
                    "exp_id": str(exp_id),
                    "expression": _expression(exp, meta_path, self.name, where_exp),
                    "obj_ids": obj_ids,
                    "anno_ids": [str(o) for o in obj_ids],  # the palette value, as a string
                    "frames": frames,
                }
                if train:
                    for o in obj_ids:
                        listed = objects.get(video, {}).get("objects", {}).get(str(o), {}) \
                            .get("frames")
                        if listed is None and video not in scanned:
                            self._object_frames.update(self._scan_video(video, frames))
                            scanned.add(video)
                        self._object_frames.setdefault((video, o), set(listed or ()))
                    if not self._visible(sample).any():
                        empty.append((video, str(exp_id)))
                samples.append(sample)
        self._finish(samples, empty)

    def _select_videos(self, root: Path, split: str, videos: dict) -> dict:
        return videos

    def _scan_video(self, video, frames) -> dict:
        seen = {}
        for name in frames:
            for value in np.unique(self._read_png(video, name)).tolist():
                seen.setdefault((video, int(value)), set()).add(name)
        return seen

    def _read_png(self, video, name) -> np.ndarray:
        path = self.annotation_dir / video / f"{name}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: expected annotation {path} (see data/README.md)")
        with Image.open(path) as png:
            if png.mode not in ("P", "L"):
                raise ValueError(f"{self.name}: {path} is a {png.mode} image; expected a palette "
                                 f"(P) PNG whose "
                                 "pixel values are object ids")
            return np.asarray(png)

    def _visible(self, sample) -> np.ndarray:
        names = set().union(*[self._object_frames.get((sample["video"], o), set())
                              for o in sample["obj_ids"]])
        return np.array([name in names for name in sample["frames"]], dtype=bool)

    def _load_masks(self, sample, frame_idx, size) -> np.ndarray:
        # (N, T, H0, W0)
        masks = np.zeros((len(sample["obj_ids"]), len(frame_idx), *size), dtype=bool)
        for i, t in enumerate(frame_idx):
            ids = self._read_png(sample["video"], sample["frames"][t])  # (H0, W0)
            if ids.shape != size:
                raise ValueError(
                    f"{self.name}: {self.annotation_dir / sample['video'] / sample['frames'][t]}"
                    f".png is {list(ids.shape)}, but its frame is {list(size)}")
            for k, obj_id in enumerate(sample["obj_ids"]):
                masks[k, i] = ids == obj_id
        return masks


class RefYouTubeVOS(_PaletteVideo):
    """Ref-YouTube-VOS (Seo et al., ECCV'20; the RVOS challenge release): see `_PaletteVideo` and
    data/README.md for the layout; the public `valid` split has no Annotations (gt None).

    The release's meta_expressions/valid/meta_expressions.json lists the 202 valid videos and the
    305 test videos; as ReferFormer (inference_ytvos.py), `valid` keeps only the videos that
    meta_expressions/test/meta_expressions.json does not list, and says how many it kept."""

    name = "Ref-YouTube-VOS"

    def _select_videos(self, root: Path, split: str, videos: dict) -> dict:
        if split != "valid":
            return videos
        test_path = root / "meta_expressions" / "test" / "meta_expressions.json"
        test = _key(_read_json(test_path, self.name,
                               "the test expression file (it names the test videos that "
                               "valid's expression file also lists)"), "videos", test_path,
                    self.name, "the top level")
        kept = {video: entry for video, entry in videos.items() if video not in test}
        print(f"{self.name}: valid keeps {len(kept)} of the {len(videos)} videos its expression "
              f"file lists (the other {len(videos) - len(kept)} are the test videos of "
              f"{test_path}; the release has 202)")
        return kept

    def __init__(self, root, split, *, train: bool, num_frames=8, frame_range=10, short_side=360,
                 max_size=640,
                 flip=True, seed=0):
        super().__init__(root, split, train=train, num_frames=num_frames, frame_range=frame_range,
                         short_side=short_side, max_size=max_size, flip=flip, seed=seed)


class RefDAVIS17(_PaletteVideo):
    """Ref-DAVIS17 (Khoreva et al., ACCV'18) after ReferFormer's
    tools/data/convert_davis_to_ytvos.py, which writes the Ref-YouTube-VOS layout (its meta.json has
    no frame lists); see data/README.md."""

    name = "Ref-DAVIS17"

    def __init__(self, root, split="valid", *, train: bool, num_frames=8, frame_range=10,
                 short_side=360,
                 max_size=640, flip=True, seed=0):
        super().__init__(root, split, train=train, num_frames=num_frames, frame_range=frame_range,
                         short_side=short_side, max_size=max_size, flip=flip, seed=seed)


# ---------------------------------------------------------------- A2D-Sentences / JHMDB-Sentences

def annotated_window(num_video_frames: int, frame: int, *, num_frames: int) -> tuple:
    """The evaluation clip of MTTR and ReferFormer (datasets/a2d.py, jhmdb.py, subset 'val'):
    num_frames consecutive frames with the annotated `frame` (0-based) at position
    num_frames // 2, indices outside the video clamped to its ends (edge frames repeated).
    Returns (the frame indices, the position of `frame` among them: its first occurrence, as
    ReferFormer's `sample_indx.index(frame_id)`, the frame it scores)."""
    start = frame - num_frames // 2
    frame_idx = [min(max(i, 0), num_video_frames - 1) for i in range(start, start + num_frames)]
    return frame_idx, frame_idx.index(frame)


def sample_annotated_clip(num_video_frames: int, frame: int, *, num_frames: int,
                          generator: torch.Generator) -> tuple:
    """ReferFormer's A2D-Sentences training clip (wjn922/ReferFormer @ 06fc218, datasets/a2d.py):
    the annotated `frame` (0-based), one frame 1-3 before and one 1-3 after it (clamped to the
    video), and num_frames - 3 frames drawn without replacement from outside the span of those
    three (its last frame counted as outside, as ReferFormer's `all_inds[max(sample_indx):]`),
    else from the whole video, else every frame and the rest drawn with replacement (ReferFormer:
    without, which fails for clips over twice the video length). Returns (the sorted indices,
    the position of `frame` among them: its first occurrence, as `sample_indx.index(frame_id)`)."""
    if num_frames < 3:
        raise ValueError(f"an annotated-frame clip has at least 3 frames (the annotated one and "
                         f"one on each side), got num_frames={num_frames}")
    before, after = (int(torch.randint(1, 4, (), generator=generator)) for _ in range(2))
    picked = [frame, max(0, frame - before), min(num_video_frames - 1, frame + after)]
    need, every = num_frames - 3, list(range(num_video_frames))
    outside = every[:min(picked)] + every[max(picked):]
    if len(outside) > need:
        chosen = torch.randperm(len(outside), generator=generator)[:need].tolist()
        picked += [outside[i] for i in chosen]
    elif num_video_frames >= need:
        picked += torch.randperm(num_video_frames, generator=generator)[:need].tolist()
    else:
        picked += every + torch.randint(num_video_frames, (need - num_video_frames,),
                                        generator=generator).tolist()
    frame_idx = sorted(int(i) for i in picked)
    return frame_idx, frame_idx.index(frame)


def _read_text(path: Path, dataset: str, what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected {what} at {path} (see data/README.md)")
    return path.read_text(encoding="utf-8")


def read_a2d_videoset(path: Path) -> dict:
    """Release/videoset.csv -> {video: split}: no header, 9 columns (vid, label, start_time,
    end_time, height, width, total_frames, annotated_frames, subset; MTTR's names), the split
    in the last (0 train, 1 test)."""
    splits = {}
    for line, row in enumerate(csv.reader(_read_text(path, "A2D-Sentences",
                                                     "the video list").splitlines()), 1):
        if not row:
            continue
        if len(row) != 9 or not row[8].strip().isdigit():
            raise ValueError(f"A2D-Sentences: {path} line {line} should have 9 comma-separated "
                             f"columns, the last the split (0 or 1), got {row}")
        splits[row[0]] = int(row[8])
    return splits


def read_a2d_sentences(path: Path) -> list:
    """text_annotations/a2d_annotation.txt (header video_id,instance_id,query) -> one dict per
    row {"row", "video", "instance", "query"}, instance as written (the release has one
    '1 (copy)')."""
    reader = csv.DictReader(_read_text(path, "A2D-Sentences", "the sentence file").splitlines())
    if not {"video_id", "instance_id", "query"} <= set(reader.fieldnames or ()):
        raise ValueError(f"A2D-Sentences: {path} should start with the header "
                         f"'video_id,instance_id,query', got {reader.fieldnames}")
    return [{"row": i, "video": r["video_id"], "instance": r["instance_id"].strip(),
             "query": r["query"]} for i, r in enumerate(reader)]


def a2d_instance_masks(arrays, where: str) -> tuple:
    """One annotated A2D frame (the arrays of its .h5 file, kept as they are in the converted
    .npz) -> (instance ids (N,) int64, masks (N, H, W) bool). `reMask` is stored transposed,
    (N, W, H), or (W, H) when the frame has one instance, as MTTR reads it
    (a2d_sentences_dataset.py: `[np.newaxis]` when one instance, then `.transpose(1, 2)`)."""
    for key in ("instance", "reMask"):
        if key not in arrays:
            raise KeyError(f"A2D-Sentences: {where} has no array {key!r} (see data/README.md)")
    ids = np.asarray(arrays["instance"]).reshape(-1).astype(np.int64)  # (N,)
    masks = np.asarray(arrays["reMask"])
    if len(ids) == 1 and masks.ndim == 2:
        masks = masks[None]  # (1, W, H)
    if masks.ndim != 3 or len(masks) != len(ids):
        raise ValueError(f"A2D-Sentences: {where} has reMask of shape {masks.shape} for "
                         f"{len(ids)} instances; expected (N, W, H), or (W, H) for one")
    return ids, rearrange(masks != 0, "n w h -> n h w")


class _AnnotatedFrames(torch.utils.data.Dataset):
    """Shared item logic of A2D-Sentences and JHMDB-Sentences: a sample is one sentence with one
    annotated frame of its video.

    A subclass fills `self.samples` (dicts: video, exp_id, expression, obj_ids, frame (0-based),
    length (the frames a clip may use), image_id (the COCO image id of MTTR's ground truth)) and
    implements `_frame_path(sample, t)` and `_mask(sample) -> (H0, W0) bool numpy`.

    Training items: `sample_annotated_clip` frames and masks (1, 1, H, W), the target at the
    annotated frame only, whose position in the clip is "annotated_frame"; when no target pixel
    is left after the resize, a random other sample is drawn, as ReferFormer does (its
    `instance_check`). Evaluation items: the `annotated_window` frames, "gt" (H0, W0) bool the
    target at the annotated frame, "frame" its position in the window, "image_id".
    """

    name = "annotated-frame dataset"
    max_tries = 100  # samples drawn before giving up on a training item

    def __init__(self, *, train, num_frames, short_side, max_size, flip, seed):
        self.train, self.num_frames, self.short_side, self.max_size = train, num_frames, \
            short_side, max_size
        self.flip, self.seed, self.samples = flip, seed, []

    def __len__(self):
        return len(self.samples)

    def _load_frames(self, sample, frame_idx) -> torch.Tensor:
        return _stack_frames([self._frame_path(sample, t) for t in frame_idx], self.name,
                             repr(sample["video"]))  # (T, 3, H0, W0)

    def _sized(self, sample, mask, size) -> np.ndarray:
        if mask.shape != tuple(size):
            raise ValueError(f"{self.name}: the mask of frame {sample['frame'] + 1} of video "
                             f"{sample['video']!r} is {list(mask.shape)}, its frame {list(size)}")
        return mask

    def __getitem__(self, index):
        return self._train_item(index) if self.train else self._eval_item(index)

    def _train_item(self, index):
        generator = item_generator(self.seed)
        for _ in range(self.max_tries):
            sample = self.samples[index]
            mask = self._mask(sample)  # (H0, W0)
            if mask.any():
                frame_idx, position = sample_annotated_clip(
                    sample["length"], sample["frame"], num_frames=self.num_frames,
                    generator=generator)
                frames = self._load_frames(sample, frame_idx)  # (T, 3, H0, W0)
                orig_size = tuple(frames.shape[-2:])
                # (1, 1, H0, W0)
                masks = torch.from_numpy(self._sized(sample, mask, orig_size))[None, None]
                frames, masks = resize_clip(frames, masks, short_side=self.short_side,
                                            max_size=self.max_size)
                if masks.any():
                    break
            index = int(torch.randint(len(self.samples), (), generator=generator))
        else:
            raise RuntimeError(f"{self.name}: no target pixel in {self.max_tries} drawn samples "
                               f"(after resizing)")
        expression = sample["expression"]
        if self.flip and _coin(generator):
            frames, masks, expression = hflip_clip(frames, masks, expression)
        return {**clip_item(frames, masks, expression, sample, frame_idx, index, orig_size),
                "annotated_frame": position}  # masks (1, 1, H, W): the annotated frame only

    def _eval_item(self, index):
        sample = self.samples[index]
        frame_idx, position = annotated_window(sample["length"], sample["frame"],
                                               num_frames=self.num_frames)
        resized = {}
        for t in dict.fromkeys(frame_idx):  # each frame once, at full resolution one at a time
            frame = self._load_frames(sample, [t])  # (1, 3, H0, W0)
            orig_size = tuple(frame.shape[-2:])
            resized[t] = resize_clip(frame, short_side=self.short_side, max_size=self.max_size)[0]
        return {
            "frames": normalize(torch.cat([resized[t] for t in frame_idx])),  # (T, 3, H, W)
            "gt": torch.from_numpy(self._sized(sample, self._mask(sample), orig_size)),  # (H0, W0)
            "frame": position,
            "frame_idx": torch.tensor(frame_idx, dtype=torch.long),  # (T,)
            "orig_size": orig_size,
            "expression": sample["expression"],
            "video": sample["video"],
            "exp_id": sample["exp_id"],
            "image_id": sample["image_id"],
            "index": index,
        }


class A2DSentences(_AnnotatedFrames):
    """A2D-Sentences (Gavrilyuk et al., CVPR'18) after data/convert_a2d.py, which decodes the
    release's videos to JPEG frames and copies each annotation .h5 to a .npz with the same
    arrays: <root>/Release/videoset.csv, <root>/text_annotations/{a2d_annotation.txt,
    a2d_missed_videos.txt, a2d_annotation_with_instances/<video>/<frame:05d>.npz} and
    <root>/JPEGImages/<video>/<frame:05d>.jpg (numbered from 1, as the annotations); see
    data/README.md. Splits `train` and `test` (videoset.csv's last column, 0 and 1).

    Samples as MTTR builds them (mttr2021/MTTR @ 2cc35ab, datasets/a2d_sentences/
    a2d_sentences_dataset.py `get_text_annotations`; ReferFormer reads its output): the sentence
    rows of the split's videos, except the videos a2d_missed_videos.txt lists and the row whose
    instance_id is '1 (copy)'; for each, every annotated frame (in name order) whose `instance`
    array lists the row's instance id gives one sample; its mask is the first listed one's
    (`a2d_instance_masks`). The expression is lower-cased with its whitespace collapsed. Checked
    at init: the three text files, each video's annotation folder and frames (00001.jpg
    onwards, no gap; every annotated frame among them); masks are checked when read.
    frame_range is not used (ReferFormer's clip: `sample_annotated_clip`). Defaults: DsHmp's
    short side 360 / long side 640 (ReferFormer's test size too), ReferFormer's 5 frames.
    """

    name = "A2D-Sentences"
    splits = {"train": 0, "test": 1}  # videoset.csv's last column (MTTR)
    dropped_instance = "1 (copy)"  # MTTR: "a single dataset annotation mistake in T6bNPuKV-wY"

    def __init__(self, root, split, *, train: bool, num_frames=5, frame_range=None,
                 short_side=360, max_size=640, flip=True, seed=0):
        super().__init__(train=train, num_frames=num_frames, short_side=short_side,
                         max_size=max_size, flip=flip, seed=seed)
        if split not in self.splits:
            raise ValueError(f"A2D-Sentences: no split {split!r}; the splits are "
                             f"{sorted(self.splits)}")
        root = _require_dir(Path(root), self.name, "dataset root")
        text_dir = root / "text_annotations"
        videoset = read_a2d_videoset(root / "Release" / "videoset.csv")
        missed = set(_read_text(text_dir / "a2d_missed_videos.txt", self.name,
                                "the list of missed videos").splitlines())
        used = {v for v, s in videoset.items() if s == self.splits[split] and v not in missed}
        self.annotation_dir = text_dir / "a2d_annotation_with_instances"
        self.image_dir = _require_dir(root / "JPEGImages", self.name, "frame")
        lengths, frame_ids = {}, {}  # per video; per annotation file: its instance ids
        for row in read_a2d_sentences(text_dir / "a2d_annotation.txt"):
            video = row["video"]
            if video not in used or row["instance"] == self.dropped_instance:
                continue
            if not row["instance"].isdigit():
                raise ValueError(f"A2D-Sentences: {text_dir / 'a2d_annotation.txt'} row "
                                 f"{row['row'] + 1} has instance_id {row['instance']!r}; "
                                 f"expected an integer")
            if video not in lengths:
                lengths[video] = self._video_frames(video)
            instance = int(row["instance"])
            for path in sorted(_require_dir(self.annotation_dir / video, self.name,
                                            f"annotation of video {video!r}").glob("*.npz")):
                if path not in frame_ids:
                    frame_ids[path] = self._instance_ids(path)
                if instance not in frame_ids[path]:
                    continue  # not annotated in this frame: no sample (MTTR, after CMPC-V)
                frame = int(path.stem)
                if not 1 <= frame <= lengths[video]:
                    raise FileNotFoundError(f"A2D-Sentences: {path} annotates frame {frame}, "
                                            f"but {self.image_dir / video} holds frames 1 to "
                                            f"{lengths[video]} (see data/README.md)")
                self.samples.append({
                    "video": video, "exp_id": str(row["row"]),
                    "expression": " ".join(row["query"].lower().split()),
                    "obj_ids": [instance], "frame": frame - 1, "length": lengths[video],
                    "image_id": f"v_{video}_f_{frame}_i_{instance}", "file": path})

    def _video_frames(self, video) -> int:
        folder = _require_dir(self.image_dir / video, self.name, f"video {video!r}")
        names = sorted(p.stem for p in folder.iterdir() if p.suffix == ".jpg")
        expected = [f"{i:05d}" for i in range(1, len(names) + 1)]
        if names != expected:
            gap = next(e for n, e in zip(names + [""], expected) if n != e)
            raise FileNotFoundError(f"A2D-Sentences: {folder} should hold frames 00001.jpg to "
                                    f"{len(names):05d}.jpg, but {gap}.jpg is missing (see "
                                    f"data/README.md)")
        return len(names)

    def _instance_ids(self, path: Path) -> list:
        with np.load(path) as arrays:  # reads the one array only
            if "instance" not in arrays:
                raise KeyError(f"A2D-Sentences: {path} has no array 'instance' (see "
                               f"data/README.md)")
            return np.asarray(arrays["instance"]).reshape(-1).astype(np.int64).tolist()

    def _frame_path(self, sample, t) -> Path:
        return self.image_dir / sample["video"] / f"{t + 1:05d}.jpg"

    def _mask(self, sample) -> np.ndarray:
        with np.load(sample["file"]) as arrays:
            ids, masks = a2d_instance_masks(arrays, str(sample["file"]))  # (N,), (N, H0, W0)
        return masks[list(ids).index(sample["obj_ids"][0])]  # the first listed, as MTTR


def _from_part(listed: str, folder: str, path: Path, k: int) -> Path:
    """The part of a path that JHMDB-Sentences' samples file lists from `folder` on (it lists
    './jhmdb_sentences/<folder>/...')."""
    parts = Path(listed).parts
    if folder not in parts:
        raise ValueError(f"JHMDB-Sentences: {path} entry {k} lists {listed!r}, which has no "
                         f"{folder}/ part")
    return Path(*parts[parts.index(folder):])


class JHMDBSentences(_AnnotatedFrames):
    """JHMDB-Sentences (Gavrilyuk et al., CVPR'18), evaluation only, in its release layout plus
    MTTR's samples file, read as they are: <root>/Rename_Images/<class>/<video>/<frame:05d>.png,
    <root>/puppet_mask/<class>/<video>/puppet_mask.mat (`part_mask`, uint8 (H, W, T), not
    transposed; T may be less than the PNGs) and <root>/jhmdb_sentences_samples_metadata.json;
    see data/README.md.

    The scored frames are 3 per video that MTTR drew once without a seed (@ 2cc35ab,
    datasets/jhmdb_sentences/jhmdb_sentences_dataset.py `get_samples_metadata`: random.sample
    among the frames that have a mask) and ships as that json, which its config
    (generate_new_samples_metadata: false) and ReferFormer read; the draw cannot be redone, so
    this reader reads the json: [video, frame path, mask path, usable frames (min of the PNGs and
    T), sentence] per sample. The paths are taken from their Rename_Images/ and puppet_mask/
    parts, under <root>; the usable frames bound the window. Checked at init: the json, each
    video's frames 00001.png onwards and its mask file; masks are checked when read.
    """

    name = "JHMDB-Sentences"
    metadata_file = "jhmdb_sentences_samples_metadata.json"

    def __init__(self, root, split="test", *, train: bool = False, num_frames=5, frame_range=None,
                 short_side=360, max_size=640, flip=False, seed=0):
        super().__init__(train=train, num_frames=num_frames, short_side=short_side,
                         max_size=max_size, flip=flip, seed=seed)
        if train or split != "test":
            raise ValueError(f"JHMDB-Sentences is evaluation only (split 'test', train=False), "
                             f"got split {split!r}, train={train}")
        self.root = root = _require_dir(Path(root), self.name, "dataset root")
        path = root / self.metadata_file
        metadata = _read_json(path, self.name, "MTTR's samples file")
        if not isinstance(metadata, list):
            raise ValueError(f"JHMDB-Sentences: {path} should be a list of samples")
        checked = set()
        for k, entry in enumerate(metadata):
            if not isinstance(entry, list) or len(entry) != 5:
                raise ValueError(f"JHMDB-Sentences: {path} should be a list of [video, frame "
                                 f"path, mask path, frames, sentence], entry {k} is {entry!r}")
            video, frame_path, mask_path, length, text = entry
            frames_dir = root / _from_part(frame_path, "Rename_Images", path, k).parent
            mask_file = root / _from_part(mask_path, "puppet_mask", path, k)
            frame = int(Path(frame_path).stem)
            if video not in checked:
                self._check_video(frames_dir, mask_file, int(length))
                checked.add(video)
            self.samples.append({
                "video": video, "exp_id": video,
                "expression": " ".join(str(text).lower().split()),
                "obj_ids": [0], "frame": frame - 1, "length": int(length),
                "image_id": f"v_{video}_f_{frame}", "frames_dir": frames_dir,
                "mask_file": mask_file})

    def _check_video(self, frames_dir: Path, mask_file: Path, length: int) -> None:
        folder = _require_dir(frames_dir, self.name, "frame")
        present = {p.name for p in folder.iterdir()}
        missing = [f"{i:05d}.png" for i in range(1, length + 1) if f"{i:05d}.png" not in present]
        if missing:
            raise FileNotFoundError(f"JHMDB-Sentences: {folder} should hold frames 00001.png to "
                                    f"{length:05d}.png, but {missing[0]} is missing (see "
                                    f"data/README.md)")
        if not mask_file.is_file():
            raise FileNotFoundError(f"JHMDB-Sentences: expected the masks at {mask_file} (see "
                                    f"data/README.md)")

    def _frame_path(self, sample, t) -> Path:
        return sample["frames_dir"] / f"{t + 1:05d}.png"

    def _mask(self, sample) -> np.ndarray:
        path = sample["mask_file"]
        try:
            masks = scipy.io.loadmat(path)["part_mask"]  # (H0, W0, T)
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"JHMDB-Sentences: {path} is not a MATLAB file with a 'part_mask' "
                             f"array: {type(err).__name__}: {err}") from None
        if masks.ndim != 3 or sample["frame"] >= masks.shape[2]:
            raise ValueError(f"JHMDB-Sentences: {path} has part_mask of shape {masks.shape}; "
                             f"expected (H, W, T) with T >= {sample['frame'] + 1}")
        return masks[:, :, sample["frame"]] != 0  # (H0, W0)


# ---------------------------------------------------------------- video instance segmentation

def _listed_files(image_root: Path, file_names: list, dataset: str, where: str) -> None:
    """Every file a video's file_names lists is on disk (one listing per folder)."""
    folders = {}
    for name in file_names:
        folders.setdefault(Path(name).parent, set()).add(Path(name).name)
    for folder, names in folders.items():
        folder_path = _require_dir(image_root / folder, dataset, f"{where}'s frame")
        present = {p.name for p in folder_path.iterdir()}
        missing = sorted(names - present)
        if missing:
            raise FileNotFoundError(f"{dataset}: {len(missing)} of the {len(file_names)} frames "
                                    f"that {where} lists are not in {image_root / folder}, e.g. "
                                    f"{missing[0]} (see data/README.md)")


class YouTubeVIS(torch.utils.data.Dataset):
    """YouTube-VIS 2019 / 2021 and OVIS (Yang et al., ICCV'19; Qi et al., IJCV'22) in their json
    format, the one VITA trains on: {"videos": [{id, file_names, height, width, length}],
    "annotations": [{id, video_id, category_id, segmentations, iscrowd}], "categories": [{id,
    name}]}, frames at <image_root>/<file_name>; see data/README.md. One sample per video. A
    segmentation is a COCO RLE (string or list counts) or a polygon list per frame, null where
    the object is absent. data/toy.py `write_toy_vis` writes the toy videos in this format.

    Training items follow VITA's YTVISDatasetMapper and prepare_targets: a clip of `num_frames`
    frames drawn by `sample_clip`, one mask track per non-crowd instance, "labels" the index of
    its category in sorted category-id order (VITA's contiguous ids), "ids" the annotation ids;
    instances without a pixel in the resized clip are dropped, so N may be 0. Videos without a
    non-crowd annotation are skipped in training (one warning; detectron2's filter_empty).
    Evaluation items are whole videos without masks; `instance_masks(index)` gives the masks.
    Checked at init: the json keys, one file and one segmentation per frame, every file on disk,
    known video and category ids; segmentation contents are checked when read.
    Defaults: VITA's configs/ovis/vita_SWIN_bs8.yaml (6 frames within +-8, test short side 448,
    detectron2's max 1333). Deviations from VITA: one short side (VITA draws 288-512 per clip in
    training); the clip is DsHmp's (VITA's np.random.choice draws the window with replacement).
    """

    name = "YouTube-VIS"

    def __init__(self, json_path, image_root, *, train: bool, num_frames=6, frame_range=8,
                 short_side=448, max_size=1333, flip=True, seed=0):
        self.train, self.num_frames, self.frame_range = train, num_frames, frame_range
        self.short_side, self.max_size, self.flip, self.seed = short_side, max_size, flip, seed
        self.json_path = path = Path(json_path)
        data = _read_json(path, self.name, "the annotation file")
        self.image_root = _require_dir(Path(image_root), self.name, "image")
        key = lambda mapping, name, where: _key(mapping, name, path, self.name, where)
        categories = key(data, "categories", "the top level")
        names = {int(key(c, "id", f"categories[{k}]")): key(c, "name", f"categories[{k}]")
                 for k, c in enumerate(categories)}
        self.label_of = {cat_id: label for label, cat_id in enumerate(sorted(names))}  # -> 0..K-1
        self.classes = [names[cat_id] for cat_id in sorted(names)]  # (K,) names by label
        videos, position = [], {}
        for k, video in enumerate(key(data, "videos", "the top level")):
            where = f"videos[{k}]"
            files = key(video, "file_names", where)
            length = video.get("length", len(files) if isinstance(files, list) else None)
            if not isinstance(files, list) or not files or length != len(files):
                raise ValueError(f"{self.name}: {path} {where} should list one file name per frame "
                                 f"(length {length}), got {str(files)[:80]}")
            _listed_files(self.image_root, files, self.name, f"{path} {where}")
            size = (int(key(video, "height", where)), int(key(video, "width", where)))
            position[key(video, "id", where)] = len(videos)
            videos.append({"id": int(video["id"]), "name": Path(files[0]).parent.as_posix(),
                           "file_names": list(files), "size": size})
        annotations = data.get("annotations") or []  # null in the valid and test files
        if train and not annotations:
            raise ValueError(f"{self.name}: training needs annotations, and {path} has none (the "
                             f"valid and test files have none; see data/README.md)")
        per_video = [[] for _ in videos]  # per annotation: {id, label, crowd, present (L,), span}
        blobs, end = [], 0
        for k, ann in enumerate(annotations):
            where = f"annotations[{k}]"
            video_id, cat_id = key(ann, "video_id", where), key(ann, "category_id", where)
            segmentations = key(ann, "segmentations", where)
            if video_id not in position:
                raise KeyError(f"{self.name}: {path} {where} has video_id {video_id!r}, which no "
                               f"entry of videos has (see data/README.md)")
            if int(cat_id) not in self.label_of:
                raise KeyError(f"{self.name}: {path} {where} has category_id {cat_id!r}, which no "
                               f"entry of categories has (see data/README.md)")
            length = len(videos[position[video_id]]["file_names"])
            if not isinstance(segmentations, list) or len(segmentations) != length:
                got = len(segmentations) if isinstance(segmentations, list) else segmentations
                raise ValueError(f"{self.name}: {path} {where} should list one segmentation or "
                                 f"null per frame of video_id {video_id} ({length}), got {got}")
            # one numpy byte buffer, which DataLoader workers share (see MeViS.__init__)
            blobs.append(json.dumps(segmentations).encode())
            end += len(blobs[-1])
            per_video[position[video_id]].append({
                "id": int(key(ann, "id", where)), "label": self.label_of[int(cat_id)],
                "crowd": bool(ann.get("iscrowd", 0)), "span": (end - len(blobs[-1]), end),
                "present": np.array([bool(s) for s in segmentations], dtype=bool)})  # (L,)
        self._segmentation_buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        keep = list(range(len(videos)))
        if train:  # detectron2's filter_empty: a video needs a non-crowd instance in some frame
            keep = [v for v in keep
                    if any(not a["crowd"] and a["present"].any() for a in per_video[v])]
            if len(keep) < len(videos):
                warnings.warn(f"{self.name}: skipped {len(videos) - len(keep)} training videos "
                              f"without a non-crowd annotation in {path}", stacklevel=2)
        self.videos = [videos[v] for v in keep]  # {id, name, file_names, size (H0, W0)}
        self._annotations = [per_video[v] for v in keep]

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        return self._train_item(index) if self.train else self._eval_item(index)

    def _load_frames(self, video, frame_idx) -> torch.Tensor:
        frames = []
        for t in frame_idx:
            path = self.image_root / video["file_names"][t]
            frames.append(_read_rgb(path))  # (H0, W0, 3)
            if frames[-1].shape[:2] != video["size"]:
                raise ValueError(f"{self.name}: {path} is {list(frames[-1].shape[:2])}, but "
                                 f"{self.json_path} says video {video['id']} is "
                                 f"{list(video['size'])}")
        return rearrange(torch.from_numpy(np.stack(frames)), "t h w c -> t c h w")  # (T, 3, H0, W0)

    def _decode(self, segmentation, video, ann, t) -> np.ndarray:
        where = f"{self.json_path}, annotation {ann['id']}, frame {t} of video {video['id']}"
        return decode_segmentation(segmentation, *video["size"], dataset=self.name, where=where)

    def instance_masks(self, index, frame_idx=None) -> dict:
        """Ground truth of video `index` over `frame_idx` (default: every frame) at the original
        size: {"masks": (N, T, H0, W0) bool, "labels": (N,) long, "ids": (N,) long} of the
        non-crowd instances whose segmentation is not null in at least one of those frames."""
        video = self.videos[index]
        frame_idx = list(range(len(video["file_names"])) if frame_idx is None else frame_idx)
        anns = [a for a in self._annotations[index]
                if not a["crowd"] and a["present"][frame_idx].any()]
        masks = np.zeros((len(anns), len(frame_idx), *video["size"]), dtype=bool)  # (N, T, H0, W0)
        for n, ann in enumerate(anns):
            start, end = ann["span"]
            segmentations = json.loads(self._segmentation_buffer[start:end].tobytes())
            for i, t in enumerate(frame_idx):
                if segmentations[t]:  # null (or empty, which VITA skips too): absent
                    masks[n, i] = self._decode(segmentations[t], video, ann, t)
        return {"masks": torch.from_numpy(masks),
                "labels": torch.tensor([a["label"] for a in anns], dtype=torch.long),  # (N,)
                "ids": torch.tensor([a["id"] for a in anns], dtype=torch.long)}  # (N,)

    def _train_item(self, index):
        video, generator = self.videos[index], item_generator(self.seed)
        frame_idx = sample_clip(len(video["file_names"]), num_frames=self.num_frames,
                                frame_range=self.frame_range, generator=generator)
        frames = self._load_frames(video, frame_idx)  # (T, 3, H0, W0)
        target = self.instance_masks(index, frame_idx)
        frames, masks = resize_clip(frames, target["masks"], short_side=self.short_side,
                                    max_size=self.max_size)  # (T, 3, H, W), (N, T, H, W)
        keep = masks.flatten(1).any(1)  # (N,) VITA drops instances without a pixel in the clip
        if self.flip and _coin(generator):  # VITA's flip_by_clip
            frames, masks = frames.flip(-1), masks.flip(-1)
        return {
            "frames": normalize(frames),  # (T, 3, H, W)
            "masks": masks[keep],  # (N, T, H, W)
            "labels": target["labels"][keep],  # (N,)
            "ids": target["ids"][keep],  # (N,)
            "video": video["name"],
            "video_id": video["id"],
            "frame_idx": torch.tensor(frame_idx, dtype=torch.long),  # (T,)
            "index": index,
            "orig_size": video["size"],
        }

    def _eval_item(self, index):
        video, frames = self.videos[index], []
        for t in range(len(video["file_names"])):  # one full-resolution frame in memory at a time
            frame = self._load_frames(video, [t])  # (1, 3, H0, W0)
            frames.append(resize_clip(frame, short_side=self.short_side, max_size=self.max_size)[0])
        return {
            "frames": normalize(torch.cat(frames)),  # (T, 3, H, W)
            "orig_size": video["size"],
            "file_names": list(video["file_names"]),
            "video": video["name"],
            "video_id": video["id"],
            "index": index,
        }


# ---------------------------------------------------------------- referring image datasets

_SPLIT_BY = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}


def _in_split(ref_split: str, split: str) -> bool:
    """The refer API's split rule (lichengunc/refer refer.py getRefIds): testA also takes testAB
    refs."""
    if split in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


class RefCOCO(torch.utils.data.Dataset):
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer API layout (lichengunc/refer):
    <root>/<dataset>/refs(<split_by>).p (a pickle, as the refer API loads it: only load files you
    trust) and <root>/<dataset>/instances.json, images at <image_root>/<file_name> (COCO train2014).
    One sample per sentence of the refs in `split`.

    Training items may be flipped horizontally ("left"/"right" swapped in the expression; "flipped"
    says so). `sentences` {ref_id: [sentence, ...]}, `image_refs` {image_id: [ref_id, ...]} and
    `ref_ann` {ref_id: ann_id} are there for methods that draw other sentences of the same ref or
    image (VATEX's consistency pairs). Defaults short_side 480 / max_size 1333 are VATEX's
    (detectron2's) test sizes.
    """

    name = "RefCOCO"
    ref_keys = ("ref_id", "ann_id", "image_id", "split", "sentences", "category_id")  # required
    refs_what = "the refs pickle"

    def __init__(self, root, image_root, *, dataset="refcoco", split_by="unc", split="train",
                 train: bool,
                 short_side=480, max_size=1333, flip=True, seed=0):
        if split_by not in _SPLIT_BY.get(dataset, ()):
            pairs = ", ".join(f"{d} ({'/'.join(s)})" for d, s in _SPLIT_BY.items())
            raise ValueError(f"RefCOCO: no split scheme {split_by!r} for dataset {dataset!r}; "
                             f"valid pairs: {pairs}")
        self.train, self.short_side, self.max_size, self.flip, self.seed = train, short_side, \
            max_size, flip, seed
        data_dir = _require_dir(Path(root), self.name, "dataset root") / dataset
        self._read_refs(data_dir, image_root, split_by, split, "image (COCO train2014)")

    def _read_refs(self, data_dir, image_root, split_by, split, image_what):
        """The refs of `split` in <data_dir>/refs(<split_by>).p, the COCO <data_dir>/instances.json
        and the images -> sentences, ref_ann, image_refs and one sample per sentence."""
        name = self.name
        self.image_root = _require_dir(Path(image_root), name, image_what)
        refs_path = data_dir / f"refs({split_by}).p"
        refs = _read_pickle(refs_path, name, self.refs_what)
        self.instances_path = data_dir / "instances.json"
        instances = _read_json(self.instances_path, name, "the COCO instances file")
        images = {img["id"]: img for img in _key(instances, "images", self.instances_path, name,
                                                 "the top level")}
        self.annotations = {a["id"]: a for a in _key(instances, "annotations",
                                                     self.instances_path, name, "the top level")}
        selected = [r for r in refs if _in_split(_key(r, "split", refs_path, name, "a ref"), split)]
        if not selected:
            raise ValueError(f"{name}: no refs with split {split!r} in {refs_path}; it has splits "
                             f"{sorted({r['split'] for r in refs})}")
        self.sentences, self.ref_ann, self.image_refs, self.samples = {}, {}, {}, []
        no_sentences = [r.get("ref_id") for r in selected if not r.get("sentences")]
        if no_sentences:
            warnings.warn(f"{name}: skipped {len(no_sentences)} refs of split {split!r} with no "
                          f"sentences in {refs_path} (e.g. ref_id {no_sentences[0]})",
                          stacklevel=3)
        for ref in (r for r in selected if r.get("sentences")):
            where = f"ref {ref.get('ref_id')}"
            for k in self.ref_keys:
                _key(ref, k, refs_path, name, where)
            ann_ids, category, extra = self._target(ref, f"{refs_path} {where}")
            image = _key(images, ref["image_id"], self.instances_path, name, "images (ids)")
            self.sentences[ref["ref_id"]] = [_expression(s, refs_path, name, f"{where} sentences",
                                                         key="sent") for s in ref["sentences"]]
            self.ref_ann[ref["ref_id"]] = ann_ids[0] if ann_ids else -1 - ref["ref_id"]
            self.image_refs.setdefault(ref["image_id"], []).append(ref["ref_id"])
            for position, sent in enumerate(ref["sentences"]):
                self.samples.append({
                    "sent_id": sent["sent_id"], "ref_id": ref["ref_id"],
                    "ann_id": self.ref_ann[ref["ref_id"]], "image_id": ref["image_id"],
                    "category_id": category,
                    "expression": self.sentences[ref["ref_id"]][position], "position": position,
                    "file_name": _key(image, "file_name", self.instances_path, name,
                                      f"image {image['id']}"),
                    "size": (int(image["height"]), int(image["width"])), **extra,
                })

    def _target(self, ref, where) -> tuple:
        """A ref's target: (its annotation ids, its category, the sample's extra keys)."""
        ann = _key(self.annotations, ref["ann_id"], self.instances_path, self.name,
                   "annotations (ids)")
        return [ann["id"]], int(ref["category_id"]), {}

    def __len__(self):
        return len(self.samples)

    def _mask(self, sample) -> np.ndarray:
        segmentation = self.annotations[sample["ann_id"]].get("segmentation")
        where = f"{self.instances_path}, annotation {sample['ann_id']}"
        return decode_segmentation(segmentation, *sample["size"], dataset="RefCOCO", where=where)

    def load(self, index) -> tuple:
        """Sample `index`'s image (3, H0, W0) uint8 and referred mask (H0, W0) bool, as stored."""
        sample = self.samples[index]
        path = self.image_root / sample["file_name"]
        image = load_rgb(path)  # (3, H0, W0) uint8
        if tuple(image.shape[-2:]) != sample["size"]:
            raise ValueError(f"{self.name}: {path} is {list(image.shape[-2:])}, but "
                             f"{self.instances_path} says "
                             f"{list(sample['size'])}")
        return image, torch.from_numpy(self._mask(sample))  # (3, H0, W0), (H0, W0)

    def __getitem__(self, index):
        sample = self.samples[index]
        image, mask = self.load(index)  # (3, H0, W0), (H0, W0)
        expression = sample["expression"]
        frames, masks = resize_clip(image[None], mask[None, None], short_side=self.short_side,
                                    max_size=self.max_size)
        flipped = self.train and self.flip and _coin(item_generator(self.seed))
        if flipped:
            frames, masks, expression = hflip_clip(frames, masks, expression)
        item = {} if self.train else {"gt": mask}
        item.update({
            "image": normalize(frames[0]),  # (3, H, W)
            "mask": masks[0, 0],  # (H, W)
            "expression": expression,
            "sent_id": sample["sent_id"],
            "ref_id": sample["ref_id"],
            "ann_id": sample["ann_id"],
            "image_id": sample["image_id"],
            "category_id": sample["category_id"],
            "index": index,
            "orig_size": sample["size"],
            "flipped": flipped,
        })
        return item


# ---------------------------------------------------------------- Ref-ZOM

class RefZOM(RefCOCO):
    """Ref-ZOM (Hu et al., "Beyond One-to-One: Rethinking the Referring Image Segmentation", ICCV
    2023) in its release layout, as RIS-DMMI reads it (toggle1995/RIS-DMMI @ 753cd60: README.md,
    refer/refer.py, data/dataset_zom.py): <root>/refs(<split_by>).p, the downloaded
    `Ref-ZOM(final).p` renamed (split_by "final"; a pickle: only load files you trust), and
    <root>/instances.json; images at <image_root>/<file_name>, COCO train2014 and val2014 merged
    into one folder (trainval2014).

    Refs are refer API dicts with a "source". Source "zero": the sentence refers to nothing and its
    mask is all zero (refer.py getMask); any other: "ann_id" is one annotation id or a list, the
    target the union of their masks (getMask: every polygon of every annotation). One sample per
    sentence of the refs in `split` (train / test, the refer API's rule), as dataset_zom.py
    (all_sent_id_list) and test.py score them. Items are RefCOCO's; samples add "ann_ids" (the
    target's annotations, [] for none) and "no_target". A sample's "ann_id" is its first target
    annotation, or for no target -1 - ref_id (no annotation's: the ref's sentences share it, no
    other ref does); "category_id" is the first target annotation's category, 0 (no COCO
    category) for no target. Every listed annotation must be in instances.json (refer.py's index
    looks each one up); a no-target ref's ann_id is not read.
    """

    name = "Ref-ZOM"
    ref_keys = ("ref_id", "ann_id", "image_id", "split", "sentences", "source")
    refs_what = "the refs pickle (the release's Ref-ZOM(final).p, renamed)"

    def __init__(self, root, image_root, *, split_by="final", split="train", train: bool,
                 short_side=480, max_size=1333, flip=True, seed=0):
        self.train, self.short_side, self.max_size, self.flip, self.seed = train, short_side, \
            max_size, flip, seed
        self._read_refs(_require_dir(Path(root), self.name, "dataset root"), image_root, split_by,
                        split, "image (COCO train2014 + val2014 merged, trainval2014)")

    def _target(self, ref, where) -> tuple:
        no_target = ref["source"] == "zero"
        ann_ids = [] if no_target else _as_list(ref["ann_id"])
        if not no_target and not ann_ids:
            raise ValueError(f"{self.name}: {where} has source {ref['source']!r} but an empty "
                             f"ann_id (see data/README.md)")
        anns = [_key(self.annotations, a, self.instances_path, self.name, "annotations (ids)")
                for a in ann_ids]
        category = int(anns[0]["category_id"]) if anns else 0
        return ann_ids, category, {"ann_ids": ann_ids, "no_target": no_target}

    def _mask(self, sample) -> np.ndarray:
        mask = np.zeros(sample["size"], dtype=bool)  # (H0, W0); no target: all zero
        for ann_id in sample["ann_ids"]:  # the union of the targets' masks
            mask |= decode_segmentation(self.annotations[ann_id].get("segmentation"),
                                        *sample["size"], dataset=self.name,
                                        where=f"{self.instances_path}, annotation {ann_id}")
        return mask


# ---------------------------------------------------------------- pseudo-videos from images
# VITA's recipe for COCO (sukjunhwang/VITA @ 59c24ad, vita/data/augmentation.py
# build_pseudo_augmentation, INPUT.PSEUDO of configs/youtubevis_2019/vita_*_bs8.yaml)
PSEUDO_CROP_SHORT_SIDES = (400, 500, 600)  # ResizeShortestEdgeClip([400, 500, 600], 1333)
PSEUDO_CROP_MAX_SIZE = 1333
PSEUDO_CROP_SIZE = (384, 600)  # RandomCropClip("absolute_range", INPUT.PSEUDO.CROP.SIZE)
PSEUDO_ANGLE = 15.0  # RandomRotationClip([-15, 15], expand=False, center=[(0.4, 0.4), (0.6, 0.6)])
PSEUDO_CENTRE = (0.4, 0.6)


def rotate_clip(frames: torch.Tensor, masks: torch.Tensor, angles: torch.Tensor, centre) -> tuple:
    """Rotate frame t of (T, C, H, W) float frames and (N, T, H, W) bool masks by angles[t] degrees
    counter-clockwise about `centre` (x, y in pixels; the top-left corner of the image is (0, 0)),
    as detectron2's RotationTransform with expand=False (cv2.warpAffine: bilinear, 0 outside).
    Masks are sampled nearest, so they stay on the frames' pixels."""
    _, _, H, W = frames.shape
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5,
                            indexing="ij")  # (H, W) pixel centres
    theta = torch.deg2rad(angles.double())[:, None, None]  # (T, 1, 1)
    dx, dy = xs - centre[0], ys - centre[1]  # (H, W)
    # cv2.getRotationMatrix2D maps a source point p to c + [[cos, sin], [-sin, cos]] (p - c); an
    # output pixel reads the source point of the inverse map
    src_x = theta.cos() * dx - theta.sin() * dy + centre[0]  # (T, H, W)
    src_y = theta.sin() * dx + theta.cos() * dy + centre[1]
    grid = torch.stack([src_x * 2 / W - 1, src_y * 2 / H - 1], dim=-1).float()  # (T, H, W, 2)
    frames = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # (T, C, H, W)
    masks = F.grid_sample(rearrange(masks, "n t h w -> t n h w").float(), grid, mode="nearest",
                          padding_mode="zeros", align_corners=False)  # (T, N, H, W)
    return frames, rearrange(masks, "t n h w -> n t h w") > 0.5  # (N, T, H, W)


class PseudoVideo(torch.utils.data.Dataset):
    """Referred images as training clips ("pseudo-videos"), by VITA's recipe for COCO:
    CocoClipDatasetMapper with build_pseudo_augmentation (sukjunhwang/VITA @ 59c24ad,
    vita/data/dataset_mapper.py, vita/data/augmentation.py). The image is repeated num_frames
    times, each copy transformed by, in VITA's order:
      - with p 0.5, a moving crop (RandomApplyClip of ResizeShortestEdgeClip([400, 500, 600], 1333)
        and RandomCropClip("absolute_range", (384, 600))): one crop size per clip, its corner on a
        line between two random positions (the second right of and below the first) at sorted
        random fractions, reversed with p 0.5: a camera pan;
      - the resize to short_side / max_size and, with p 0.5, a horizontal flip (both per clip; the
        flip swaps "left"/"right" in the expression, as the other readers);
      - RandomRotationClip: num_frames angles from [-15, 15] degrees, sorted, reversed with p 0.5,
        about one centre at 0.4-0.6 of the width and height, black outside.
    The referred object's mask takes every transform (resized nearest-exact, rotated nearest). A
    clip whose mask is empty in every frame is drawn again. `readers` are RefCOCO readers (their
    samples one after the other; `load(i)` gives an image and its mask). Items are the video
    readers' training items (`_ReferringVideo`): one mask track (N = 1), video = the image file's
    stem, exp_id = the sentence id, obj_ids = [ann_id]; `samples` carry these keys too.
    Deviations from VITA: one resize (VITA draws the short side per clip, 288-512); the crop box
    is drawn at VITA's size and cut from the image at its own size (one resize, not two); frame_idx
    is 0..T-1 (VITA's nominal video_len of 16-48 frames is bookkeeping only); one referred object
    with its expression (VITA: every COCO instance).
    """

    name = "pseudo-video"
    max_tries = 100  # clip draws before giving up on an object that never stays in view

    def __init__(self, readers, *, num_frames=8, short_side=360, max_size=640, flip=True, seed=0):
        self.readers, self.num_frames, self.flip, self.seed = list(readers), num_frames, flip, seed
        self.short_side, self.max_size = short_side, max_size
        self._source = [(r, i) for r, reader in enumerate(self.readers) for i in range(len(reader))]
        self.samples = [{"video": Path(s["file_name"]).stem, "exp_id": str(s["sent_id"]),
                         "expression": s["expression"], "obj_ids": [s["ann_id"]]}
                        for reader in self.readers for s in reader.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        r, i = self._source[index]
        image, mask = self.readers[r].load(i)  # (3, H0, W0) uint8, (H0, W0) bool
        sample, generator = self.samples[index], item_generator(self.seed)
        for _ in range(self.max_tries):
            frames, masks, expression = self._clip(image, mask, sample["expression"], generator)
            if masks.any():
                break
        else:
            raise RuntimeError(f"{self.name}: no pixel of object {sample['obj_ids'][0]} in any "
                               f"frame of {self.max_tries} clips of {sample['video']!r} "
                               f"({int(mask.sum())} pixels at full size)")
        return clip_item(frames, masks, expression, sample, range(self.num_frames), index,
                         tuple(image.shape[-2:]))  # masks (1, T, H, W)

    def _clip(self, image, mask, expression, generator) -> tuple:
        """One draw of the augmentation: (T, 3, H, W) float frames, (1, T, H, W) bool masks."""
        T = self.num_frames
        if _coin(generator):  # VITA's RandomApplyClip, p 0.5
            frames, masks = self._moving_crop(image, mask, generator)  # (T, 3, h, w), (1, T, h, w)
        else:
            frames, masks = image[None], mask[None, None]  # (1, 3, H0, W0), (1, 1, H0, W0)
        frames, masks = resize_clip(frames, masks, short_side=self.short_side,
                                    max_size=self.max_size)
        frames, masks = frames.expand(T, -1, -1, -1), masks.expand(-1, T, -1, -1)  # T frames
        if self.flip and _coin(generator):
            frames, masks, expression = hflip_clip(frames, masks, expression)
        low, high = PSEUDO_CENTRE
        angles = (torch.rand(T, generator=generator) * 2 - 1) * PSEUDO_ANGLE  # (T,)
        centre = low + torch.rand(2, generator=generator) * (high - low)  # (2,) x, y fractions
        angles = angles.sort().values
        if _coin(generator):
            angles = angles.flip(0)
        H, W = frames.shape[-2:]
        frames, masks = rotate_clip(frames.float(), masks, angles,
                                    (float(centre[0]) * W, float(centre[1]) * H))
        return frames, masks, expression

    def _moving_crop(self, image, mask, generator) -> tuple:
        """VITA's RandomCropClip after ResizeShortestEdgeClip: boxes drawn in the image resized to
        a short side of 400, 500 or 600 (long side <= 1333), cut from the image at its own size.
        Returns (T, 3, h, w) uint8 frames and (1, T, h, w) bool masks."""
        T, (H0, W0) = self.num_frames, image.shape[-2:]

        def randint(low, high):  # numpy's randint(low, high): low <= x < high
            return int(torch.randint(low, high, (), generator=generator))

        short = PSEUDO_CROP_SHORT_SIDES[randint(0, len(PSEUDO_CROP_SHORT_SIDES))]
        scale = min(short / min(H0, W0), PSEUDO_CROP_MAX_SIZE / max(H0, W0))
        h, w = int(H0 * scale + 0.5), int(W0 * scale + 0.5)  # detectron2's ResizeShortestEdge
        low, high = PSEUDO_CROP_SIZE
        crop_h, crop_w = randint(min(h, low), min(h, high) + 1), randint(min(w, low),
                                                                         min(w, high) + 1)
        y0, x0 = randint(0, h - crop_h + 1), randint(0, w - crop_w + 1)
        y1, x1 = randint(y0, h - crop_h + 1), randint(x0, w - crop_w + 1)
        x = torch.rand(T, generator=generator, dtype=torch.float64).sort().values  # (T,)
        ys, xs = (y0 * x + y1 * (1 - x)).round(), (x0 * x + x1 * (1 - x)).round()  # (T,) corners
        if _coin(generator):
            ys, xs = ys.flip(0), xs.flip(0)
        box_h = min(H0, max(1, round(crop_h * H0 / h)))  # the crop at the image's own size
        box_w = min(W0, max(1, round(crop_w * W0 / w)))
        tops = [min(H0 - box_h, round(float(y) * H0 / h)) for y in ys]
        lefts = [min(W0 - box_w, round(float(v) * W0 / w)) for v in xs]
        frames = torch.stack([image[:, t:t + box_h, v:v + box_w]
                              for t, v in zip(tops, lefts)])  # (T, 3, h, w)
        masks = torch.stack([mask[t:t + box_h, v:v + box_w]
                             for t, v in zip(tops, lefts)])[None]  # (1, T, h, w)
        return frames, masks


class MixedClips(torch.utils.data.Dataset):
    """Training items of several datasets at fixed ratios, as VITA joins COCO pseudo-videos to
    YouTube-VIS or OVIS (sukjunhwang/VITA @ 59c24ad, vita/data/combined_loader.py with
    DATASETS.DATASET_RATIO: each item of a batch comes from dataset k with probability
    ratio_k / sum(ratios)). Here an epoch holds the first dataset once (in the sampler's order) and
    round(len(first) * ratio_k / ratio_0) items of each other dataset k, each drawn uniformly from
    it with the item's generator: every epoch has the ratios exactly (VITA: in expectation).
    `samples` are the datasets' samples one after the other; an item's "index" is its sample's
    position there."""

    def __init__(self, datasets, ratios, *, seed=0):
        if len(datasets) != len(ratios) or not datasets or ratios[0] <= 0 or min(ratios) < 0:
            raise ValueError(f"MixedClips: one ratio per dataset, the first > 0, none < 0; got "
                             f"{list(ratios)} for {len(datasets)} datasets")
        if not all(len(d) for d in datasets):
            raise ValueError(f"MixedClips: empty dataset among {[len(d) for d in datasets]}")
        self.datasets, self.seed = list(datasets), seed
        first = len(datasets[0])
        self.counts = [first] + [round(first * r / ratios[0]) for r in ratios[1:]]  # per epoch
        self.ends = np.cumsum(self.counts).tolist()
        self.offsets = np.cumsum([0] + [len(d) for d in datasets]).tolist()  # into samples
        self.samples = [s for d in self.datasets for s in d.samples]

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, index):
        k = next(k for k, end in enumerate(self.ends) if index < end)  # the source dataset
        if k == 0:
            return self.datasets[0][index]
        j = int(torch.randint(len(self.datasets[k]), (), generator=item_generator(self.seed)))
        return {**self.datasets[k][j], "index": self.offsets[k] + j}


# ---------------------------------------------------------------- collate

def _padded_size(sizes, multiple=32) -> tuple:
    return (math.ceil(max(h for h, _ in sizes) / multiple) * multiple,
            math.ceil(max(w for _, w in sizes) / multiple) * multiple)


def _pad_to(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., h, w) -> (..., height, width), zeros at the bottom and right."""
    out = tensor.new_zeros((*tensor.shape[:-2], height, width))  # (..., Hp, Wp)
    out[..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


def _collate(samples, *, image_key, mask_key, out_key):
    keys = set(samples[0])
    if any(set(s) != keys for s in samples):
        raise ValueError(f"collate: samples in a batch have different keys: "
                         f"{[sorted(s) for s in samples]}")
    sizes = [tuple(s[image_key].shape[-2:]) for s in samples]
    height, width = _padded_size(sizes)
    pad_mask = torch.ones(len(samples), height, width, dtype=torch.bool)  # (B, Hp, Wp)
    for i, (h, w) in enumerate(sizes):
        pad_mask[i, :h, :w] = False
    batch = {
        # (B, [T,] 3, Hp, Wp)
        out_key: torch.stack([_pad_to(s[image_key], height, width) for s in samples]),
        "pad_mask": pad_mask,
        "image_sizes": sizes,
    }
    if mask_key in keys:
        batch["targets"] = []
        for s in samples:
            masks = s[mask_key] if mask_key == "masks" else s[mask_key][None]  # (N, [T,] H, W)
            batch["targets"].append({"masks": _pad_to(masks, height, width),  # (N, [T,] Hp, Wp)
                                     "labels": torch.zeros(len(masks), dtype=torch.long)})  # (N,)
    for key in sorted(keys - {image_key, mask_key}):
        batch[key] = [s[key] for s in samples]
    return batch


def collate_video(samples: list) -> dict:
    """Video items -> {"frames": (B, T, 3, Hp, Wp), "pad_mask": (B, Hp, Wp) True at padding,
    "image_sizes": [(h, w)], "targets": [{"masks": (N, T, Hp, Wp) bool, "labels": (N,) zeros}]
    (when the items have "masks"), and every other key as a list}. Hp, Wp: the largest size rounded
    up to a multiple of 32."""
    lengths = [s["frames"].shape[0] for s in samples]
    if len(set(lengths)) > 1:
        raise ValueError(f"collate_video: all clips in a batch need the same number of frames, got "
                         f"{lengths}")
    return _collate(samples, image_key="frames", mask_key="masks", out_key="frames")


def collate_image(samples: list) -> dict:
    """Image items -> {"images": (B, 3, Hp, Wp), "pad_mask": (B, Hp, Wp) True at padding,
    "image_sizes", "targets": [{"masks": (1, Hp, Wp) bool, "labels": (1,) zeros}], and every other
    key as a list}."""
    return _collate(samples, image_key="image", mask_key="mask", out_key="images")


def collate_vis(samples: list) -> dict:
    """YouTubeVIS items -> `collate_video`'s batch, where each target also carries the item's
    "labels" (N,) category indices (in place of zeros) and "ids" (N,) annotation ids."""
    extra = ("labels", "ids")
    batch = collate_video([{k: v for k, v in s.items() if k not in extra} for s in samples])
    for target, s in zip(batch.get("targets", []), samples):
        target.update({k: s[k] for k in extra if k in s})
    return batch
