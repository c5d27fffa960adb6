"""COCO mask codec in numpy, equal to pycocotools: compressed RLE strings (decode, encode, a
cheap "any pixel" test) and polygon rasterisation (a port of maskApi.c's rleFrPoly).

    mask = rle_decode({"size": [h, w], "counts": "..."})     # (h, w) uint8 in {0, 1}
    rle = rle_encode(mask)                                   # exactly the string pycocotools writes
    mask = polygons_to_mask([[x0, y0, x1, y1, ...]], h, w)   # the union of the polygons
"""
import numpy as np

# ---------------------------------------------------------------- COCO RLE codec
# Format of pycocotools (maskApi.c, rleToString / rleFrString): run lengths over the mask in
# column-major order, starting with a run of zeros; each run length (from the third on, minus the
# run two places earlier) is written as 5-bit groups, low group first, with 0x20 = "more groups
# follow" and 0x10 = sign bit on the last group, each group offset by 48 to be printable ASCII.

def _counts_from_string(counts: str) -> np.ndarray:
    # (n_chars,)
    codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0 or codes.min() < 0 or codes.max() > 63 or codes[-1] & 0x20:
        raise ValueError(f"malformed COCO RLE counts string {counts[:40]!r}: expected pycocotools' "
                         f"compressed ASCII")
    last = (codes & 0x20) == 0  # (n_chars,) the group ends a number
    number = np.concatenate([[0], np.cumsum(last)[:-1]])  # (n_chars,) the number of each group
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))  # (n_numbers,)
    shift = 5 * (np.arange(codes.size) - starts[number])          # (n_chars,)
    values = np.zeros(int(last.sum()), dtype=np.int64)            # (n_numbers,)
    np.add.at(values, number, (codes & 0x1F) << shift)
    width = 5 * (np.flatnonzero(last) - starts + 1)               # (n_numbers,) bits per number
    negative = (codes[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, width[negative])
    # undo the delta: x[i] += x[i-2] for i > 2, i.e. a running sum over each parity from index 2 / 1
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _counts_to_string(runs) -> str:
    chars = []
    for i, run in enumerate(runs):
        x = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in the C code
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE {"size": [h, w], "counts": str | bytes | list[int]} -> (h, w) uint8 mask in {0, 1}.

    Compressed string counts (what pycocotools' mask.encode writes) and uncompressed list counts
    (iscrowd annotations in COCO json) are both accepted. Raises ValueError on a malformed RLE.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"malformed COCO RLE {str(rle)[:80]}: expected a dict with 'size' and "
                         f"'counts'")
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts) if isinstance(counts, str) \
        else np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"malformed COCO RLE: run lengths sum to {int(runs.sum())}, expected h*w "
                         f"= {h}*{w} = {h * w}")
    flat = np.repeat((np.arange(runs.size) % 2).astype(np.uint8), runs)  # (h*w,) column-major
    return flat.reshape(w, h).T.copy()


def rle_encode(mask: np.ndarray) -> dict:
    """(h, w) bool/uint8 mask -> {"size": [h, w], "counts": str}, exactly as pycocotools'
    mask.encode writes it."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (h, w) mask, got shape {mask.shape}")
    h, w = mask.shape
    flat = (mask != 0).T.reshape(-1)                                   # (h*w,) column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1                 # where a new run starts
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs                                              # the first run counts zeros
    return {"size": [h, w], "counts": _counts_to_string(runs)}


def rle_has_pixels(rle) -> bool:
    """Cheap "is any pixel set" test of a COCO RLE without decoding it (None -> False).

    pycocotools encodes an all-zero mask as a single run, so a compressed counts string holds
    pixels exactly when it holds more than one number; only the first number is parsed.
    """
    if rle is None:
        return False
    counts = rle["counts"] if isinstance(rle, dict) and "counts" in rle else None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        for position, char in enumerate(counts):
            if not (ord(char) - 48) & 0x20:  # last 5-bit group of the first number
                return position < len(counts) - 1
        raise ValueError(f"malformed COCO RLE counts string {counts[:40]!r}: it never ends its "
                         f"first number")
    if isinstance(counts, list):
        return any(run > 0 for run in counts[1::2])
    raise ValueError(f"malformed COCO RLE {str(rle)[:80]}: expected a dict with 'size' and "
                     f"'counts' (str or list)")


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygon segmentation [[x0, y0, x1, y1, ...], ...] -> (height, width) uint8 union mask.

    A line-by-line numpy port of pycocotools' rleFrPoly (maskApi.c), so masks equal
    `pycocotools.mask.decode(merge(frPyObjects(polygons, h, w)))`: vertices are snapped to a 5x
    finer grid, the boundary is walked, and each pixel column toggles at the downsampled crossings.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for polygon in polygons:
        runs = _polygon_runs(np.asarray(polygon, dtype=np.float64), height, width)
        mask |= rle_decode({"size": [height, width], "counts": runs})
    return mask


def _polygon_runs(xy: np.ndarray, h: int, w: int) -> list:
    scale = 5.0
    if xy.ndim != 1 or xy.size % 2:
        raise ValueError(f"malformed COCO polygon with {xy.size} numbers: expected [x0, y0, x1, "
                         f"y1, ...]")
    if xy.size == 0:
        return [h * w]
    x = np.trunc(scale * xy[0::2] + 0.5).astype(np.int64)   # C's (int) cast truncates toward zero
    y = np.trunc(scale * xy[1::2] + 0.5).astype(np.int64)
    x, y = np.append(x, x[:1]), np.append(y, y[:1])
    us, vs = [], []
    for j in range(len(x) - 1):  # dense points along each edge, in the fine grid
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        d = np.arange(max(dx, dy) + 1)
        t = max(dx, dy) - d if flip else d
        if dx >= dy:
            # a repeated vertex; C divides 0 by 0 here, its point is never used
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # where the walk changes column, record the downsampled (column, first row inside) crossing
    moved = np.flatnonzero(u[1:] != u[:-1]) + 1
    xd = np.where(u[moved] < u[moved - 1], u[moved], u[moved] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.minimum(v[moved], v[moved - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, h))
    toggles = np.sort(np.append(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), h * w))
    gaps = np.diff(toggles, prepend=0).tolist()
    runs = [gaps[0]]
    j = 1
    while j < len(gaps):  # a zero-length run merges its neighbours, as in the C code
        if gaps[j] > 0:
            runs.append(gaps[j])
            j += 1
        else:
            j += 1
            if j < len(gaps):
                runs[-1] += gaps[j]
                j += 1
    return runs
