"""Toy datasets: "moving shapes" videos in the MeViS layout and "shapes" images in the RefCOCO \
layout.

Both sets are drawn from a seed, need no download, and let every method run on a laptop. They
also measure motion understanding on its own: in every video some objects look identical (same
shape, colour and size) and differ only in how they move, so an expression that names one of
them can only be resolved by its motion; images show the still-image motion cue of a fading
streak behind a moving shape ("the ball flying to the left" has its streak on its right side).

Layout written under `out` (the MeViS / RefCOCO readers in common/datasets.py read it unchanged):
  mevis/{train,valid_u}/JPEGImages/<video>/<frame>.jpg  64x96 RGB frames named 00000, 00001, ...
  mevis/{train,valid_u}/meta_expressions.json          {"videos": {vid: {"frames", "expressions"}}}
  mevis/{train,valid_u}/mask_dict.json                 {anno_id: [COCO RLE or null, one per frame]}
  mevis/{train,valid_u}/motion_only.json               toy only: expressions only motion resolves
  mevis/{train,valid_u}/toy_objects.json               toy only: appearance and motion of each
                                                       object
  mevis/{train,valid_u}/instances_vis.json             YouTube-VIS format, for VITA: added by
                                                       `write_toy_vis` (not by make_toy)
  refcoco/refcoco/refs(unc).p, instances.json          refer-API pickle and COCO-style instances
  refcoco/refcoco/motion_sent_ids.json                 toy only: sentences only the motion cue
                                                       resolves
  refcoco/refcoco/toy_objects.json                     toy only: appearance and motion of each
                                                       annotation
  refcoco/images/COCO_train2014_<12-digit id>.jpg      96x96 RGB images
  DONE                                                 written last; `toy_ready(out)` looks for it

An expression is "motion-only" when some object it does not refer to looks exactly like one it
refers to (same shape, colour and size): no wording about appearance can then separate them.

Run:  python data/toy.py --out data/toy
"""
import argparse
import json
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

if __name__ == "__main__" and not __package__:
    # `python data/toy.py` puts data/, not the repo root, on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.coco_mask import polygons_to_mask, rle_decode, rle_encode
from common.metrics import VideoMetrics

VIDEO_H, VIDEO_W = 64, 96   # multiples of 32, as the backbones' strides need
IMAGE_SIZE = 96
JPEG_QUALITY = 95
FRAMES_RANGE = (12, 24)     # frames per video, inclusive
OBJECTS_RANGE = (2, 4)      # objects per video / image, inclusive
EXPRESSIONS_RANGE = (4, 8)  # expressions per video, inclusive
MOTION_ONLY_SHARE = 0.35    # target share of motion-only expressions per video, when the video has
                            # enough

COLOURS = {"red": (220, 45, 45), "green": (50, 190, 70), "blue": (60, 100, 240),
           "yellow": (240, 215, 50), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "big")
VIDEO_RADIUS = {"small": 6.5, "big": 10.0}  # objects 13 px and 20 px across
IMAGE_RADIUS = {"small": 6.0, "big": 11.0}
CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 3, "diamond": 4}

NOUNS = {"circle": ("circle", "ball"), "square": ("square", "box"), "triangle": ("triangle",),
         "diamond": ("diamond",)}
GENERIC_NOUNS = ("shape", "object")
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
APPEARANCE_ATTRS = ("size", "colour", "shape")
ATTR_SUBSETS = [tuple(a for k, a in enumerate(APPEARANCE_ATTRS) if m >> k & 1) for m in range(8)]

# ---------------------------------------------------------------- motion vocabulary
# Video motion kinds and the predicates each makes true (True), false (False) or debatable (None).
# An expression may use a predicate only if it is True for every target and False for every
# other object its appearance words also match; None blocks it (a jumping ball is moving up half
# of the time, so "moving up" must not be used to tell it from a ball that only rises).
VIDEO_KINDS = ("still", "left", "right", "up", "down", "jump", "enter_left", "enter_right",
               "leave_left", "leave_right", "turn_lr", "turn_rl")
VIDEO_KIND_WEIGHTS = (1.2, 1.0, 1.0, 0.7, 0.7, 1.0, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3)
PREDICATES = ("left", "right", "up", "down", "still", "moving", "jump", "fast", "slow", "enter",
              "enter_left", "enter_right", "leave", "leave_left", "leave_right", "turn",
              "turn_lr", "turn_rl")
OPPOSITE = {"left": "right", "right": "left"}
# Played backwards, an object of motion kind k shows kind REVERSED_KIND[k] (its speed unchanged): a
# bounce or a turn there and back stays what it is, "left" becomes "right", "enter" becomes "leave".
REVERSED_KIND = {"still": "still", "left": "right", "right": "left", "up": "down", "down": "up",
                 "jump": "jump", "enter_left": "leave_left", "leave_left": "enter_left",
                 "enter_right": "leave_right", "leave_right": "enter_right", "turn_lr": "turn_lr",
                 "turn_rl": "turn_rl"}

# predicate tuple -> (participle phrases, relative-clause verb phrases, adjectives before the noun)
VIDEO_PHRASES = {
    ("left",): (["moving left", "moving to the left", "going left", "heading left"],
                ["moves left", "moves to the left", "goes left", "heads left"], []),
    ("right",): (["moving right", "moving to the right", "going right", "heading right"],
                 ["moves right", "moves to the right", "goes right", "heads right"], []),
    ("up",): (["moving up", "going up", "rising", "moving upward"],
              ["moves up", "goes up", "rises"], ["rising"]),
    ("down",): (["moving down", "going down", "sinking", "moving downward"],
                ["moves down", "goes down", "sinks"], ["sinking"]),
    ("still",): (["standing still", "staying still", "not moving", "staying in place"],
                 ["stays still", "does not move", "stands still", "stays in place"],
                 ["motionless"]),
    ("moving",): (["in motion"], ["moves", "is moving"], ["moving"]),
    ("jump",): (["jumping", "bouncing", "bouncing up and down", "hopping"],
                ["jumps", "bounces", "hops", "jumps up and down"], ["jumping", "bouncing"]),
    ("fast",): (["moving fast", "moving quickly", "going fast"],
                ["moves fast", "moves quickly"], ["fast"]),
    ("slow",): (["moving slowly", "going slowly"], ["moves slowly", "goes slowly"], ["slow"]),
    ("fast", "left"): (["moving fast to the left", "going left quickly"],
                       ["moves fast to the left"], []),
    ("fast", "right"): (["moving fast to the right", "going right quickly"],
                        ["moves fast to the right"], []),
    ("slow", "left"): (["moving slowly to the left", "going left slowly"],
                       ["moves slowly to the left"], []),
    ("slow", "right"): (["moving slowly to the right", "going right slowly"],
                        ["moves slowly to the right"], []),
    ("enter",): (["entering the scene", "coming into view", "entering"],
                 ["enters the scene", "comes into view", "appears"], []),
    ("enter_left",): (["entering from the left", "coming in from the left"],
                      ["enters from the left", "comes in from the left"], []),
    ("enter_right",): (["entering from the right", "coming in from the right"],
                       ["enters from the right", "comes in from the right"], []),
    ("leave",): (["leaving the scene", "going out of view", "leaving"],
                 ["leaves the scene", "goes out of view", "disappears"], []),
    ("leave_left",): (["leaving to the left", "going out on the left"],
                      ["leaves to the left", "goes out on the left"], []),
    ("leave_right",): (["leaving to the right", "going out on the right"],
                       ["leaves to the right", "goes out on the right"], []),
    ("turn",): (["turning back", "turning around", "changing direction"],
                ["turns back", "turns around", "changes direction"], []),
    ("turn_lr",): (["moving left and then right", "going left and then back right"],
                   ["moves left and then right"], []),
    ("turn_rl",): (["moving right and then left", "going right and then back left"],
                   ["moves right and then left"], []),
}

