"""Parity with the official code: tests/fixtures/parity/ holds small official modules (seeded
random weights under the official key names), their inputs and their outputs, written by
tests/parity/make_fixtures.py from a mirror of the official repository. Each test loads the
official weights into our module through the project's own key map, runs the same inputs and
compares (fp32, max abs difference at most 1e-4, printed); a deliberately broken variant of each
must land above that tolerance, so the comparison can fail."""
from pathlib import Path

import pytest
import torch

from common.vita import build_vita, official_vita_key_map

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"
TOLERANCE = 1e-4


def load(name):
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


# ------------------------------------------------------------------------------ VITA module
VITA = load("vita_module")


def our_vita(window: int, key_map=None):
    """Our VITA at the fixture's sizes (the Swin, pixel decoder and frame decoder are tiny and
    unused here), its VITA module loaded from the official state dict through
    common.vita.official_vita_key_map (the `vita_module.` entries), or through `key_map` when
    given (the broken variants)."""
    s = VITA["sizes"]
    model = build_vita(dict(embed_dim=16, depths=(1, 1, 1, 1), swin_heads=(1, 2, 2, 4), window=4,
                            conv_dim=s["conv_dim"], mask_dim=s["mask_dim"],
                            pixel_decoder_layers=1, pixel_decoder_heads=4, pixel_decoder_ffn=64,
                            hidden=s["hidden_dim"], heads=s["nheads"], ffn=s["dim_feedforward"],
                            frame_queries=s["num_frame_queries"], dec_layers=2,
                            num_classes=s["num_classes"], enc_layers=s["enc_layers"],
                            vita_dec_layers=s["dec_layers"], video_queries=s["num_queries"],
                            enc_window=window))
    if key_map is None:
        key_map = {theirs.removeprefix("vita_module."): ours
                   for theirs, ours in official_vita_key_map(model).items()
                   if theirs.startswith("vita_module.")}
    official = VITA["state_dict"]
    assert set(key_map) == set(official), set(key_map) ^ set(official)  # every official tensor used
    state = {ours: official[theirs] for theirs, targets in key_map.items() for ours in targets}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys  # nothing of our VITA module left unloaded
                if not k.startswith(("pixel_level.", "decoder."))]
    return model


def vita_outputs(model, case):
    """Our VITA module on the case's frame queries, in the case's mode, as the official names."""
    B, T = case["clips"], case["frames"]
    frame_queries = case["frame_query"][0].reshape(B, T, *case["frame_query"].shape[2:])
    mask_feats = torch.zeros(B, T, VITA["sizes"]["mask_dim"], 1, 1)  # the masks are not compared
    model.train(case["training"])
    with torch.no_grad():
        out = model.decode_video(frame_queries, mask_feats)
        return {"pred_logits": out["pred_logits"],
                "pred_mask_embed": model.mask_embed(out["video_queries"]),
                "pred_fq_embed": out["sim_frame"], "pred_cq_embed": out["sim_video"],
                "aux_logits": [a["pred_logits"] for a in out["aux_outputs"]]}


def max_difference(ours, case):
    diffs = [float((ours[k] - case[k]).abs().max()) for k in
             ("pred_logits", "pred_mask_embed", "pred_fq_embed", "pred_cq_embed")]
    if case["training"]:  # the official module returns the earlier layers in training only
        diffs += [float((a - b).abs().max()) for a, b in zip(ours["aux_logits"], case["aux_logits"],
                                                             strict=True)]
    return max(diffs)


@pytest.mark.parametrize("name", sorted(VITA["cases"]))
def test_vita_module_equals_the_official(name):
    """The Object Encoder (windows, shifted windows at test, padding of a clip that is not a
    multiple of the window, a clip shorter than one window), the Object Decoder and the heads, in
    the official module's own mode (training: every layer's class logits; test: the last)."""
    case = VITA["cases"][name]
    difference = max_difference(vita_outputs(our_vita(case["window"]), case), case)
    print(f"{name}: max abs difference {difference:.2e} (official "
          f"{VITA['repo']} @ {VITA['commit'][:7]})")
    assert difference <= TOLERANCE


def test_vita_parity_fails_on_a_broken_port():
    """Three broken variants land far above the tolerance: two LayerNorms of the Object Decoder
    swapped in the key map (cross-attention's and self-attention's), the window of the Object
    Encoder changed (test mode, where the odd layers shift it), and the test-time shifted windows
    replaced by the training-time plain ones."""
    case = VITA["cases"]["vita_module_test_T7_K3"]
    model = our_vita(3)
    key_map = {theirs.removeprefix("vita_module."): ours
               for theirs, ours in official_vita_key_map(model).items()
               if theirs.startswith("vita_module.")}
    for p in ("weight", "bias"):  # layer 0 of the Object Decoder: norms.0 <-> norms.1
        cross = f"transformer_cross_attention_layers.0.norm.{p}"
        self_ = f"transformer_self_attention_layers.0.norm.{p}"
        key_map[cross], key_map[self_] = key_map[self_], key_map[cross]
    swapped = max_difference(vita_outputs(our_vita(3, key_map), case), case)
    other_window = max_difference(vita_outputs(our_vita(2), case), case)
    plain = {**case, "training": True, "aux_logits": []}  # training mode: no shifted windows
    ours = vita_outputs(model, plain)
    no_shift = max(float((ours[k] - case[k]).abs().max()) for k in ("pred_logits", "pred_fq_embed"))
    print(f"swapped norms {swapped:.2e}, window 2 {other_window:.2e}, no shift {no_shift:.2e}")
    assert min(swapped, other_window, no_shift) > 100 * TOLERANCE
