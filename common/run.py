"""The run toolkit: what every method's `main()` and `train()` need that is not the method.

  config       RunConfig (the fields every method shares); parse_config (a method's Config +
               PRESETS + argv; --help lists every field with its source comment); config_from_dict
  folders      run_dir (runs/<method>-<data>[-no-<ablation>]), data_root (and the one-line
               "no dataset at ..." exit)
  stages       pseudo_videos (RefCOCO/+/g as training clips), init_weights (--init: start from an
               earlier stage's model), toy_vocab (the toy tokenizer's words, kept across stages)
  optimiser    param_groups (backbone lr multiplier; no weight decay on norms, embeddings, position
               tables)
  training     resume, wrap_ddp, train_batches (endless, a data seed per process), check_finite
  checkpoints  load_trained: the model rebuilt from the config (and toy vocabulary) it was saved
               with
  evaluation   evaluate_video (J, F, J&F or a submission tree + zip; A2D-Sentences and
               JHMDB-Sentences: mAP, oIoU, mIoU), evaluate_image (mIoU, oIoU,
               Pr@X, Oc-IoU; Ref-ZOM: at 480 x 480, with the no-target accuracy); each takes
               the method's own inference rule as `predict(item)` and the model it runs,
               which it puts in eval mode first (as DETR's `evaluate`);
               video_query_masks: the video-query methods' rule (scores > threshold, union, or
               top-1)
  prediction   predict_files: a folder of frames or one image -> overlays and a GIF
  errors       cli_errors: a missing file or bad checkpoint ends the command with one line

A method file uses them like this (dshmp.py is the full example):

    def train(cfg, ddp, root, out):
        dataset = make_dataset(cfg, root, "train", train=True, seed=cfg.seed + ddp.rank)
        model = build_model(cfg, vocab=...).to(ddp.device)
        optimizer = torch.optim.AdamW(param_groups(model, lr=cfg.lr, ...), lr=cfg.lr)
        step, extra = resume(out / "last.pt", model=model,
                             optimizer=optimizer) if cfg.resume else (0, {})
        batches = train_batches(dataset, batch_size=cfg.batch_size, collate=..., ddp=ddp,
                                seed=cfg.seed, workers=cfg.workers, start_step=step)
        model = wrap_ddp(model, ddp)
        with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
            while step < cfg.steps:
                ...  # forward, terms, weighted sum, check_finite, backward, step, log, save

    def main(argv=None):
        cfg = parse_config(Config, PRESETS, argv, description=__doc__)
        ...  # count_params | predict_files | train + evaluate_video / evaluate_image
"""
import argparse
import contextlib
import inspect
import io
import json
import math
import shutil
import tokenize
import warnings
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.backbones import WeightsNotFoundError
from common.datasets import (IMAGENET_MEAN, IMAGENET_STD, MeViS, PseudoVideo, RefCOCO, RefZOM,
                             load_rgb, normalize, resize_clip)
from common.engine import (CheckpointError, all_gather_object, autocast, barrier, denormalize,
                           is_main, load_checkpoint, read_checkpoint, reduce_mean, save_overlays)
from common.metrics import (REFZOM_SIZE, ImageMetrics, RefZOMMetrics, VideoMetrics, a2d_best,
                            a2d_iou, a2d_map, davis_unsupervised, oc_iou, resize_nearest)
from common.text import build_vocab, normalize_expression

# Shapes: T frames, H W resized frame size, H0 W0 original size, K expressions of one object.


# ---------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """What to run and where: the fields every method's Config shares (it inherits them and adds
    the method's own; it may give `data` and `eval_split` other defaults)."""

    data: str = "toy"  # dataset: one of the method's PRESETS (toy needs no download)
    data_root: str = ""  # default: data/<dataset> as data/README.md lays it out (toy: data/toy/...)
    image_root: str = "data/coco/train2014"  # COCO images of the refer sets (data/README.md)
    out: str = ""  # run folder; default runs/<method>-<data>[-no-<ablation>...]
    train: bool = False  # train, then evaluate on eval_split
    resume: bool = False  # continue training from <out>/last.pt
    init: str = ""  # --train starts from this checkpoint's model weights (not its optimizer, step)
    eval: bool = False  # evaluate --checkpoint on eval_split
    eval_split: str = ""  # the split that --train / --eval score
    checkpoint: str = ""  # the model --eval and --predict use; default <out>/last.pt
    predict: str = ""  # a folder of frames (sorted by name) or one image to segment --text in
    text: str = ""  # the expression for --predict
    # print trainable / frozen parameters per module (paper configuration)
    count_params: bool = False
    seed: int = 0  # weights, data order and augmentations
    workers: int = 4  # DataLoader worker processes per training process
    log_every: int = 20  # steps between log lines (progress bar and <out>/log.jsonl)
    save_every: int = 1000  # steps between checkpoints (<out>/last.pt, written atomically)