IMAGE_MOTIONS = ("still", "left", "right", "up", "down")
IMAGE_PHRASES = {
    ("left",): (["moving left", "flying to the left", "going left"], []),
    ("right",): (["moving right", "flying to the right", "going right"], []),
    ("up",): (["moving up", "flying up", "rising"], ["rising"]),
    ("down",): (["moving down", "falling", "dropping"], ["falling"]),
    ("still",): (["standing still", "not moving", "at rest"], ["motionless"]),
    ("moving",): (["in motion", "moving"], ["moving"]),
}
POSITION_PHRASES = {  # (after the noun, before the noun)
    "pos_left": (["on the left"], ["left"]), "pos_right": (["on the right"], ["right"]),
    "pos_top": (["at the top"], ["top", "upper"]),
    "pos_bottom": (["at the bottom"], ["bottom", "lower"]),
    "pos_middle": (["in the middle"], ["middle"]),
}


def video_motion_facts(kind: str, speed: str = "") -> dict:
    """Truth of every predicate in PREDICATES for a video object of motion `kind` (and speed class
    "fast" / "slow" for "left" / "right"): True, False, or None where the wording would be
    debatable."""
    if kind not in VIDEO_KINDS:
        raise ValueError(f"unknown video motion kind {kind!r}, expected one of {VIDEO_KINDS}")
    facts = dict.fromkeys(PREDICATES, False)
    facts["moving"] = kind != "still"
    if kind == "still":
        facts.update(still=True, slow=None)
    elif kind in ("left", "right"):
        facts.update({kind: True, "fast": speed == "fast", "slow": speed == "slow"})
    elif kind in ("up", "down"):
        facts.update({kind: True, "fast": None, "slow": None})
    elif kind == "jump":
        facts.update(jump=True, up=None, down=None, fast=None, slow=None)
    elif kind.startswith("enter_"):  # entering from the left means moving to the right
        facts.update({"enter": True, kind: True, OPPOSITE[kind[6:]]: True, "fast": None,
                      "slow": None})
    elif kind.startswith("leave_"):
        facts.update({"leave": True, kind: True, kind[6:]: True, "fast": None, "slow": None})
    else:  # turn_lr / turn_rl: both directions happen, so neither direction word may be used
        facts.update({"turn": True, kind: True, "left": None, "right": None, "fast": None,
                      "slow": None})
    return facts


def image_motion_facts(motion: str) -> dict:
    """Truth of the still-image motion predicates for an image object with motion `motion`."""
    if motion not in IMAGE_MOTIONS:
        raise ValueError(f"unknown image motion {motion!r}, expected one of {IMAGE_MOTIONS}")
    facts = {k[0]: False for k in IMAGE_PHRASES}
    facts[motion] = True
    facts["moving"] = motion != "still"
    return facts


def _truth(facts: dict, preds: tuple):
    values = [facts[p] for p in preds]
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None


# ---------------------------------------------------------------- drawing
def shape_polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Convex polygon (K, 2) of (x, y) vertices for a shape of radius `r` centred at (cx, cy).

    Pixel (row i, column j) covers [j, j+1) x [i, i+1), COCO's polygon convention; circles are
    24-gons.
    """
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        offsets = np.stack([np.cos(a), np.sin(a)], 1) * r
    elif shape == "square":
        s = 0.85 * r  # about the circle's area
        offsets = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif shape == "diamond":
        s = 1.1 * r
        offsets = np.array([[0, -s], [s, 0], [0, s], [-s, 0]])
    elif shape == "triangle":
        offsets = np.array([[0, -r], [0.95 * r, 0.75 * r], [-0.95 * r, 0.75 * r]])
    else:
        raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")
    return offsets + np.array([cx, cy])


def polygon_mask(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of the pixels whose centres lie inside the convex polygon `poly` (K, 2)."""
    mask = np.zeros((h, w), bool)
    x0, y0 = np.maximum(np.floor(poly.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(poly.max(0)).astype(int) + 1, [w, h])
    if x0 >= x1 or y0 >= y1:
        return mask
    px = np.arange(x0, x1) + 0.5                                  # (wb,)
    py = np.arange(y0, y1) + 0.5                                  # (hb,)
    edge = np.roll(poly, -1, 0) - poly                            # (K, 2)
    cross = (edge[:, 0, None, None] * (py[None, :, None] - poly[:, 1, None, None])
             - edge[:, 1, None, None] * (px[None, None, :] - poly[:, 0, None, None]))  # (K, hb, wb)
    area2 = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    mask[y0:y1, x0:x1] = (np.sign(area2) * cross >= 0).all(0)
    return mask


def _background(rng, h: int, w: int) -> np.ndarray:
    """Dark plain or lightly textured background (h, w, 3) float, so every colour stands out."""
    base = rng.uniform(20, 70) + rng.uniform(-8, 8, 3)            # (3,)
    img = np.broadcast_to(base, (h, w, 3)).copy()                 # (h, w, 3)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:h, 0:w]
        fx, fy, phase = rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25), rng.uniform(0, 2 * np.pi)
        img += 6 * np.sin(fx * xx + fy * yy + phase)[..., None]
        img += rng.normal(0, 3, (h, w, 1))
    return img


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(
        path, quality=JPEG_QUALITY, subsampling=0)


# ---------------------------------------------------------------- referring expressions
@dataclass
class _Spec:
    """One referring expression before wording: its targets, the appearance words it uses, and
    the motion (or, for images, position) predicates that single the targets out."""
    targets: tuple
    attrs: dict
    preds: tuple = ()
    n_matching: int = 1      # objects its appearance words alone match
    motion_only: bool = False


def _matching(objs, attrs: dict) -> list:
    return [j for j, o in enumerate(objs) if all(getattr(o, a) == v for a, v in attrs.items())]


