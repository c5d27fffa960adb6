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


def vita_module_keys(model):
    """The `vita_module.` part of common.vita.official_vita_key_map, without the prefix."""
    return {theirs.removeprefix("vita_module."): ours
            for theirs, ours in official_vita_key_map(model).items()
            if theirs.startswith("vita_module.")}


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
    key_map = vita_module_keys(model) if key_map is None else key_map
    official = VITA["state_dict"]
    assert set(key_map) == set(official), set(key_map) ^ set(official)  # every official tensor used
    assert all(len(targets) == 1 for targets in key_map.values())  # no tensor cut in the module
    state = {targets[0]: official[theirs] for theirs, targets in key_map.items()}
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
    key_map = vita_module_keys(model)
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


# ------------------------------------------------------------------------------ LAVT
LAVT = load("lavt")


def our_lavt(rename=None):
    """MRaCL's LAVT at the fixture's sizes (no text encoder: the words are given), loaded from the
    official state dict by mracl.load_official_lavt (mracl.official_lavt_key_map); `rename` maps
    official keys to other official keys first (the broken variants)."""
    import types

    import mracl
    from common.backbones import swin_backbone, swin_base_22k_config
    s = LAVT["sizes"]
    backbone = swin_backbone(swin_base_22k_config(image_size=224, embed_dim=s["embed_dim"],
                                                  depths=s["depths"], num_heads=s["num_heads"],
                                                  window_size=s["window_size"], drop_path_rate=0.0))
    model = mracl.LAVT(backbone=backbone, text_encoder=types.SimpleNamespace(hidden_size=768),
                       decoder_dim=4 * s["embed_dim"], proj_dim=0)
    state = LAVT["state_dict"]
    if rename is not None:  # the same loader, on a state dict with some tensors swapped
        state = {rename.get(k, k): v for k, v in state.items()}
    mracl.load_official_lavt(model, state)
    return model.eval()


def lavt_differences(model):
    words, mask = LAVT["words"].transpose(1, 2), LAVT["word_mask"][..., 0].bool()  # (B, L, C_w)
    with torch.no_grad():
        stages = model.fusion(model.backbone, LAVT["images"], words, mask)
        logits = model.decoder(stages)
        model.decoder.train()
        train_logits = model.decoder(stages)
        model.decoder.eval()
    return {"stages": max(float((a - b).abs().max()) for a, b in zip(stages, LAVT["stages"],
                                                                      strict=True)),
            "logits": float((logits - LAVT["logits"]).abs().max()),
            "train_logits": float((train_logits - LAVT["train_logits"]).abs().max())}


def test_lavt_encoder_and_decoder_equal_the_official():
    """LAVT's language-aware Swin (Swin blocks with plain and shifted windows on maps that are not
    multiples of the window, PWAM with padded words, the live gate into the next stage, patch
    merging of odd sizes, the per-stage norms) and its decoder, in eval mode and with batch
    statistics."""
    differences = lavt_differences(our_lavt())
    print(f"LAVT max abs differences {differences} (official {LAVT['repo']} @ {LAVT['commit'][:7]})")
    assert max(differences.values()) <= TOLERANCE


def test_lavt_parity_fails_on_a_broken_port():
    """The first gate's two Linear layers swapped and a padded word left visible to PWAM land
    above the tolerance."""
    swap = {f"backbone.layers.0.res_gate.{a}.weight": f"backbone.layers.0.res_gate.{b}.weight"
            for a, b in ((0, 2), (2, 0))}
    swapped = lavt_differences(our_lavt(swap))["stages"]
    model = our_lavt()
    words, mask = LAVT["words"].transpose(1, 2), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        stages = model.fusion(model.backbone, LAVT["images"], words, mask)
    unmasked = max(float((a - b).abs().max()) for a, b in zip(stages, LAVT["stages"]))
    print(f"gate layers swapped {swapped:.2e}, padded words visible {unmasked:.2e}")
    assert min(swapped, unmasked) > 100 * TOLERANCE