def field_comments(config_cls) -> dict:
    """{field name: its comment} for a dataclass and the dataclasses it inherits from: the comment
    on the field's line, else the nearest comment-only line above it (a section heading). These
    are the sources --help shows."""
    comments = {}
    for cls in reversed(config_cls.__mro__):
        if not is_dataclass(cls):
            continue
        names, heading, line_field = {f.name for f in fields(cls)}, "", {}
        for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
            row, column = token.start
            if token.type == tokenize.NAME and column == 4 and token.string in names \
                    and row not in line_field:
                line_field[row] = token.string
                comments[token.string] = heading
            elif token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if row in line_field:
                    comments[line_field[row]] = text
                elif column == 4:
                    heading = text
    return comments


def parse_config(config_cls, presets: dict, argv=None, *, description: str = ""):
    """A method's config: the dataclass defaults (the paper configuration), then the preset of
    --data, then the command line. One flag per field (--no-<flag> for booleans)."""
    for name, preset in presets.items():
        unknown = set(preset) - {f.name for f in fields(config_cls)}
        if unknown:
            raise ValueError(f"PRESETS[{name!r}] sets {sorted(unknown)}, which are not fields of "
                             f"{config_cls.__name__}")
    comments, defaults = field_comments(config_cls), config_cls()
    epilog = "presets (--data): " + "; ".join(
        f"{name}: {', '.join(f'{k}={v}' for k, v in preset.items()) or 'the defaults above'}"
        for name, preset in presets.items())
    usage = "%(prog)s [--data DATA] (--train [--resume] | --eval | --predict PATH --text TEXT " \
            "| --count-params) ..."
    parser = argparse.ArgumentParser(description=description, epilog=epilog.replace("%", "%%"),
                                     usage=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{comments.get(f.name, '')} [default {getattr(defaults, f.name)!r}]".strip() \
            .replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=f.type, default=None, help=help_text)
    cli = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    data = cli.get("data", defaults.data)
    if data not in presets:
        parser.error(f"--data must be one of {sorted(presets)}, got {data!r}")
    cfg = replace(defaults, **{**presets[data], **cli})
    if not (cfg.train or cfg.eval or cfg.predict or cfg.count_params):
        parser.error("nothing to do: pass --train, --eval, --predict DIR_OR_IMAGE --text '...' or "
                     "--count-params")
    if cfg.train and cfg.data in EVAL_ONLY:
        parser.error(f"--data {cfg.data} is evaluation only: train with --data "
                     f"{EVAL_ONLY[cfg.data]}, then "
                     f"--data {cfg.data} --eval --checkpoint <that run>/last.pt")
    if cfg.init and not cfg.train:
        parser.error("--init starts a --train run from a checkpoint's weights; --eval and "
                     "--predict take --checkpoint")
    if cfg.predict and (cfg.train or cfg.eval):
        parser.error("--predict runs a trained model (--checkpoint); it does not go with --train "
                     "or --eval")
    return cfg


def config_from_dict(config_cls, values: dict):
    """The config a checkpoint was saved with (`asdict(cfg)`): fields added to the Config since then
    take their defaults; fields it no longer has are dropped with a warning."""
    names = {f.name for f in fields(config_cls)}
    dropped = sorted(set(values) - names)
    if dropped:
        warnings.warn(f"the checkpoint's config has fields this {config_cls.__name__} does not: "
                      f"{dropped} (ignored)")
    return replace(config_cls(), **{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------- folders
DATA_ROOTS = {  # default --data-root of each dataset: data/README.md
    "mevis": "data/mevis", "ytvos": "data/ref-youtube-vos", "davis": "data/ref-davis",
    "a2d": "data/a2d-sentences", "jhmdb": "data/jhmdb-sentences",
    "refcoco": "data/refer", "refcoco+": "data/refer", "refcocog": "data/refer",
    "refzom": "data/ref-zom",
    "toy-refcoco": "data/toy/refcoco",  # the toy image set as pseudo-videos (pseudo_videos)
}
TOY_ROOTS = {"video": "data/toy/mevis", "image": "data/toy/refcoco"}  # data/toy.py writes both
EVAL_ONLY = {"davis": "ytvos",  # Ref-DAVIS17 is scored zero-shot with a Ref-YouTube-VOS model
             "jhmdb": "a2d"}  # and JHMDB-Sentences with an A2D-Sentences one


def run_dir(cfg, method: str, ablations=()) -> Path:
    """--out, else runs/<method>-<data> plus, for each ablation field that differs from the
    default, -no-<name> (a boolean switched off), -<name> (one switched on) or -<name>-<value>."""
    if cfg.out:
        return Path(cfg.out)
    defaults, suffix = type(cfg)(), ""
    for name in ablations:
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            suffix += (f"-no-{name}" if value is False else f"-{name}" if value is True
                       else f"-{name}-{value}")
    return Path("runs") / f"{method}-{cfg.data}{suffix.replace('_', '-')}"


def data_root(cfg, kind: str, *, make_toy=None) -> Path:
    """The dataset folder of --data (`kind` "video" or "image" picks the toy set). The toy set is
    written on first use by `make_toy()` (on the main process; the others wait). Ends the command
    with one message when the folder is missing."""
    root = Path(cfg.data_root or (TOY_ROOTS[kind] if cfg.data == "toy" else DATA_ROOTS[cfg.data]))
    if cfg.data.startswith("toy") and not cfg.data_root and make_toy is not None:
        if is_main():
            make_toy()
        barrier()
    if not root.is_dir():
        raise SystemExit(f"no {cfg.data} dataset at {root.resolve()}; get it as data/README.md "
                         f"describes, "
                         f"or pass --data-root DIR")
    return root


# ---------------------------------------------------------------------------------- stages
# refer sets read as pseudo-videos -> their split scheme (ReferFormer @ 06fc218,
# tools/data/convert_refexp_to_coco.py)
PSEUDO_VIDEO_SETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "toy-refcoco": "unc"}


def pseudo_videos(cfg, names, root="", *, seed: int) -> PseudoVideo:
    """The training sentences of the refer sets `names` (refcoco, refcoco+, refcocog in the RefCOCO
    tree at `root`, default data/refer, images at cfg.image_root; toy-refcoco: the toy image set,
    default data/toy/refcoco) as one PseudoVideo set of cfg.num_frames-frame training clips at
    cfg.short_side / cfg.max_size. A missing tree raises one FileNotFoundError naming it."""
    unknown = [name for name in names if name not in PSEUDO_VIDEO_SETS]
    if unknown or not names:
        raise SystemExit(f"pseudo-videos: unknown refer set(s) {unknown}; choose from "
                         f"{', '.join(PSEUDO_VIDEO_SETS)}")
    root, readers = Path(root or DATA_ROOTS[names[0]]), []
    for name in names:
        toy = name.startswith("toy")
        try:
            readers.append(RefCOCO(root, root / "images" if toy else cfg.image_root,
                                   dataset="refcoco" if toy else name,
                                   split_by=PSEUDO_VIDEO_SETS[name], split="train", train=True))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"pseudo-videos of {name} need its RefCOCO tree and the COCO "
                                    f"images (--refer-root or --data-root, --image-root): "
                                    f"{error}") from None
    return PseudoVideo(readers, num_frames=cfg.num_frames, short_side=cfg.short_side,
                       max_size=cfg.max_size, seed=seed)


def toy_vocab(cfg, samples, root):
    """The words of a toy model's tokenizer; None off toy (a pretrained tokenizer there). With
    --init, the checkpoint's own, so the weights keep their word ids (a warning names the words of
    `samples` it lacks); else the words of `samples`, and for toy-refcoco also those of the toy
    videos' train split beside `root` (data/toy/mevis), so the video stage can start from it."""
    if not cfg.data.startswith("toy"):
        return None
    texts = [s["expression"] for s in samples]
    if cfg.init:
        vocab = read_checkpoint(cfg.init)["extra"].get("vocab")
        if not vocab:
            raise CheckpointError(f"--init {cfg.init} holds no toy vocabulary (extra['vocab']): "
                                  f"it is not a toy run's checkpoint")
        missing = sorted(set(build_vocab(texts)) - set(vocab))
        if missing:
            warnings.warn(f"{len(missing)} words of the training expressions are not in the "
                          f"vocabulary of --init {cfg.init} and read as <unk>: {missing[:5]}")
        return vocab
    if cfg.data == "toy-refcoco":
        texts += [s["expression"] for s in MeViS(Path(root).parent / "mevis", "train",
                                                 train=False).samples]
    return build_vocab(texts)


def init_weights(path, model: nn.Module) -> nn.Module:
    """--init: `model` with the model weights of the checkpoint at `path` (save_checkpoint's file;
    its optimizer, scheduler, step and RNG states are not used), for a stage that starts from an
    earlier one (DsHmp: RefCOCO pre-training, then Ref-YouTube-VOS). `model` as it is for an empty
    path. The weights must match key for key and shape for shape, else one CheckpointError names
    the differences."""
    if not path:
        return model
    state, own = read_checkpoint(path)["model"], model.state_dict()
    differences = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in (
        ("missing", [k for k in own if k not in state]),
        ("unexpected", [k for k in state if k not in own]),
        ("of another shape", [f"{k} {list(state[k].shape)} for {list(v.shape)}"
                              for k, v in own.items() if k in state and state[k].shape != v.shape]),
    ) if keys]
    if differences:
        raise CheckpointError(f"--init {path} does not fit this model: {'; '.join(differences)} "
                              f"weights; was it trained with other model settings?")
    model.load_state_dict(state)
    if is_main():
        print(f"initialised the model from {path} (its weights only)")
    return model