def _noun_phrase(attrs: dict, rng, plural: bool = False, allow_one: bool = True) -> str:
    words = []
    if "size" in attrs:
        words.append(str(rng.choice(SIZE_WORDS[attrs["size"]])))
    if "colour" in attrs:
        words.append(attrs["colour"])
    if "shape" in attrs:
        noun = str(rng.choice(NOUNS[attrs["shape"]]))
    elif words and allow_one and not plural and rng.random() < 0.3:
        noun = "one"
    else:
        noun = str(rng.choice(GENERIC_NOUNS))
    if plural:
        noun = noun + "es" if noun.endswith("x") else noun + "s"
    return " ".join(words + [noun])


def _plural_verb(phrase: str) -> str:
    """Third-person singular verb phrase -> plural ("moves left" -> "move left", "does not move" ->
    "do not move")."""
    first, _, rest = phrase.partition(" ")
    first = {"does": "do", "is": "are",
             "goes": "go"}.get(first, first[:-1] if first.endswith("s") else first)
    return f"{first} {rest}".strip()


def _det(rng) -> str:
    return "the " if rng.random() < 0.8 else ""


def _video_candidates(objs) -> list:
    """Every expression spec that refers to exactly its targets in this video (see `_Spec`)."""
    specs, n = [], len(objs)
    appearance = [o.appearance for o in objs]
    for i, o in enumerate(objs):
        for subset in ATTR_SUBSETS:
            attrs = {a: getattr(o, a) for a in subset}
            match = _matching(objs, attrs)
            if match == [i] and attrs:
                specs.append(_Spec((i,), attrs))
            for preds in VIDEO_PHRASES:
                if _truth(o.facts, preds) is True and all(_truth(objs[j].facts, preds) is False
                                                          for j in match if j != i):
                    specs.append(_Spec((i,), attrs, preds, n_matching=len(match)))
    seen = set()
    for o in objs:
        for subset in ATTR_SUBSETS:
            attrs = {a: getattr(o, a) for a in subset}
            key = tuple(sorted(attrs.items()))
            if key in seen:
                continue
            seen.add(key)
            match = _matching(objs, attrs)
            # "both squares"; not "all three shapes"
            if attrs and 2 <= len(match) and (len(match) < n or n == 2):
                specs.append(_Spec(tuple(match), attrs, n_matching=len(match)))
            for preds in VIDEO_PHRASES:
                truth = {j: _truth(objs[j].facts, preds) for j in match}
                targets = tuple(j for j in match if truth[j] is True)
                if 2 <= len(targets) < len(match) and all(truth[j] is False
                                                          for j in match if j not in targets):
                    specs.append(_Spec(targets, attrs, preds, n_matching=len(match)))
    for s in specs:
        s.motion_only = any(appearance[j] == appearance[t] for t in s.targets for j in range(n)
                            if j not in s.targets)
    return specs


def _video_text(spec: _Spec, rng) -> str:
    if len(spec.targets) == 1 and not spec.preds:
        return _det(rng) + _noun_phrase(spec.attrs, rng)
    if len(spec.targets) == 1:
        participles, relatives, adjectives = VIDEO_PHRASES[spec.preds]
        forms = ["participle", "relative"] + ["adjective"] * bool(adjectives)
        forms += ["one_of"] * bool(adjectives and spec.attrs and spec.n_matching == 2)
        form = forms[rng.integers(len(forms))]
        if form == "participle":
            return f"{_det(rng)}{_noun_phrase(spec.attrs, rng)} {rng.choice(participles)}"
        if form == "relative":
            return f"{_det(rng)}{_noun_phrase(spec.attrs, rng)} " \
                   f"{rng.choice(['that', 'which'])} {rng.choice(relatives)}"
        if form == "adjective":
            return f"{_det(rng)}{rng.choice(adjectives)} " \
                   f"{_noun_phrase(spec.attrs, rng, allow_one=False)}"
        two = "two " if rng.random() < 0.5 else ""
        return f"the {rng.choice(adjectives)} one of the " \
               f"{two}{_noun_phrase(spec.attrs, rng, plural=True)}"
    count = len(spec.targets)
    plural = _noun_phrase(spec.attrs, rng, plural=True)
    if not spec.preds:
        quantifier = {2: ["both", "the two"], 3: ["all", "all the", "the three"]}.get(
            count, ["all", "all the", "all four"])
        return f"{rng.choice(quantifier)} {plural}"
    participles, relatives, adjectives = VIDEO_PHRASES[spec.preds]
    quantifier = ["the", "all", "all the"] + (["both", "the two"] if count == 2 else [])
    forms = ["participle", "relative"] + ["adjective"] * bool(adjectives)
    form = forms[rng.integers(len(forms))]
    if form == "participle":
        return f"{rng.choice(quantifier)} {plural} {rng.choice(participles)}"
    if form == "relative":
        return f"{rng.choice(quantifier)} {plural} that {_plural_verb(str(rng.choice(relatives)))}"
    return f"the {rng.choice(adjectives)} {plural}"


def _choose_specs(specs: list, n_expressions: int, rng) -> list:
    """Pick up to `n_expressions` specs (at least EXPRESSIONS_RANGE[0] when there are enough), about
    MOTION_ONLY_SHARE of them motion-only, spreading them over different target sets and preferring
    motion words that are needed over redundant ones."""
    specs = [specs[i] for i in rng.permutation(len(specs))]
    motion_only = [s for s in specs if s.motion_only]
    others = [s for s in specs if not s.motion_only]
    n_mo = min(len(motion_only), int(np.ceil(n_expressions * MOTION_ONLY_SHARE)))
    chosen, used = [], {}

    def take(pool, k):  # moves up to k specs from pool to chosen
        for _ in range(k):
            if not pool:
                return
            # fewest earlier uses of the same targets first, then motion words that the wording
            # needs
            key = [(used.get(s.targets, 0), bool(s.preds) and s.n_matching == 1) for s in pool]
            best = min(range(len(pool)), key=key.__getitem__)
            s = pool.pop(best)
            used[s.targets] = used.get(s.targets, 0) + 1
            chosen.append(s)

    take(motion_only, n_mo)
    take(others, n_expressions - len(chosen))
    # when too few others, fewer expressions rather than all motion-only
    take(motion_only, EXPRESSIONS_RANGE[0] - len(chosen))
    return chosen


# ----------------------------------------------------------------
# video "moving shapes" (MeViS layout)
@dataclass
class _VideoObject:
    shape: str
    colour: str
    size: str
    kind: str = "still"
    speed: str = ""
    xs: np.ndarray = None   # (T,) centre x per frame
    ys: np.ndarray = None   # (T,) centre y per frame

    @property
    def appearance(self):
        return (self.shape, self.colour, self.size)

    @property
    def radius(self):
        return VIDEO_RADIUS[self.size]

    @property
    def facts(self):
        return video_motion_facts(self.kind, self.speed)