def test_load_official_lavt_lists_what_does_not_match():
    import mracl
    state = dict(LAVT["state_dict"])
    del state["classifier.conv1_1.bias"]
    state["backbone.layers.0.extra.weight"] = torch.zeros(1)
    state["backbone.norm0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        mracl.load_official_lavt(our_lavt().train(), state)
    message = str(error.value)
    assert "no place for backbone.layers.0.extra.weight" in message
    assert "nothing for decoder.classifier.bias" in message
    assert "backbone.hidden_states_norms.stage1.weight (8,) <- backbone.norm0.weight (3,)" in message


def test_lavt_weighted_cross_entropy_equals_the_official():
    """mracl.segmentation_loss (no padding: LAVT's square inputs have none) against train.py's
    criterion on the official decoder's logits; class weights swapped must differ."""
    import mracl
    cfg = mracl.Config()
    targets = [{"masks": t[None]} for t in LAVT["target"]]  # one (1, h, w) mask per image
    pad_mask = torch.zeros_like(LAVT["target"], dtype=torch.bool)
    ours = mracl.segmentation_loss(cfg, LAVT["logits"], targets, pad_mask)
    swapped = mracl.segmentation_loss(mracl.Config(w_background=cfg.w_target, w_target=cfg.w_background),
                                      LAVT["logits"], targets, pad_mask)
    print(f"LAVT cross-entropy: ours {float(ours):.6f}, official {float(LAVT['loss']):.6f}")
    assert abs(float(ours - LAVT["loss"])) <= TOLERANCE < abs(float(swapped - LAVT["loss"]))


# ------------------------------------------------------------------------------ DsHmp
DSHMP = load("dshmp")


def test_dshmp_matching_equals_the_official_where_its_permutation_is_right():
    """Eq. (3) on frames that swap the first frame's tokens in pairs (a permutation that is its own
    inverse): dshmp.align_tokens orders every frame as the official `sort_embedding` does."""
    import dshmp
    case = DSHMP["matching"]["swaps"]
    frames = case["frames"]  # (T, Q, C)
    perm = dshmp.align_tokens(frames[None])[0]  # (T, Q)
    ours = torch.stack([frames[t, perm[t]] for t in range(len(frames))])
    print(f"swaps: max abs difference {float((ours - case['aligned']).abs().max()):.2e}")
    assert torch.equal(ours, case["aligned"])


def test_dshmp_matching_differs_from_the_official_on_a_cycle_as_documented():
    """On a 3-cycle the official code applies the inverse of the permutation it found (dshmp.py's
    align_tokens docstring; the official builds the cost as (previous, current), transposes it and
    indexes the current frame with the result): its frame 1 is ours permuted by the inverse, and
    its trajectories leave the first frame's tokens, while ours keep them."""
    import dshmp
    case = DSHMP["matching"]["cycle"]
    frames, official = case["frames"], case["aligned"]  # (T, Q, C)
    perm = dshmp.align_tokens(frames[None])[0]  # (T, Q)
    ours = torch.stack([frames[t, perm[t]] for t in range(len(frames))])
    assert torch.equal(official[1], frames[1][perm[1].argsort()])  # the inverse permutation
    assert (ours - frames[0]).abs().max() < 0.1  # ours: every frame aligned to frame 0's tokens
    assert (official[1:] - frames[0]).abs().max() > 1.0  # the official's: not


def test_dshmp_frame_attention_equals_the_official():
    """Eqs. (4)-(5): dshmp.frame_attention against the official `get_attn` (softmax over the
    frames per word, frame weights summed over the words, rows renormalised by them), each
    trajectory with its own keys and values; a softmax over the words instead must differ."""
    import dshmp
    a = DSHMP["attention"]
    outs, weights = [], []
    for q, k, v in zip(a["q"], a["k"], a["v"]):  # (W, C), (M, C), (M, C)
        valid, words = torch.ones(1, 1, len(q), dtype=torch.bool), torch.ones(1, len(k), dtype=torch.bool)
        out, weight = dshmp.frame_attention(q[None, None], k[None], v[None], valid, words)
        outs.append(out[0, 0])
        weights.append(weight[0, 0])
    difference = max(float((torch.stack(outs) - a["out"]).abs().max()),
                     float((torch.stack(weights) - a["weight"]).abs().max()))
    print(f"frame attention: max abs difference {difference:.2e} (official {DSHMP['repo']} @ "
          f"{DSHMP['commit'][:7]})")
    assert difference <= TOLERANCE
    over_words = (a["q"] @ a["k"].transpose(1, 2) / a["q"].shape[-1] ** 0.5).softmax(-1) @ a["v"]
    assert float((over_words - a["out"]).abs().max()) > 100 * TOLERANCE


# ------------------------------------------------------------------------------ VATEX
VATEX = load("vatex")


# The official BAT's two attentions (vatex/modeling/attention/visual_lang.py) -> ours, both
# nn.MultiheadAttention; written here while no VATEX checkpoint loader needs it (it would belong in
# vatex.py with the rest of the CMD's key map).
BAT_KEYS = {f"{official}.{p}": f"{ours}.{p}"
            for official, ours in (("multihead_attn_text_1", "text_attn"),
                                   ("multihead_attn_visual_1", "visual_attn"))
            for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}


def our_bat(edit=None):
    import vatex
    bat = vatex.BAT(dim=VATEX["sizes"]["dim"], heads=VATEX["sizes"]["heads"])
    pairs = dict(BAT_KEYS)
    if edit is not None:
        pairs = edit(pairs)
    bat.load_state_dict({ours: VATEX["state_dict"][theirs] for theirs, ours in pairs.items()})
    assert set(pairs) == set(VATEX["state_dict"])
    return bat


def bat_difference(bat, case, word_mask):
    """Our BAT in our layout (N, HW, C), (N, L, C) against the official outputs."""
    with torch.no_grad():
        pixels, words = bat(VATEX["visual"].transpose(0, 1), VATEX["words"].transpose(0, 1),
                            VATEX["word_pos"].transpose(0, 1), word_mask)
    return max(float((pixels - case["pixels"].transpose(0, 1)).abs().max()),
               float((words - case["words"].transpose(0, 1)).abs().max()))


def test_vatex_bat_equals_the_official_without_padded_words():
    """Eqs. (2)-(3): the words attend to the pixels and are gated by themselves, the pixels attend
    to the updated words and are gated by themselves (BAT_KEYS); on a batch without
    padded words. The two attentions swapped in the key map must differ."""
    case = VATEX["cases"]["no_padding"]
    mask = torch.ones(2, 5, dtype=torch.bool)
    difference = bat_difference(our_bat(), case, mask)
    swapped = bat_difference(our_bat(lambda pairs: {t: o.replace("text_attn", "X").replace(
        "visual_attn", "text_attn").replace("X", "visual_attn") for t, o in pairs.items()}), case, mask)
    print(f"BAT: max abs difference {difference:.2e}, attentions swapped {swapped:.2e} (official "
          f"{VATEX['repo']} @ {VATEX['commit'][:7]})")
    assert difference <= TOLERANCE < swapped / 100


def test_vatex_bat_differs_from_the_official_on_padded_words_as_documented():
    """vatex.py's Deviations: our key-padding mask is bool (pads blocked); the official one is the
    float caption mask, which PyTorch adds to the logits (pads attended with +1). The word update
    (Eq. 2, no mask on either side) is the same; the pixels' update differs only where a sample
    has pads."""
    case = VATEX["cases"]["padding"]
    mask = case["word_mask"] == 0  # (N, L) True on real words
    with torch.no_grad():
        pixels, words = our_bat()(VATEX["visual"].transpose(0, 1), VATEX["words"].transpose(0, 1),
                                  VATEX["word_pos"].transpose(0, 1), mask)
    official_pixels, official_words = case["pixels"].transpose(0, 1), case["words"].transpose(0, 1)
    assert float((words - official_words).abs().max()) <= TOLERANCE
    assert float((pixels[0] - official_pixels[0]).abs().max()) <= TOLERANCE  # sample 0: no pads
    assert float((pixels[1] - official_pixels[1]).abs().max()) > 100 * TOLERANCE