# ---------------------------------------------------------------------------------- optimiser
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
POSITION_TABLES = ("relative_position_bias_table", "absolute_pos_embed", "position_embeddings")


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0,
                 backbone=()) -> list:
    """AdamW parameter groups as detectron2 / Mask2Former's build_optimizer makes them (DsHmp and
    VATEX train with it): parameters whose name starts with one of the `backbone` prefixes get
    lr * backbone_lr_mult; parameters of normalisation layers, nn.Embedding weights and Swin's
    position tables get no weight decay; every other weight and bias decays. Frozen ones are left
    out."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            in_backbone = bool(backbone) and f"{module_name}.{name}".startswith(tuple(backbone))
            no_decay = isinstance(module, (*NORM_LAYERS, nn.Embedding)) or name in POSITION_TABLES
            group = groups.setdefault((in_backbone, no_decay), {
                "params": [], "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay})
            group["params"].append(p)
    return list(groups.values())


# ---------------------------------------------------------------------------------- training
def resume(path, *, model, optimizer=None, scheduler=None, config=None) -> tuple:
    """Restore model, optimizer, scheduler and RNG states from `path` (save_checkpoint's file).
    Returns (step, extra). With `config` (the current asdict(cfg)), names the settings that
    differ from the checkpoint's, so a changed flag on resume does not go unnoticed."""
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    if is_main():
        changed = {k: (state["config"].get(k), v) for k, v in (config or {}).items()
                   if k not in ("train", "resume", "eval") and state["config"].get(k) != v}
        note = "; changed since: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                               for k, (a, b) in changed.items()) if changed else ""
        print(f"resumed from {path} at step {state['step']}{note}")
    return state["step"], state["extra"]


def wrap_ddp(model: nn.Module, ddp) -> nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged over the processes), else
    `model`."""
    if not ddp.distributed:
        return model
    return DistributedDataParallel(
        model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None)


def train_batches(dataset, *, batch_size: int, collate, ddp, seed: int, workers: int,
                  start_step: int = 0):
    """Endless training batches of batch_size // world_size items per process.

    DistributedSampler shuffles each epoch with seed + epoch (every process its own share); a
    resumed run (start_step > 0) restarts the epoch it stopped in. Augmentations differ between
    processes: the loader's worker seeds come from seed + rank, and the dataset should be built with
    seed + rank too (it seeds what is drawn in the main process when workers = 0).
    """
    if batch_size % ddp.world_size:
        raise SystemExit(f"--batch-size {batch_size} is not divisible by "
                         f"{ddp.world_size} processes")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ddp.world_size,
                                                  rank=ddp.rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size // ddp.world_size,
                                         sampler=sampler,
                                         num_workers=workers, collate_fn=collate, drop_last=True,
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed + ddp.rank))
    if len(loader) == 0:
        raise SystemExit(f"{len(dataset)} training items make no batch of {batch_size} on "
                         f"{ddp.world_size} process(es)")
    epoch = start_step // len(loader)
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def check_finite(loss: torch.Tensor, terms: dict, step: int) -> None:
    """Stop on a non-finite loss, naming every term. Under DDP all processes learn of it at once, so
    none is left waiting in a collective for one that stopped."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():
        finite = reduce_mean(finite)
    if finite < 1:
        values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
        raise RuntimeError(f"non-finite loss at step {step} (on this process or another): {values}")