def _trajectory(kind: str, speed: str, num_frames: int, r: float, rng):
    """Centre (xs, ys), each (T,), for one motion kind; the object stays inside the frame except
    while it enters or leaves."""
    t = np.arange(num_frames, dtype=float)                        # (T,)
    lo, hi_x, hi_y = r + 1, VIDEO_W - r - 1, VIDEO_H - r - 1
    x, y = np.full_like(t, rng.uniform(lo, hi_x)), np.full_like(t, rng.uniform(lo, hi_y))
    if kind in ("left", "right"):
        v = rng.uniform(0.7, 1.1) if speed == "slow" else rng.uniform(2.4, 3.2)  # px per frame
        v = min(v, (hi_x - lo) / (num_frames - 1))
        start = rng.uniform(lo, hi_x - v * (num_frames - 1))
        x = start + v * t if kind == "right" else start + v * (num_frames - 1 - t)
    elif kind in ("up", "down"):
        v = min(rng.uniform(1.0, 1.6), (hi_y - lo) / (num_frames - 1))
        start = rng.uniform(lo, hi_y - v * (num_frames - 1))
        y = start + v * t if kind == "down" else start + v * (num_frames - 1 - t)
    elif kind == "jump":
        ground = rng.uniform(hi_y - 3, hi_y)
        height = min(rng.uniform(12, 18), ground - lo)
        period = rng.uniform(6, 9)  # frames per bounce, so every video shows at least one
        y = ground - height * np.abs(np.sin(np.pi * (t / period + rng.uniform(0, 1))))
    elif kind in ("enter_left", "enter_right", "leave_left", "leave_right"):
        # built as entering from the left, then mirrored and/or played backwards; at least one
        # frame fully outside and the end (x_end) far enough inside that it is seen for several
        # frames
        v = rng.uniform(max(1.5, (2 * r + 8) / (num_frames - 2)), 3.0)
        x_end = rng.uniform(r + 8, min(hi_x, v * (num_frames - 2) - r))
        x = x_end - v * (num_frames - 1 - t)
        if kind.endswith("_right"):
            x = VIDEO_W - x
        if kind.startswith("leave_"):
            x = x[::-1].copy()
    elif kind in ("turn_lr", "turn_rl"):
        t_turn = rng.integers(num_frames // 3, 2 * num_frames // 3 + 1)
        longest = max(t_turn, num_frames - 1 - t_turn)
        v = min(rng.uniform(1.2, 2.0), (hi_x - lo) / longest)
        if kind == "turn_lr":
            x = rng.uniform(lo, hi_x - v * longest) + v * np.abs(t - t_turn)
        else:
            x = rng.uniform(lo + v * longest, hi_x) - v * np.abs(t - t_turn)
    elif kind != "still":
        raise ValueError(f"unknown video motion kind {kind!r}, expected one of {VIDEO_KINDS}")
    return x, y


def _sample_kind(rng):
    kind = VIDEO_KINDS[rng.choice(len(VIDEO_KINDS),
                                  p=np.array(VIDEO_KIND_WEIGHTS) / sum(VIDEO_KIND_WEIGHTS))]
    return kind, (str(rng.choice(["slow", "fast"])) if kind in ("left", "right") else "")


def _distinguishable(group) -> bool:
    """Every object of `group` has a motion predicate that is True for it and False for the rest."""
    return all(any(_truth(o.facts, p) is True and all(_truth(q.facts, p) is False
                                                      for q in group if q is not o)
                   for p in VIDEO_PHRASES) for o in group)


def _apart(objs) -> bool:
    """Identical-looking objects never touch; others overlap little, so every visible mask keeps
    most of its shape."""
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            oa, ob = objs[a], objs[b]
            dist = np.hypot(oa.xs - ob.xs, oa.ys - ob.ys)         # (T,)
            need = oa.radius + ob.radius + 2 if oa.appearance == ob.appearance \
                else 0.9 * (oa.radius + ob.radius)
            if (dist < need).any():
                return False
    return True


def _sample_video_objects(rng, num_frames: int) -> list:
    """2-4 objects with trajectories: a group of 2-3 identical-looking ones, each with a motion the
    others lack (redrawn until so), plus others, half of them sharing the group's shape or
    colour."""
    n = int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))
    while True:
        twin = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(SIZES)))
        group_size = 3 if n >= 3 and rng.random() < 0.2 else 2
        objs = [_VideoObject(*twin) for _ in range(group_size)]
        while len(objs) < n:
            shape, colour, size = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), \
                str(rng.choice(SIZES))
            # a near-twin that shares the shape or the colour, so both words matter
            if rng.random() < 0.5:
                shape, colour = (twin[0], colour) if rng.random() < 0.5 else (shape, twin[1])
            objs.append(_VideoObject(shape, colour, size))
        for _ in range(20):
            for o in objs:
                o.kind, o.speed = _sample_kind(rng)
            # same direction, different speed: "the fast one of ..."
            if group_size == 2 and rng.random() < 0.25:
                direction = str(rng.choice(["left", "right"]))
                objs[0].kind, objs[0].speed, objs[1].kind, objs[1].speed = direction, "fast", \
                    direction, "slow"
            groups = {}
            for o in objs:
                groups.setdefault(o.appearance, []).append(o)
            if not all(_distinguishable(g) for g in groups.values() if len(g) > 1):
                continue
            for _ in range(30):
                for o in objs:
                    o.xs, o.ys = _trajectory(o.kind, o.speed, num_frames, o.radius, rng)
                if _apart(objs):
                    return objs


def _make_video(rng):
    """Frames (T, H, W, 3) uint8, objects, visible masks (N, T, H, W) bool and expression specs of
    one video."""
    num_frames = int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1))
    objs = _sample_video_objects(rng, num_frames)
    order = rng.permutation(len(objs))                            # drawing order, last on top
    background = _background(rng, VIDEO_H, VIDEO_W)               # (H, W, 3)
    frames = np.empty((num_frames, VIDEO_H, VIDEO_W, 3), np.uint8)
    masks = np.zeros((len(objs), num_frames, VIDEO_H, VIDEO_W), bool)
    for t in range(num_frames):
        img, owner = background.copy(), np.full((VIDEO_H, VIDEO_W), -1)
        for i in order:
            o = objs[i]
            m = polygon_mask(shape_polygon(o.shape, o.xs[t], o.ys[t], o.radius), VIDEO_H, VIDEO_W)
            img[m] = COLOURS[o.colour]
            owner[m] = i
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        masks[:, t] = owner[None] == np.arange(len(objs))[:, None, None]
    specs = _choose_specs(_video_candidates(objs),
                          int(rng.integers(EXPRESSIONS_RANGE[0], EXPRESSIONS_RANGE[1] + 1)), rng)
    return frames, objs, masks, specs


def make_toy_video(out_dir, *, seed: int = 0, train_videos: int = 300, valid_videos: int = 40,
                   verbose: bool = True) -> dict:
    """Write the "moving shapes" video set in the MeViS layout to `out_dir`/{train,valid_u}.

    Video i of a split depends only on (seed, split, i), so a smaller set is a prefix of a larger
    one. Returns {split: {"videos", "expressions", "motion_only"}}.
    """
    stats = {}
    for split_index, (split, count) in enumerate([("train", train_videos),
                                                  ("valid_u", valid_videos)]):
        root = Path(out_dir) / split
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        meta, mask_dict, motion_only, objects = {}, {}, {}, {}
        next_anno, n_expressions = 0, 0
        for v in range(count):
            rng = np.random.default_rng([seed, split_index, v])
            frames, objs, masks, specs = _make_video(rng)
            vid = f"{'tr' if split == 'train' else 'vu'}{v:05d}"
            frame_names = [f"{t:05d}" for t in range(len(frames))]
            (root / "JPEGImages" / vid).mkdir(exist_ok=True)
            for name, frame in zip(frame_names, frames):
                _save_jpeg(frame, root / "JPEGImages" / vid / f"{name}.jpg")
            # unique within the split, as in MeViS
            anno_ids = [str(next_anno + i) for i in range(len(objs))]
            next_anno += len(objs)
            for i, anno in enumerate(anno_ids):
                mask_dict[anno] = [rle_encode(m) if m.any() else None for m in masks[i]]
            expressions, texts = {}, set()
            for spec in specs:
                for _ in range(5):  # a sentence may not repeat within a video
                    text = _video_text(spec, rng)
                    if text not in texts:
                        break
                else:
                    continue
                texts.add(text)
                exp_id = str(len(expressions))
                targets = sorted(spec.targets)
                expressions[exp_id] = {"exp": text, "obj_id": targets,
                                       "anno_id": [anno_ids[i] for i in targets]}
                if spec.motion_only:
                    motion_only.setdefault(vid, []).append(exp_id)
            meta[vid] = {"frames": frame_names, "expressions": expressions}
            objects[vid] = [{"obj_id": i, "anno_id": anno_ids[i], "shape": o.shape,
                             "colour": o.colour, "size": o.size, "rgb": list(COLOURS[o.colour]),
                             "motion": o.kind, "speed": o.speed}
                            for i, o in enumerate(objs)]
            n_expressions += len(expressions)
            if verbose and (v + 1) % 50 == 0:
                print(f"  mevis/{split}: {v + 1}/{count} videos", flush=True)
        n_mo = sum(len(e) for e in motion_only.values())
        _write_json(root / "meta_expressions.json", {"videos": meta})
        _write_json(root / "mask_dict.json", mask_dict)
        _write_json(root / "motion_only.json", {
            "about": "Toy set (data/toy.py): ids of the expressions that only motion resolves: "
                     "some object they "
                     "do not refer to has the same shape, colour and size as one they refer to.",
            "motion_only": motion_only})
        _write_json(root / "toy_objects.json", {
            "about": "Toy set (data/toy.py): appearance and motion kind of every object (obj_id, "
                     "anno_id as in meta_expressions.json); speed is 'fast' or 'slow' for kinds "
                     "left/right, else empty.",
            "videos": objects})
        stats[split] = {"videos": count, "expressions": n_expressions, "motion_only": n_mo}
        if verbose:
            print(f"mevis/{split}: {count} videos, {n_expressions} expressions, "
                  f"{n_mo} motion-only ({100 * n_mo / max(n_expressions, 1):.0f}%)", flush=True)
    return stats


# ---------------------------------------------------------------- image "shapes" (RefCOCO layout)
@dataclass
class _ImageObject:
    shape: str
    colour: str
    size: str
    motion: str = "still"
    cx: float = 0.0
    cy: float = 0.0

    @property
    def appearance(self):
        return (self.shape, self.colour, self.size)

    @property
    def radius(self):
        return IMAGE_RADIUS[self.size]

    @property
    def facts(self):
        return image_motion_facts(self.motion)


STREAK_ALPHAS = (0.55, 0.35, 0.18)   # fading copies behind a moving shape, nearest first
STREAK_STEP = 0.75                   # spacing of the copies, in radii
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def _extent(o: _ImageObject):
    """Box (x0, y0, x1, y1) holding the shape and its streak."""
    r, (dx, dy) = o.radius, DIRECTIONS[o.motion]
    tail = STREAK_STEP * len(STREAK_ALPHAS) * r
    return (o.cx - r - tail * (dx > 0), o.cy - r - tail * (dy > 0), o.cx + r + tail * (dx < 0),
            o.cy + r + tail * (dy < 0))


def _sample_image_objects(rng, require: str):
    """2-4 non-overlapping objects; most images hold a pair that looks identical and differs in
    motion. `require` = "circle" / "non_circle" forces the first object's shape (testA / testB refer
    only to those)."""
    while True:
        n = int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))
        objs = []
        for k in range(n):
            shape, colour, size = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), \
                str(rng.choice(SIZES))
            if k == 0 and require == "circle":
                shape = "circle"
            elif k == 0 and require == "non_circle":
                shape = str(rng.choice(SHAPES[1:]))
            motion = "still" if rng.random() < 0.4 else str(rng.choice(IMAGE_MOTIONS[1:]))
            objs.append(_ImageObject(shape, colour, size, motion))
        if rng.random() < 0.75:
            twin = objs[1]
            twin.shape, twin.colour, twin.size = objs[0].appearance
            twin.motion = str(rng.choice([m for m in IMAGE_MOTIONS if m != objs[0].motion]))
        boxes = []
        for o in objs:
            for _ in range(200):
                o.cx, o.cy = rng.uniform(0, IMAGE_SIZE, 2)
                x0, y0, x1, y1 = _extent(o)
                inside = x0 >= 1 and y0 >= 1 and x1 <= IMAGE_SIZE - 1 and y1 <= IMAGE_SIZE - 1
                if inside and all(x0 > b[2] + 3 or x1 < b[0] - 3 or y0 > b[3] + 3 or y1 < b[1] - 3
                                  for b in boxes):
                    boxes.append((x0, y0, x1, y1))
                    break
            else:
                break
        if len(boxes) == n:
            return objs


def _position_preds(objs, i: int, match: list) -> list:
    """Position words that single out object i among the objects `match` (6 px margins)."""
    others = [objs[j] for j in match if j != i]
    o, preds = objs[i], []
    if all(o.cx < q.cx - 6 for q in others):
        preds.append("pos_left")
    if all(o.cx > q.cx + 6 for q in others):
        preds.append("pos_right")
    if all(o.cy < q.cy - 6 for q in others):
        preds.append("pos_top")
    if all(o.cy > q.cy + 6 for q in others):
        preds.append("pos_bottom")
    if len(others) == 2 and sum(o.cx > q.cx + 6 for q in others) == 1 \
            and sum(o.cx < q.cx - 6 for q in others) == 1:
        preds.append("pos_middle")
    return preds