# ---------------------------------------------------------------------------------- checkpoints
def load_trained(path, config_cls, build_model, device) -> tuple:
    """The model of a checkpoint, built from the config it was trained with and, for the toy
    models, the word vocabulary it stores (`extra["vocab"]`); eval mode, on `device`. Returns
    (model, the checkpoint's config). `build_model(cfg, vocab=...)` is the method's own."""
    checkpoint = read_checkpoint(path)
    trained = config_from_dict(config_cls, checkpoint["config"])
    model = build_model(trained, vocab=checkpoint["extra"].get("vocab"))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), trained


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def video_query_masks(model, frames, expression, orig_size, *, threshold, chunk, top1=False,
                      probabilities=False, every=False):
    """The inference rule of the video-query methods (DsHmp Sec. 4.2, DMVS Sec. 3.3): frames
    (T, 3, H, W) normalised -> (T, H0, W0): the union of the masks of every video query whose
    target score (softmax over target / no object) exceeds `threshold` (empty if none), or with
    `top1` the best query's mask. Bool, or with `probabilities` float16 mask probabilities (for
    Ref-DAVIS17's protocol). With `every`, (masks (M, T, H0, W0), scores (M,)): each query's mask
    and target score, as ReferFormer submits each of its queries to A2D-Sentences' mAP (its oIoU
    and mIoU take the highest-scoring one, the top-1 mask; the official DsHmp and DMVS codes have
    no A2D evaluation). `model.infer(frames, expression, chunk=...)` gives the logits (M, 2)
    and masks (M, T, Hp/4, Wp/4) of the whole video, padded to multiples of 32. Upsampled 5 frames
    at a time (official DsHmp and VITA): memory does not grow beyond the output. Puts `model` in
    eval mode (dropout and drop path off, VITA's test-time windows)."""
    model.eval()
    T, (H, W) = len(frames), frames.shape[-2:]
    padded_size = (H + -H % 32, W + -W % 32)  # (Hp, Wp): infer pads every chunk of frames
    with autocast(frames.device):
        logits, masks = model.infer(frames, expression, chunk=chunk)  # (M, 2), (M, T, Hp/4, Wp/4)
    scores = logits.float().softmax(-1)[:, 0]  # (M,)
    keep = F.one_hot(scores.argmax(), len(scores)).bool() if top1 else scores > threshold  # (M,)
    keep = torch.ones_like(keep) if every else keep
    out = torch.zeros(len(scores) if every else 1, T, *orig_size, device=frames.device,
                      dtype=torch.float16 if probabilities else torch.bool)  # (M or 1, T, H0, W0)
    for t in range(0, T if keep.any() else 0, 5):
        part = F.interpolate(masks[keep, t:t + 5].float(), size=padded_size, mode="bilinear")
        part = F.interpolate(part[..., :H, :W], size=tuple(orig_size), mode="bilinear")
        part = part if every else part.amax(0, keepdim=True)  # the union: any logit > 0
        out[:, t:t + 5] = part.sigmoid() if probabilities else part > 0
    return (out, scores) if every else out[0]  # (T, H0, W0)