def _image_candidates(objs, i: int) -> list:
    specs = []
    for subset in ATTR_SUBSETS:
        attrs = {a: getattr(objs[i], a) for a in subset}
        match = _matching(objs, attrs)
        if match == [i] and attrs:
            specs.append(_Spec((i,), attrs))
        if len(match) >= 2:
            specs += [_Spec((i,), attrs, (p,), n_matching=len(match))
                      for p in _position_preds(objs, i, match)]
        for preds in IMAGE_PHRASES:
            if _truth(objs[i].facts, preds) is True and all(_truth(objs[j].facts, preds) is False
                                                            for j in match if j != i):
                specs.append(_Spec((i,), attrs, preds, n_matching=len(match)))
    for s in specs:
        s.motion_only = bool(s.preds) and not s.preds[0].startswith("pos_") and any(
            objs[j].appearance == objs[i].appearance for j in range(len(objs)) if j != i)
    return specs


def _image_text(spec: _Spec, rng) -> str:
    if not spec.preds:
        return _det(rng) + _noun_phrase(spec.attrs, rng)
    if spec.preds[0].startswith("pos_"):
        after, before = POSITION_PHRASES[spec.preds[0]]
        if rng.random() < 0.5:
            return f"{_det(rng)}{_noun_phrase(spec.attrs, rng)} {rng.choice(after)}"
        return f"the {rng.choice(before)} {_noun_phrase(spec.attrs, rng)}"
    participles, adjectives = IMAGE_PHRASES[spec.preds]
    form = rng.integers(3 if adjectives else 2)
    if form == 0:
        return f"{_det(rng)}{_noun_phrase(spec.attrs, rng)} {rng.choice(participles)}"
    if form == 1:
        return f"{_det(rng)}{_noun_phrase(spec.attrs, rng)} that is {rng.choice(participles)}"
    return f"{_det(rng)}{rng.choice(adjectives)} {_noun_phrase(spec.attrs, rng, allow_one=False)}"


def _draw_image(objs, rng):
    """Image (H, W, 3) uint8, and per object its polygon (K, 2) and mask (H, W) bool."""
    background = _background(rng, IMAGE_SIZE, IMAGE_SIZE)         # (H, W, 3)
    img = background.copy()
    polys, masks = [], []
    for o in objs:
        dx, dy = DIRECTIONS[o.motion]
        colour = np.array(COLOURS[o.colour], float)
        # the streak trails behind: a ball flying left leaves it on its right
        if o.motion != "still":
            for k, alpha in reversed(list(enumerate(STREAK_ALPHAS, start=1))):
                off = STREAK_STEP * k * o.radius
                m = polygon_mask(shape_polygon(o.shape, o.cx - dx * off, o.cy - dy * off, o.radius),
                                 IMAGE_SIZE, IMAGE_SIZE)
                # nearer copies replace farther ones instead of adding up, so no streak pixel gets
                # close to the body's own colour and the body's outline stays sharp
                img[m] = (1 - alpha) * background[m] + alpha * colour
        # the body is painted exactly where the reader's (pycocotools') rasterisation of the stored,
        # rounded polygon puts the mask
        poly = np.round(shape_polygon(o.shape, o.cx, o.cy, o.radius), 2)
        m = polygons_to_mask([poly.reshape(-1).tolist()], IMAGE_SIZE, IMAGE_SIZE).astype(bool)
        img[m] = colour
        polys.append(poly)
        masks.append(m)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), polys, masks


def make_toy_image(out_dir, *, seed: int = 0, train_images: int = 400, val_images: int = 60,
                   test_images: int = 60,
                   verbose: bool = True) -> dict:
    """Write the "shapes" image set in the RefCOCO (unc) layout to `out_dir`/{refcoco,images}.

    Splits train / val / testA / testB (`test_images` each). As RefCOCO's testA refers only to
    people and testB only to other objects, toy testA refers only to circles ("balls") and testB
    only to the other shapes. Returns {split: {"images", "refs", "sentences", "motion_sentences"}}.
    """
    out_dir = Path(out_dir)
    (out_dir / "refcoco").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs, motion_sents, objects = [], [], [], [], {}
    next_sent_id = 0
    stats = {}
    plan = [("train", train_images, "any"), ("val", val_images, "any"),
            ("testA", test_images, "circle"), ("testB", test_images, "non_circle")]
    for split_index, (split, count, require) in enumerate(plan):
        stats[split] = {"images": count, "refs": 0, "sentences": 0, "motion_sentences": 0}
        for k in range(count):
            rng = np.random.default_rng([seed, 10 + split_index, k])
            objs = _sample_image_objects(rng, require)
            img, polys, masks = _draw_image(objs, rng)
            image_id = len(images) + 1
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            _save_jpeg(img, out_dir / "images" / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": IMAGE_SIZE,
                           "width": IMAGE_SIZE})
            for i, (o, poly, m) in enumerate(zip(objs, polys, masks)):
                ann_id = len(annotations) + 1
                ys, xs = np.nonzero(m)
                # most objects as polygons, every sixth as RLE: both occur in COCO
                segmentation = rle_encode(m) if ann_id % 6 == 0 else [poly.reshape(-1).tolist()]
                annotations.append({"id": ann_id, "image_id": image_id,
                                    "segmentation": segmentation,
                                    "category_id": CATEGORY_IDS[o.shape], "iscrowd": 0,
                                    "area": float(m.sum()),
                                    "bbox": [float(xs.min()), float(ys.min()),
                                             float(xs.max() - xs.min() + 1),
                                             float(ys.max() - ys.min() + 1)]})
                objects[str(ann_id)] = {"shape": o.shape, "colour": o.colour, "size": o.size,
                                        "rgb": list(COLOURS[o.colour]), "motion": o.motion}
                if (require == "circle" and o.shape != "circle") \
                        or (require == "non_circle" and o.shape == "circle"):
                    continue
                sentences = _ref_sentences(_image_candidates(objs, i), rng)
                if not sentences:
                    continue
                sents = []
                for text, is_motion in sentences:
                    sent_id = next_sent_id
                    next_sent_id += 1
                    raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
                    sents.append({"tokens": text.split(), "raw": raw, "sent_id": sent_id,
                                  "sent": text})
                    if is_motion:
                        motion_sents.append(sent_id)
                        stats[split]["motion_sentences"] += 1
                refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id,
                             "split": split,
                             "sentences": sents, "sent_ids": [s["sent_id"] for s in sents],
                             "category_id": CATEGORY_IDS[o.shape],
                             # refer's per-ref name, unused
                             "file_name": f"COCO_train2014_{image_id:012d}_{i}.jpg"})
                stats[split]["refs"] += 1
                stats[split]["sentences"] += len(sents)
        if verbose:
            s = stats[split]
            print(f"refcoco/{split}: {count} images, {s['refs']} refs, {s['sentences']} sentences, "
                  f"{s['motion_sentences']} motion-only", flush=True)
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": name, "supercategory": "shape"}
                                for name, i in CATEGORY_IDS.items()]}
    _write_json(out_dir / "refcoco" / "instances.json", instances)
    with open(out_dir / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=4)
    _write_json(out_dir / "refcoco" / "motion_sent_ids.json", {
        "about": "Toy set (data/toy.py): sent_ids of sentences that only the motion cue (a fading "
                 "streak behind a moving shape) resolves: an object of the same shape, colour and "
                 "size with another motion is in the image.",
        "sent_ids": motion_sents})
    _write_json(out_dir / "refcoco" / "toy_objects.json", {
        "about": "Toy set (data/toy.py): appearance and motion of every annotation, "
                 "keyed by ann_id.",
        "annotations": objects})
    return stats


def _ref_sentences(specs: list, rng) -> list:
    """Up to 3 (usually 2-3) distinct (sentence, motion_only) for one ref: a motion sentence first
    when one exists (one that needs its motion words if possible), the rest mixed."""
    if not specs:
        return []
    n = int(rng.integers(2, 4))
    motion = [s for s in specs if s.preds and not s.preds[0].startswith("pos_")]
    needed = [s for s in motion if s.n_matching > 1]
    order = [specs[i] for i in rng.permutation(len(specs))]
    if motion:
        pool = needed or motion
        order.insert(0, pool[rng.integers(len(pool))])
    out, texts = [], set()
    for spec in order * 3:  # later rounds find other wordings when there are few specs
        text = _image_text(spec, rng)
        if text not in texts:
            texts.add(text)
            out.append((text, spec.motion_only))
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------- both sets, atomically
def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def toy_ready(out) -> bool:
    """True when `out` holds a finished toy set (its DONE marker, written last, exists)."""
    return (Path(out) / "DONE").is_file()


DEFAULT_OUT = "data/toy"


def ensure_toy(out=DEFAULT_OUT) -> None:
    """Write the toy sets to `out` unless a finished set is there (the methods call this on first
    use)."""
    if not toy_ready(out):
        print(f"generating the toy datasets in {out} (python data/toy.py --out {out})", flush=True)
        make_toy(out)


def motion_only_keys(root, split) -> dict:
    """{"motion_only": {"video/exp_id", ...}}: the expressions of a toy video split (root = the
    mevis folder) that only motion resolves, read from its motion_only.json; {} when the folder
    has none (a MeViS-layout folder that is not a toy set)."""
    path = Path(root) / split / "motion_only.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        ids = json.load(f)["motion_only"]
    return {"motion_only": {f"{video}/{exp_id}" for video, exp_ids in ids.items()
                            for exp_id in exp_ids}}


def look_alikes(objects, targets) -> list:
    """The objects of one toy video (its toy_objects.json entries) that look exactly like one of
    `targets` (obj_ids): same shape, colour and size, the targets themselves included."""
    look = lambda o: (o["shape"], o["colour"], o["size"])  # noqa: E731
    looks = {look(o) for o in objects if o["obj_id"] in targets}
    return [o for o in objects if look(o) in looks]


def motion_only_references(root, split, *, keys=None) -> dict:
    """Where chance is on the motion-only expressions of a toy video split, from its ground truth:
    J, F, J&F (MeViS averaging) of two predictions that use appearance and no motion at all.
      every_look_alike:  every object that looks like a target (shape, colour and size), targets
                         included: what a model that reads the appearance words perfectly and
                         ignores the motion words scores;
      wrong_look_alikes: only the look-alikes that are not targets: the motion words read backwards.
    `keys` ("video/exp_id", ...) restricts them to a subset. {} when the folder has no toy files."""
    split_dir = Path(root) / split
    if not (split_dir / "motion_only.json").is_file():
        return {}
    read = lambda name: json.loads((split_dir / name).read_text())
    meta, masks = read("meta_expressions.json")["videos"], read("mask_dict.json")
    objects, motion_only = read("toy_objects.json")["videos"], \
        read("motion_only.json")["motion_only"]
    scores = {"every_look_alike": VideoMetrics(), "wrong_look_alikes": VideoMetrics()}
    for video, exp_ids in motion_only.items():
        objs = objects[video]
        frames = {}
        for o in objs:  # (T, H, W) bool per object
            frames[o["obj_id"]] = np.stack([np.zeros((VIDEO_H, VIDEO_W), bool) if rle is None else
                                            rle_decode(rle).astype(bool)
                                            for rle in masks[o["anno_id"]]])
        for exp_id in exp_ids:
            if keys is not None and f"{video}/{exp_id}" not in keys:
                continue
            targets = set(meta[video]["expressions"][exp_id]["obj_id"])
            alike = [o["obj_id"] for o in look_alikes(objs, targets)]
            gt = np.any([frames[t] for t in targets], axis=0)  # (T, H, W)
            empty = np.zeros_like(gt)
            wrong = [a for a in alike if a not in targets]
            for name, chosen in (("every_look_alike", alike), ("wrong_look_alikes", wrong)):
                pred = np.any([frames[a] for a in chosen], axis=0) if chosen else empty
                scores[name].add(pred, gt, key=f"{video}/{exp_id}")
    return {name: metric.summary() for name, metric in scores.items()}


def phrase_predicates(text: str) -> tuple:
    """The motion predicates (a key of VIDEO_PHRASES) that a toy video expression's wording uses:
    those of the longest VIDEO_PHRASES phrase found in `text` as whole words; () when none is."""
    best, preds = "", ()
    for key, (participles, relatives, adjectives) in VIDEO_PHRASES.items():
        for phrase in [*participles, *relatives, *map(_plural_verb, relatives), *adjectives]:
            if len(phrase) > len(best) and re.search(rf"\b{re.escape(phrase)}\b", text):
                best, preds = phrase, key
    return preds