# Ref-YouTube-VOS's server wants Annotations/<video>/<exp_id>/
SUBMISSION_FOLDER = {"ytvos": "Annotations"}


def _overlay_scale(size) -> int:
    # enlarge small (toy) frames to a short side of ~256 px
    return max(1, math.ceil(256 / min(size)))


def _write_pngs(masks, folder: Path, frame_names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for mask, name in zip(masks.cpu().numpy(), frame_names):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.png")


def _summaries(make_metrics, records, subsets) -> dict:
    """The summary of all records, and of the records of each named subset of keys."""
    every = make_metrics()
    every.extend(records)
    result = every.summary()
    for name, keys in (subsets or {}).items():
        subset = make_metrics()
        subset.extend([r for r in records if r["key"] in keys])
        result[name] = subset.summary()
    return result


@torch.no_grad()
def evaluate_video(dataset, predict, *, model: nn.Module, out: Path, data: str, split: str,
                   checkpoint: str = "",
                   subsets=None, extra=None, show: int = 4):
    """Score a method's inference rule on every expression of a video split (shared out over the
    processes). `predict(item) -> (T, H0, W0) bool` masks at the original size; `model`, the model
    it runs, is put in eval mode first (dropout and drop path off), whatever mode it came in.

    A split with masks: J, F and J&F (MeViS averaging) into <out>/eval.json with per-expression
    records, also for each named subset of "video/exp_id" keys (`subsets`, e.g. the toy's
    motion-only expressions), and the entries of `extra` (e.g. the scores of trivial predictions).
    A split without (MeViS valid, Ref-YouTube-VOS valid): the
    submission tree <out>/submission-<split>/[Annotations/]<video>/<exp_id>/<frame>.png and its zip.
    The first `show` expressions are drawn (prediction filled red, ground truth outlined green, the
    expression written on) in <out>/vis/. Ref-DAVIS17 (data "davis") is scored by its own
    protocol, where `predict` returns mask probabilities: see `_evaluate_davis`; A2D-Sentences and
    JHMDB-Sentences ("a2d", "jhmdb") by theirs, where it returns masks and scores: see
    `_evaluate_annotated_frames`. Returns the eval dict on the main process, else None.
    """
    model.eval()
    if data == "davis":
        return _evaluate_davis(dataset, predict, out=Path(out), split=split, checkpoint=checkpoint)
    if data in ANNOTATED_FRAME_DATA:
        return _evaluate_annotated_frames(dataset, predict, out=Path(out), split=split,
                                          checkpoint=checkpoint, show=show)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    submission = Path(out) / f"submission-{split}"
    metrics, shown = VideoMetrics(), 0
    for i in tqdm(range(rank, len(dataset), world), desc=f"eval {split}", disable=not is_main()):
        item = dataset[i]
        masks = predict(item)  # (T, H0, W0)
        key = f"{item['video']}/{item['exp_id']}"
        gt = None if item["gt"] is None else item["gt"].to(masks.device)
        if gt is None:
            _write_pngs(masks, submission / SUBMISSION_FOLDER.get(data, "") / key,
                        item["frame_names"])
        else:
            metrics.add(masks, gt, key=key)
        if shown < show and is_main():
            frames = F.interpolate(item["frames"], size=tuple(item["orig_size"]),
                                   mode="bilinear")  # (T, 3, H0, W0)
            rgb = denormalize(frames, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # (T, H0, W0, 3)
            save_overlays(rgb, masks, Path(out) / "vis" / key.replace("/", "_"),
                          name="overlay", gt=gt, caption=item["expression"],
                          scale=_overlay_scale(item["orig_size"]))
            shown += 1
    records = [r for part in all_gather_object(metrics.records) for r in part]
    if not is_main():
        return None
    if not records:  # a split without masks
        archive = shutil.make_archive(str(submission), "zip", root_dir=submission)
        print(f"wrote the submission tree {submission} and {archive}")
        return None
    result = {"split": split, "checkpoint": str(checkpoint),
              **_summaries(VideoMetrics, records, subsets),
              **(extra or {}), "per_expression": records}
    return _write_eval(result, Path(out))


DAVIS_ANNOTATORS = 4  # Ref-DAVIS17 expressions per object: 2 annotators x (first frame, full video)
ANNOTATED_FRAME_DATA = ("a2d", "jhmdb")  # scored on one annotated frame per sentence


@torch.no_grad()
def _evaluate_davis(dataset, predict, *, out: Path, split: str, checkpoint: str = ""):
    """Ref-DAVIS17 by ReferFormer's protocol (inference_davis.py, eval_davis.py), which the papers'
    tables follow. The expressions of a video come four per object (expression i = 4 x object +
    annotator). For each annotator, the masks of that annotator's expressions are merged into one
    palette PNG per frame: each object's mask probability (0 where below 0.5) against a constant
    background score of 0.1, argmax. Each annotator's result set is scored by davis2017-evaluation
    in its unsupervised task on DAVIS-2017 val (`davis_unsupervised`: <root>/DAVIS/
    Annotations_unsupervised/480p, every frame, objects matched by Hungarian assignment on J&F):
    J and F are the means over the GT objects of their per-frame means, J&F = (J + F) / 2. The
    reported J, F and J&F are the means over the four annotators. The merged PNGs are written to
    <out>/davis-<split>/anno_<k>/<video>/<frame>.png, where the official eval_davis.py can read
    them.
    `predict(item) -> (T, H0, W0)` mask probabilities of the item's expression."""
    davis = Path(dataset.root) / "DAVIS"
    annotations = davis / "Annotations_unsupervised" / "480p"
    sequences_file = davis / "ImageSets" / "2017" / "val.txt"
    for path in (annotations, sequences_file):
        if not path.exists():
            raise FileNotFoundError(f"Ref-DAVIS17 evaluation needs DAVIS-2017's {path} (the "
                                    f"unzipped DAVIS-2017-Unsupervised-trainval-480p.zip; see "
                                    f"data/README.md)")
    by_video = {}
    # expressions in the order of the json, as ReferFormer
    for i, sample in enumerate(dataset.samples):
        by_video.setdefault(sample["video"], []).append(i)
    sequences = sequences_file.read_text().split()
    missing = [video for video in sequences if video not in by_video]
    if missing or any(len(by_video[v]) % DAVIS_ANNOTATORS for v in sequences):
        raise ValueError(f"Ref-DAVIS17: every DAVIS-2017 val sequence needs 4 expressions per "
                         f"object; missing "
                         f"{missing}, counts {({v: len(by_video.get(v, [])) for v in sequences})}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    records = []
    for video in tqdm(sequences[rank::world], desc=f"eval {split}", disable=not is_main()):
        pngs = sorted(annotations.glob(f"{video}/*.png"))
        with Image.open(pngs[0]) as first:
            palette = first.getpalette()
        gt = np.stack([np.asarray(Image.open(png)) for png in pngs])  # (T, H, W)
        indices = by_video[video]
        for annotator in range(DAVIS_ANNOTATORS):
            best = labels = None
            # object k of this annotator
            for k, i in enumerate(indices[annotator::DAVIS_ANNOTATORS]):
                item = dataset[i]
                scores = predict(item).float().cpu()  # (T, H0, W0) mask probabilities
                scores = scores.masked_fill(scores < 0.5, 0.0)  # official: below 0.5 is no claim
                if best is None:
                    best = torch.full_like(scores, 0.1)  # official background score
                    labels = torch.zeros(scores.shape, dtype=torch.uint8)
                better = scores > best  # argmax: the first of equal scores wins, as torch.argmax
                labels[better], best = k + 1, torch.maximum(best, scores)
            if labels.shape != gt.shape:
                raise ValueError(f"Ref-DAVIS17: {video} has {len(gt)} ground-truth frames of "
                                 f"{gt.shape[1:]} in "
                                 f"{annotations}, the predictions {tuple(labels.shape)}")
            folder = out / f"davis-{split}" / f"anno_{annotator}" / video
            folder.mkdir(parents=True, exist_ok=True)
            for png, frame in zip(pngs, labels.numpy()):
                image = Image.fromarray(frame, mode="P")
                image.putpalette(palette)
                image.save(folder / png.name)
            j, f = davis_unsupervised(gt, labels.numpy())  # (G, T) each
            records += [{"key": f"{video}/{g + 1}", "annotator": annotator, "J": float(j[g].mean()),
                         "F": float(f[g].mean())} for g in range(len(j))]
    records = [r for part in all_gather_object(records) for r in part]
    if not is_main():
        return None
    per_annotator = []
    for annotator in range(DAVIS_ANNOTATORS):
        mine = [r for r in records if r["annotator"] == annotator]
        j, f = float(np.mean([r["J"] for r in mine])), float(np.mean([r["F"] for r in mine]))
        per_annotator.append({"J": j, "F": f, "J&F": (j + f) / 2, "n": len(mine)})
    result = {"split": split, "checkpoint": str(checkpoint),
              "protocol": "ReferFormer (Ref-DAVIS17)",
              **{k: float(np.mean([a[k] for a in per_annotator])) for k in ("J", "F", "J&F")},
              "per_annotator": per_annotator, "per_object": records}
    return _write_eval(result, out)


@torch.no_grad()
def _evaluate_annotated_frames(dataset, predict, *, out: Path, split: str, checkpoint: str = "",
                               show: int = 4):
    """A2D-Sentences and JHMDB-Sentences by ReferFormer's protocol (wjn922/ReferFormer @ 06fc218,
    engine.py `evaluate_a2d`; MTTR's trainer.py is the same): each sample is one sentence and one
    annotated frame, its item a window of frames ("frames"), "frame" the annotated one's position
    in it, "gt" (H0, W0) its target and "image_id" the COCO image id of MTTR's ground truth.
    `predict(item) -> (masks (T, H0, W0) bool, score ())`, or (masks (K, T, H0, W0), scores (K,))
    for K predictions: their masks at "frame", with their scores, are the sample's predictions
    (ReferFormer submits every query's). Scored by common.metrics: a2d_iou (oIoU, mIoU, P@X by
    each sample's highest-scoring prediction) and a2d_map (COCOeval segm stats[0:6]: mAP, AP@0.5,
    AP@0.75, AP small / medium / large) into <out>/eval.json with the IoU per sample; the first
    `show` samples' annotated frames are drawn in <out>/vis/."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    records, shown = [], 0
    for i in tqdm(range(rank, len(dataset), world), desc=f"eval {split}", disable=not is_main()):
        item = dataset[i]
        masks, scores = predict(item)
        masks = masks if masks.ndim == 4 else masks[None]  # (K, T, H0, W0)
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)  # (K,)
        preds = masks[:, item["frame"]].cpu().numpy()  # (K, H0, W0)
        gt = item["gt"].numpy()  # (H0, W0)
        # bits, not bools: every mask of the split waits in memory for the mAP
        records.append({"index": i, "image_id": item["image_id"], "size": gt.shape,
                        "gt": np.packbits(gt), "preds": np.packbits(preds),
                        "scores": scores.tolist()})
        if shown < show and is_main():
            frame = item["frames"][item["frame"]][None]  # (1, 3, H, W)
            frame = F.interpolate(frame, size=tuple(item["orig_size"]), mode="bilinear")
            rgb = denormalize(frame, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # (1, H0, W0, 3)
            best = preds[a2d_best(records[-1]["scores"])]  # (H0, W0), as the IoUs score it
            save_overlays(rgb, best[None], Path(out) / "vis", name=item["image_id"], gt=gt[None],
                          caption=item["expression"], scale=_overlay_scale(item["orig_size"]))
            shown += 1
    records = sorted((r for part in all_gather_object(records) for r in part),
                     key=lambda r: r["index"])
    if not is_main():
        return None

    def unpack(bits, size, k=None):  # -> (H0, W0) or (K, H0, W0) bool
        shape = tuple(size) if k is None else (k, *size)
        return np.unpackbits(bits, count=math.prod(shape)).reshape(shape).astype(bool)

    gts = [unpack(r["gt"], r["size"]) for r in records]
    preds = [unpack(r["preds"], r["size"], len(r["scores"])) for r in records]
    scores = [np.array(r["scores"]) for r in records]
    iou = a2d_iou(gts, preds, scores)
    result = {"split": split, "checkpoint": str(checkpoint),
              "protocol": "ReferFormer (A2D-Sentences / JHMDB-Sentences)",
              **a2d_map(gts, preds, scores, image_ids=[r["image_id"] for r in records]),
              **{k: v for k, v in iou.items() if k != "IoU"},
              "per_expression": [{"key": r["image_id"], "IoU": v}
                                 for r, v in zip(records, iou["IoU"])]}
    return _write_eval(result, out)


@torch.no_grad()
def evaluate_image(dataset, predict, *, model: nn.Module, out: Path, split: str,
                   checkpoint: str = "",
                   strict_pr: bool = False, subsets=None, show: int = 8):
    """Score a method's inference rule on a RefCOCO-layout split: mIoU, oIoU, Pr@0.5-0.9 (LAVT's
    IoU >= X, or VATEX's IoU > X with strict_pr) and Oc-IoU (VATEX Eqs. 9-10) into <out>/eval.json,
    also for each named subset of sent_id keys (`subsets`). `predict(item) -> (H0, W0) bool`;
    `model`, the model it runs, is put in eval mode first. The expressions of one object (ann_id)
    are scored together, on one process, for Oc-IoU. Ref-ZOM (a RefZOM dataset) is scored by its
    own protocol: see `_evaluate_refzom`."""
    model.eval()
    if isinstance(dataset, RefZOM):
        return _evaluate_refzom(dataset, predict, out=Path(out), split=split,
                                checkpoint=checkpoint, subsets=subsets, show=show)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    by_object = {}
    for i, sample in enumerate(dataset.samples):
        by_object.setdefault(sample["ann_id"], []).append(i)
    metrics, objects, shown = ImageMetrics(strict_pr=strict_pr), [], 0
    for ann_id in tqdm(list(by_object)[rank::world], desc=f"eval {split}", disable=not is_main()):
        preds = []
        for i in by_object[ann_id]:
            item = dataset[i]
            mask = predict(item)  # (H0, W0)
            gt = item["gt"].to(mask.device)
            metrics.add(mask, gt, key=str(item["sent_id"]))
            preds.append(mask)
            if shown < show and is_main():
                frame = F.interpolate(item["image"][None], size=tuple(item["orig_size"]),
                                      mode="bilinear")  # (1, 3, H0, W0)
                rgb = denormalize(frame, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # (1, H0, W0, 3)
                save_overlays(rgb, mask[None], Path(out) / "vis",
                              name=f"sent{item['sent_id']}", gt=gt[None],
                              caption=item["expression"], scale=_overlay_scale(item["orig_size"]))
                shown += 1
        # (K, H0, W0)
        objects.append({"key": str(ann_id), "Oc-IoU": oc_iou([(gt, torch.stack(preds))])})
    gathered = all_gather_object((metrics.records, objects))
    if not is_main():
        return None
    records = [r for part, _ in gathered for r in part]
    per_object = [o for _, part in gathered for o in part]
    result = {"split": split, "checkpoint": str(checkpoint),
              **_summaries(lambda: ImageMetrics(strict_pr=strict_pr), records, subsets),
              "Oc-IoU": float(np.mean([o["Oc-IoU"] for o in per_object])) if per_object
                        else math.nan,
              "per_expression": records, "per_object": per_object}
    return _write_eval(result, Path(out))


@torch.no_grad()
def _evaluate_refzom(dataset, predict, *, out: Path, split: str, checkpoint: str = "",
                     subsets=None, show: int = 8):
    """Ref-ZOM by RIS-DMMI's test.py (toggle1995/RIS-DMMI @ 753cd60, `evaluate`): every sentence
    on its own, scored at 480 x 480 by common.metrics.RefZOMMetrics (oIoU, mIoU, Pr@X over the
    sentences with a target; acc_zero, the share of no-target sentences predicted empty), also
    for each named subset of sent_id keys. RIS-DMMI predicts at 480 x 480 (its logits upsampled
    bilinearly to its 480 x 480 input, then the argmax), so `predict` gets each item with
    "orig_size" set to 480 x 480 and returns its (480, 480) mask there; the target ("gt", at the
    original size) is resized by the metric with PIL's nearest neighbour, as RIS-DMMI's
    transforms.Resize. The overlays in <out>/vis/ show that 480 x 480 view."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    metrics, shown = RefZOMMetrics(), 0
    for i in tqdm(range(rank, len(dataset), world), desc=f"eval {split}", disable=not is_main()):
        item = dataset[i]
        mask = predict({**item, "orig_size": REFZOM_SIZE})  # (480, 480)
        metrics.add(mask, item["gt"], no_target=dataset.samples[i]["no_target"],
                    key=str(item["sent_id"]))
        if shown < show and is_main():
            frame = F.interpolate(item["image"][None], size=REFZOM_SIZE,
                                  mode="bilinear")  # (1, 3, 480, 480)
            gt = torch.from_numpy(resize_nearest(item["gt"].numpy(), REFZOM_SIZE))  # (480, 480)
            save_overlays(denormalize(frame, mean=IMAGENET_MEAN, std=IMAGENET_STD), mask[None],
                          Path(out) / "vis", name=f"sent{item['sent_id']}", gt=gt[None],
                          caption=item["expression"], scale=1)
            shown += 1
    records = [r for part in all_gather_object(metrics.records) for r in part]
    if not is_main():
        return None
    result = {"split": split, "checkpoint": str(checkpoint),
              "protocol": "RIS-DMMI (Ref-ZOM), scored at 480 x 480",
              **_summaries(RefZOMMetrics, records, subsets), "per_expression": records}
    return _write_eval(result, Path(out))


def _write_eval(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items()
               if k not in ("per_expression", "per_object", "per_annotator")}
    print(f"{json.dumps(summary)} -> {out / 'eval.json'}")
    return result


# ---------------------------------------------------------------------------------- prediction
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@torch.no_grad()
def predict_files(source, text: str, predict, *, model: nn.Module, out: Path, short_side: int,
                  max_size: int,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    """--predict: segment `text` in a folder of frames (sorted by name) or one image. Frames are
    resized as in evaluation and normalised; `predict(frames (T, 3, H, W), expression, (H0, W0))
    -> (T, H0, W0) bool` is the method's inference rule and `model` the model it runs (put in eval
    mode first). Writes overlays (and a GIF for several frames) to `out`; returns their paths."""
    model.eval()
    source = Path(source)
    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if source.is_dir() else [source]
    if not paths or not paths[0].is_file() or paths[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise SystemExit(f"--predict needs a folder of .jpg/.png frames or one such image, got "
                         f"{source}")
    expression = normalize_expression(text)
    if not expression:
        raise SystemExit('--predict needs an expression: --text "the dog running to the left"')
    raw = torch.stack([load_rgb(p) for p in paths])  # (T, 3, H0, W0) uint8
    frames = normalize(resize_clip(raw, short_side=short_side, max_size=max_size)[0],
                       mean=mean, std=std)  # (T, 3, H, W)
    masks = predict(frames, expression, tuple(raw.shape[-2:]))  # (T, H0, W0)
    files = save_overlays(rearrange(raw, "t c h w -> t h w c").numpy(), masks, out,
                          caption=expression,
                          scale=_overlay_scale(raw.shape[-2:]))
    print(f"{int(masks.flatten(1).any(1).sum())} of {len(paths)} frames have a mask; wrote {out}")
    return files


# ---------------------------------------------------------------------------------- errors
@contextlib.contextmanager
def cli_errors(method: str):
    """End the command with the one-line message of a user error (a missing file or folder, a bad
    checkpoint, weights that cannot be loaded) and exit status 1, instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, CheckpointError, WeightsNotFoundError) as error:
        raise SystemExit(f"{method}: {error}") from None