def motion_only_order_keys(root, split) -> dict:
    """The motion-only expressions of a toy video split (root = the mevis folder), split by whether
    their answer depends on which way time runs:
      motion_only_order_dependent: played backwards, the video would make the expression's motion
          words hold for a look-alike it does not refer to ("moving left" against a look-alike
          moving right, "entering" against one leaving);
      motion_only_order_free: the rest ("still" against "moving", "fast" against "slow", "jumping").
    A model whose output is the same for a clip and for the clip played backwards (DsHmp and VITA:
    no temporal position anywhere, README "Toy results") can only guess between the look-alikes
    on the first set. {} when the folder has no toy files."""
    split_dir = Path(root) / split
    if not (split_dir / "motion_only.json").is_file():
        return {}
    read = lambda name: json.loads((split_dir / name).read_text())
    meta, objects = read("meta_expressions.json")["videos"], read("toy_objects.json")["videos"]
    keys = {"motion_only_order_dependent": set(), "motion_only_order_free": set()}
    for video, exp_ids in read("motion_only.json")["motion_only"].items():
        for exp_id in exp_ids:
            expression = meta[video]["expressions"][exp_id]
            targets = set(expression["obj_id"])
            preds = phrase_predicates(expression["exp"])
            backwards = [_truth(video_motion_facts(REVERSED_KIND[o["motion"]], o["speed"]), preds)
                         for o in look_alikes(objects[video], targets)
                         if o["obj_id"] not in targets]
            name = "dependent" if preds and True in backwards else "free"
            keys[f"motion_only_order_{name}"].add(f"{video}/{exp_id}")
    return keys


def toy_video_evaluation(root, split) -> dict:
    """Keyword arguments of common.run.evaluate_video for a toy video split: the motion-only
    expressions as a subset reported on its own (and split by whether the answer depends on the
    direction of time), and where chance is on them (the floors)."""
    order = motion_only_order_keys(root, split)
    return {"subsets": {**motion_only_keys(root, split), **order},
            "extra": {"motion_only_references": motion_only_references(root, split),
                      **{f"{name}_references": motion_only_references(root, split, keys=keys)
                         for name, keys in order.items()}}}


def motion_sentence_keys(root) -> dict:
    """{"motion": {"sent_id", ...}}: the sentences of the toy image set (root = the refcoco folder)
    that only the motion cue resolves, read from refcoco/motion_sent_ids.json; {} without it."""
    path = Path(root) / "refcoco" / "motion_sent_ids.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return {"motion": {str(i) for i in json.load(f)["sent_ids"]}}


VIS_FILE = "instances_vis.json"


def write_toy_vis(mevis_root, *, splits=("train", "valid_u"), overwrite: bool = False) -> list:
    """Write <mevis_root>/<split>/instances_vis.json: a toy video split in the YouTube-VIS format
    that VITA trains on (common.datasets.YouTubeVIS reads it, with image root <split>/JPEGImages).

    Derived from the split's meta_expressions.json, mask_dict.json and toy_objects.json, so
    make_toy's own files stay as they are. The class of an instance is its shape (categories =
    CATEGORY_IDS, as in the toy RefCOCO set): the one attribute a still frame always shows, as
    the object classes of YouTube-VIS / OVIS. Videos get ids 1, 2, ... in sorted name order and
    annotations 1, 2, ... in order; each annotation also keeps its toy "obj_id" and "anno_id".
    A split whose file exists is skipped unless `overwrite`; the file appears atomically (written
    to a temporary name, then renamed), so a reader never sees half of it. Returns the paths.
    """
    paths = []
    for split in splits:
        root = Path(mevis_root) / split
        path = root / VIS_FILE
        paths.append(path)
        if path.is_file() and not overwrite:
            continue
        for name in ("meta_expressions.json", "mask_dict.json", "toy_objects.json"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"write_toy_vis: expected the toy file {root / name} "
                                        f"(python data/toy.py --out DIR writes it)")
        read = lambda name: json.loads((root / name).read_text())
        meta, mask_dict = read("meta_expressions.json")["videos"], read("mask_dict.json")
        objects = read("toy_objects.json")["videos"]
        videos, annotations = [], []
        for video_id, vid in enumerate(sorted(meta), start=1):
            frames = sorted(meta[vid]["frames"])  # the order of mask_dict's lists
            with Image.open(root / "JPEGImages" / vid / f"{frames[0]}.jpg") as image:
                width, height = image.size
            videos.append({"id": video_id, "file_names": [f"{vid}/{f}.jpg" for f in frames],
                           "width": width, "height": height, "length": len(frames)})
            for o in objects[vid]:
                rles = mask_dict[o["anno_id"]]
                segmentations, areas, bboxes = [], [], []
                for rle in rles:
                    mask = None if rle is None else rle_decode(rle)  # (H, W)
                    if mask is None or not mask.any():  # absent: null everywhere, as YouTube-VIS
                        segmentations.append(None)
                        areas.append(None)
                        bboxes.append(None)
                        continue
                    ys, xs = np.nonzero(mask)
                    segmentations.append(rle)
                    areas.append(int(mask.sum()))
                    bboxes.append([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                   float(ys.max() - ys.min() + 1)])  # [x, y, w, h], pycocotools'
                annotations.append({"id": len(annotations) + 1, "video_id": video_id,
                                    "category_id": CATEGORY_IDS[o["shape"]],
                                    "segmentations": segmentations,
                                    "areas": areas, "bboxes": bboxes, "iscrowd": 0,
                                    "width": width, "height": height, "length": len(frames),
                                    "obj_id": o["obj_id"], "anno_id": o["anno_id"]})
        categories = [{"id": i, "name": name, "supercategory": "shape"}
                      for name, i in CATEGORY_IDS.items()]
        tmp = root / f".{VIS_FILE}.partial-{os.getpid()}"
        _write_json(tmp, {"videos": videos, "annotations": annotations, "categories": categories})
        os.replace(tmp, path)
    return paths


def make_toy(out, *, seed: int = 0, train_videos: int = 300, valid_videos: int = 40,
             train_images: int = 400,
             val_images: int = 60, test_images: int = 60, verbose: bool = True) -> None:
    """Write both toy sets under `out` (mevis/ and refcoco/), deterministic given the arguments.

    Everything is written to a temporary sibling folder that is renamed to `out` only when complete,
    and DONE is written last, so an interrupted run never looks finished. An existing finished
    toy set at `out` is replaced; any other existing non-empty folder raises FileExistsError.
    """
    out = Path(out)
    if out.exists() and not toy_ready(out) and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no finished toy set (no DONE "
                              f"file); "
                              f"refusing to overwrite it: pass another --out or remove it")
    start = time.time()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    video = make_toy_video(tmp / "mevis", seed=seed, train_videos=train_videos,
                           valid_videos=valid_videos, verbose=verbose)
    image = make_toy_image(tmp / "refcoco", seed=seed, train_images=train_images,
                           val_images=val_images,
                           test_images=test_images, verbose=verbose)
    _write_json(tmp / "DONE", {"seed": seed, "mevis": video, "refcoco": image})
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    if verbose:
        print(f"toy sets written to {out} in {time.time() - start:.1f} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-videos", type=int, default=300)
    p.add_argument("--valid-videos", type=int, default=40)
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--test-images", type=int, default=60, help="images in each of testA and testB")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    make_toy(a.out, seed=a.seed, train_videos=a.train_videos, valid_videos=a.valid_videos,
             train_images=a.train_images,
             val_images=a.val_images, test_images=a.test_images, verbose=not a.quiet)


if __name__ == "__main__":
    main()
