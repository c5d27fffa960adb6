"""Parity with the official code: tests/fixtures/parity/ holds small official modules (seeded
random weights under the official key names), their inputs and their outputs, written by
tests/parity/make_fixtures.py from a mirror of the official repository. Each test loads the
official weights into our module through a key map (the project's own where it loads
official checkpoints: VITA, LAVT; VATEX's here), runs the same inputs and
compares (fp32, max abs difference at most 1e-4); a deliberately broken variant of each must land
above that tolerance, so the comparison can fail. Each test prints its differences as `PARITY |`
lines (`report`), from which tests/parity/parity_table.py writes the parity table of
tests/bench/README.md: `python tests/parity/parity_table.py --readme tests/bench/README.md`."""
from pathlib import Path

import pytest
import torch

from common.backbones import official_swin_keys, param_keys
from common.lavt import official_fusion_keys
from common.vita import build_vita, official_vita_key_map

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"
TOLERANCE = 1e-4


def load(name):
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def report(module, fixture, difference, broken=False):
    """One line of the parity table: the max abs difference of our `module` from the official
    code of `fixture` (broken=True: of a deliberately broken variant)."""
    print(f"PARITY | {module} | {fixture['repo']} @ {fixture['commit'][:7]} | "
          f"{'broken' if broken else 'ours'} | {difference:.1e}")


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
    report("VITA module: Object Encoder (train, test), Object Decoder, heads", VITA, difference)
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
    report("VITA module: Object Encoder (train, test), Object Decoder, heads", VITA, min(swapped, other_window, no_shift), broken=True)
    assert min(swapped, other_window, no_shift) > 100 * TOLERANCE


# ------------------------------------------------------------------------------ VITA, whole model
VITA_FULL = load("vita_full")


def our_vita_full(rename=None):
    """Our VITA (common.vita.build_vita) at the fixture's sizes, eval mode, loaded from the official
    state dict by the project's converter (common.vita.load_official_vita); `rename` maps official
    keys to other official keys first (the broken variants)."""
    from common.vita import load_official_vita
    state = VITA_FULL["state_dict"]
    if rename is not None:  # the same loader, on a state dict with some tensors swapped
        state = {rename.get(k, k): v for k, v in state.items()}
    model = build_vita(VITA_FULL["sizes"]).eval()
    load_official_vita(model, state)
    return model


def vita_full_differences(model) -> dict:
    """Our VITA on the fixture's clip (uint8 frames normalised with detectron2's pixel mean and std
    as the official `Vita.inference` does) against the official outputs: {output: max abs
    difference}; the frame decoder's earlier predictions and the video masks of all video queries
    included."""
    mean, std = (VITA_FULL[k].view(-1, 1, 1) for k in ("pixel_mean", "pixel_std"))
    frames = (VITA_FULL["frames"] - mean) / std  # (T, 3, H, W)
    with torch.no_grad():
        out = model(frames[None])  # one clip
        mask_embed = model.mask_embed(out["video_queries"])[0]  # (V, D)
    frame, official = out["frame_outputs"], VITA_FULL["frame_outputs"]
    pairs = {  # ours (batch of T frames / one clip), official
        "frame pred_logits": (frame["pred_logits"], official["pred_logits"]),  # (T, Q, K+1)
        "frame pred_masks": (frame["pred_masks"], official["pred_masks"]),  # (T, Q, h, w)
        "frame queries": (frame["query_embeds"][-1], official["frame_queries"]),  # (T, Q, C)
        "VITA mask features": (out["mask_features"][0], VITA_FULL["mask_features"]),
        "video pred_logits": (out["pred_logits"][0], VITA_FULL["pred_logits"]),  # (V, K+1)
        "video pred_masks": (out["pred_masks"][0], VITA_FULL["pred_masks"]),  # (V, T, h, w)
        "video mask embed": (mask_embed, VITA_FULL["pred_mask_embed"]),  # (V, D)
        "sim_frame": (out["sim_frame"][0], VITA_FULL["pred_fq_embed"]),  # (T, Q, C)
        "sim_video": (out["sim_video"][0], VITA_FULL["pred_cq_embed"]),  # (V, C)
    }
    differences = {k: float((a - b).abs().max()) for k, (a, b) in pairs.items()}
    for key, name in (("pred_logits", "aux_logits"), ("pred_masks", "aux_masks")):
        differences[f"frame aux {key}"] = max(
            float((a[key] - b).abs().max())
            for a, b in zip(frame["aux_outputs"], official[name], strict=True))
    return differences


def test_vita_whole_model_equals_the_official():
    """VITA's whole inference path (official vita_model.py `Vita.inference`): Swin with padded and
    shifted windows in every stage, the deformable pixel decoder (official pure-PyTorch sampling),
    Mask2Former's masked-attention decoder on every frame (the resized mask logits that set its
    attention masks are at least 8e-4 from 0 in this clip), the VITA module (one padded frame, a shifted-window layer) and
    the video logits and masks, every official tensor loaded by load_official_vita. The
    deviations documented in common/vita.py coincide with the official code at test: frame queries
    from the last layer (official: the last 3 in training only), VITA's masks from the raw pixel
    decoder map (official `clip_mask_features`), shifted windows in the Object Encoder's odd
    layers; so every output is compared."""
    differences = vita_full_differences(our_vita_full())
    print("VITA whole model, max abs differences: " + ", ".join(
        f"{k} {v:.1e}" for k, v in differences.items())
        + f" (official {VITA_FULL['repo']} @ {VITA_FULL['commit'][:7]})")
    report("VITA whole inference path: Swin, pixel decoder, frame decoder, VITA, video masks", VITA_FULL, max(differences.values()))
    assert max(differences.values()) <= TOLERANCE


def test_vita_whole_model_parity_fails_on_a_broken_port():
    """The second Swin block of stage 1 without its window shift, and the pixel decoder's two
    FPN GroupNorms (adapter_1.norm, layer_1.norm) swapped in the checkpoint, land far above the
    tolerance."""
    model = our_vita_full()
    model.pixel_level.backbone.swin.encoder.layers[0].blocks[1].shift_size = 0
    no_shift = max(vita_full_differences(model).values())
    norms = {f"sem_seg_head.pixel_decoder.{a}.norm.{p}": f"sem_seg_head.pixel_decoder.{b}.norm.{p}"
             for a, b in (("adapter_1", "layer_1"), ("layer_1", "adapter_1"))
             for p in ("weight", "bias")}
    swapped = max(vita_full_differences(our_vita_full(norms)).values())
    print(f"no shift in stage 1 {no_shift:.2e}, FPN norms swapped {swapped:.2e}")
    report("VITA whole inference path: Swin, pixel decoder, frame decoder, VITA, video masks", VITA_FULL, min(no_shift, swapped), broken=True)
    assert min(no_shift, swapped) > 100 * TOLERANCE


# ------------------------------------------------------------------------------ LAVT
LAVT = load("lavt")


# The official LAVT's visual encoder and decoder (yz93/LAVT-RIS lib/backbone.py and
# lib/mask_predictor.py) under its model's names (`backbone.`, `classifier.`); its BERT is not
# mapped (train.py saves it as 'bert_model', or inside 'model' as `text_encoder.` for LAVTOne).
# LAVT builds a gate on the last stage too and never uses it: not loaded.
OFFICIAL_LAVT_KEYS_NOT_LOADED = ("backbone.layers.3.res_gate.0.weight",
                                 "backbone.layers.3.res_gate.2.weight")


def official_lavt_key_map(model) -> dict:
    """Official LAVT key -> our key(s) of `model.state_dict()` (as common.vita's map: several keys
    of ours cut the official tensor along dim 0): the Swin (common.backbones.official_swin_keys),
    PWAM and the gates (common.lavt.official_fusion_keys), and the decoder (SimpleDecoding)."""
    pairs = [(f"backbone.{t}", [f"backbone.{o}" for o in ours])
             for t, ours in official_swin_keys(model.backbone)]
    pairs += [(t, [f"fusion.{o}" for o in ours]) for t, ours in official_fusion_keys(model.fusion)]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for k, level in enumerate((4, 3, 2)):  # conv1_4 ... bn2_2: our blocks 0, 1, 2
        for j, (conv, norm) in enumerate(((f"conv1_{level}", f"bn1_{level}"),
                                          (f"conv2_{level}", f"bn2_{level}"))):
            pairs += param_keys(f"classifier.{conv}", f"decoder.blocks.{k}.{3 * j}", ("weight",))
            pairs += param_keys(f"classifier.{norm}", f"decoder.blocks.{k}.{3 * j + 1}", bn)
    pairs += param_keys("classifier.conv1_1", "decoder.classifier")
    return dict(pairs)


def load_official_lavt(model, official_state: dict) -> None:
    """Load the official LAVT's `backbone.` and `classifier.` tensors (of a checkpoint's 'model';
    leave LAVTOne's `text_encoder.` ones out) into `model`; its BERT and MRaCL's projection are
    left as they are. Raises ValueError listing every official key with no place, every key of
    ours left without a tensor and every size that differs."""
    key_map, own = official_lavt_key_map(model), model.state_dict()
    buffers = dict(model.named_buffers())  # Swin's relative_position_index: compared, not loaded
    problems = [f"no place for {k}" for k in official_state
                if k not in key_map and k not in OFFICIAL_LAVT_KEYS_NOT_LOADED]
    problems += [f"nothing for {ours}" for theirs, targets in key_map.items()
                 if theirs not in official_state for ours in targets]
    converted = {}
    for theirs, targets in key_map.items():
        if theirs not in official_state:
            continue
        value = torch.as_tensor(official_state[theirs])
        for ours, part in zip(targets, value.chunk(len(targets)) if len(targets) > 1 else [value]):
            if ours in own and part.numel() != own[ours].numel():
                problems.append(f"{ours} {tuple(own[ours].shape)} <- {theirs} {tuple(part.shape)}")
            elif ours in own:
                converted[ours] = part.reshape(own[ours].shape)
            elif not torch.equal(part.flatten(), buffers[ours].flatten()):
                problems.append(f"{theirs} differs from our {ours} (another window size?)")
    if problems:
        raise ValueError("the official LAVT weights do not match this model:\n  "
                         + "\n  ".join(problems))
    model.load_state_dict(converted, strict=False)


def our_lavt(rename=None):
    """MRaCL's LAVT at the fixture's sizes (no text encoder: the words are given), loaded from the
    official state dict by load_official_lavt (official_lavt_key_map); `rename` maps
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
    load_official_lavt(model, state)
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
    report("LAVT language-aware Swin (Swin blocks, PWAM, gate, patch merging), SimpleDecoding", LAVT, max(differences.values()))
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
    report("LAVT language-aware Swin (Swin blocks, PWAM, gate, patch merging), SimpleDecoding", LAVT, min(swapped, unmasked), broken=True)
    assert min(swapped, unmasked) > 100 * TOLERANCE


def test_load_official_lavt_lists_what_does_not_match():
    state = dict(LAVT["state_dict"])
    del state["classifier.conv1_1.bias"]
    state["backbone.layers.0.extra.weight"] = torch.zeros(1)
    state["backbone.norm0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        load_official_lavt(our_lavt().train(), state)
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
    report("LAVT weighted cross-entropy", LAVT, abs(float(ours - LAVT["loss"])))
    report("LAVT weighted cross-entropy", LAVT, abs(float(swapped - LAVT["loss"])), broken=True)
    assert abs(float(ours - LAVT["loss"])) <= TOLERANCE < abs(float(swapped - LAVT["loss"])) / 100


# ------------------------------------------------------------------------------ DsHmp
DSHMP = load("dshmp")


def test_dshmp_matching_equals_the_official_where_its_permutation_is_right():
    """Eq. (3) on frames that swap the first frame's tokens in pairs (a permutation that is its own
    inverse): dshmp.align_tokens orders every frame as the official `sort_embedding` does; the
    frames left unmatched (a broken port: no Eq. 3) differ."""
    import dshmp
    case = DSHMP["matching"]["swaps"]
    frames = case["frames"]  # (T, Q, C)
    perm = dshmp.align_tokens(frames[None])[0]  # (T, Q)
    ours = torch.stack([frames[t, perm[t]] for t in range(len(frames))])
    unmatched = float((frames - case["aligned"]).abs().max())
    print(f"swaps: max abs difference {float((ours - case['aligned']).abs().max()):.2e}")
    report("DsHmp Eq. (3) matching, a permutation the official code inverts correctly", DSHMP,
           float((ours - case["aligned"]).abs().max()))
    report("DsHmp Eq. (3) matching, a permutation the official code inverts correctly", DSHMP,
           unmatched, broken=True)
    assert torch.equal(ours, case["aligned"]) and unmatched > 100 * TOLERANCE


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
    over_words = (a["q"] @ a["k"].transpose(1, 2) / a["q"].shape[-1] ** 0.5).softmax(-1) @ a["v"]
    broken = float((over_words - a["out"]).abs().max())
    report("DsHmp Eqs. (4)-(5) frame attention and frame weights", DSHMP, difference)
    report("DsHmp Eqs. (4)-(5) frame attention and frame weights", DSHMP, broken, broken=True)
    assert difference <= TOLERANCE < broken / 100


# ------------------------------------------------------------------------------ VATEX
VATEX = load("vatex")


# VATEX's key maps (the BAT's, the CMD's, the decoder's) are written here, with their only user:
# the repository has no loader of the official VATEX checkpoint (one would bring them to vatex.py).
# The official BAT's two attentions (vatex/modeling/attention/visual_lang.py) -> ours, both
# nn.MultiheadAttention.
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
    report("VATEX BAT, Eqs. (2)-(3), no padded words", VATEX, difference)
    report("VATEX BAT, Eqs. (2)-(3), no padded words", VATEX, swapped, broken=True)
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


# ------------------------------------------------------------------------------ VATEX CMD
VATEX_CMD = load("vatex_cmd")
STAGES = ("res2", "res3", "res4", "res5")


def cmd_key_map(cmd) -> dict:
    """Official key -> our key(s) of `cmd.state_dict()` (as common.vita's map), for its number of
    encoder layers: the official modeling/pixel_decoder/cmd.py, ContextualMultimodalDecoder (in a
    checkpoint under `sem_seg_head.pixel_decoder.`; ours: VATEX's `pixel_decoder.`). Its FPN
    modules are numbered fine to coarse (adapter_1, layer_1 on res2), ours coarse to fine; its
    fusion2_4 is level 1's BAT. fuse.0, Eq. (4)'s conv at level 1, has no official counterpart
    (Deviations); with --no-cmd the official word attentions have no place."""
    def bat(theirs, module, ours):  # BAT_KEYS; an early BAT has no word attention
        return [(f"{theirs}.{t}", [f"{ours}.{o}"]) for t, o in BAT_KEYS.items()
                if module.text_attn is not None or not o.startswith("text_attn")]

    pairs = [("transformer.level_embed", ["level_embed"])]
    for i in range(3):  # res5, res4, res3 on both sides
        pairs += [*param_keys(f"input_proj.{i}.0", f"input_proj.{i}.0"),
                  *param_keys(f"input_proj.{i}.1", f"input_proj.{i}.1"),
                  *bat(f"fusion_{i + 1}", cmd.early_bats[i], f"early_bats.{i}")]
    for i in range(len(cmd.encoder.layers)):  # msdeformattn.py -> transformers' encoder
        theirs, ours = f"transformer.encoder.layers.{i}.", f"encoder.layers.{i}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            pairs += param_keys(theirs + f"self_attn.{name}", ours + f"self_attn.{name}")
        for official, name in (("norm1", "self_attn_layer_norm"), ("linear1", "fc1"),
                               ("linear2", "fc2"), ("norm2", "final_layer_norm")):
            pairs += param_keys(theirs + official, ours + name)
    pairs += bat("fusion2_4", cmd.bats[0], "bats.0")
    for i in (1, 2, 3):  # levels 2-4: 1/16, 1/8, 1/4; bias-free convs with a GroupNorm
        pairs += bat(f"fusion2_{i}", cmd.bats[i], f"bats.{i}")
        for official, ours in ((f"adapter_{4 - i}", f"lateral.{i - 1}"),
                               (f"layer_{4 - i}", f"fuse.{i}")):
            pairs += [(f"{official}.weight", [f"{ours}.0.weight"]),
                      *param_keys(f"{official}.norm", f"{ours}.1")]
    pairs += param_keys("mask_features", "mask_proj")
    return dict(pairs)


def load_mapped(module, key_map, official, strict=True):
    """Load the official state dict into `module` through `key_map` (official key -> [our key]),
    asserting that the map uses every official tensor; returns load_state_dict's result."""
    assert set(key_map) == set(official), set(key_map) ^ set(official)
    return module.load_state_dict({ours[0]: official[theirs] for theirs, ours in key_map.items()},
                                  strict=strict)


def our_cmd(edit=None):
    """Our ContextualMultimodalDecoder at the fixture's sizes, loaded from the official state dict
    through cmd_key_map (`edit` changes the map first: the broken variants), fuse.0
    (Eq. 4's conv at level 1, which cmd.py does not have: vatex.py's Deviations) replaced by the
    identity."""
    import vatex
    s, stages = VATEX_CMD["sizes"], VATEX_CMD["stages"]
    cmd = vatex.ContextualMultimodalDecoder(
        in_channels=[stages[k][0] for k in STAGES], dim=s["conv_dim"],
        heads=s["transformer_nheads"], encoder_layers=s["transformer_enc_layers"],
        encoder_ffn_dim=s["transformer_dim_feedforward"])
    key_map = cmd_key_map(cmd)
    result = load_mapped(cmd, edit(key_map) if edit else key_map, VATEX_CMD["state_dict"],
                         strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["fuse.0.0.weight", "fuse.0.1.bias", "fuse.0.1.weight"]
    cmd.fuse[0] = torch.nn.Identity()
    return cmd.eval()


def cmd_differences(cmd):
    """Max abs difference per output: levels 1-4 (level 4 as the input of the mask projection),
    the mask features and the words F_4^w; in our layout (N, L, C)."""
    f, level4 = VATEX_CMD, []
    hook = cmd.mask_proj.register_forward_hook(lambda module, args, out: level4.append(args[0]))
    with torch.no_grad():
        out = cmd([f["features"][k] for k in STAGES], f["words"].transpose(0, 1),
                  f["word_pos"].transpose(0, 1), f["word_mask"] == 0)
    hook.remove()
    differences = {f"level {i + 1}": float((ours - theirs).abs().max()) for i, (ours, theirs) in
                   enumerate(zip([*out["features"], level4[0]], f["levels"], strict=True))}
    differences["mask_features"] = float((out["mask_features"] - f["mask_features"]).abs().max())
    differences["words"] = float((out["words"] - f["out_words"].transpose(0, 1)).abs().max())
    return differences


def swap(key_map, a, b):
    """The key map with the official modules `a` and `b` exchanged."""
    other = {a: b, b: a}
    return {next((other[p] + t[len(p):] for p in other if t.startswith(p + ".")), t): ours
            for t, ours in key_map.items()}


def test_vatex_cmd_equals_the_official_without_padded_words():
    """The CMD (cmd_key_map): the early BATs on res5, res4, res3, the deformable
    encoder (transformers' against msdeformattn.py with the official pure-PyTorch sampling), each
    level's BAT (Eqs. 2-3), the lateral convs, the bilinear upsampling and the FPN convs (Eq. 4),
    the mask projection and the words the BATs update, on maps no level divides evenly. Level 1
    is compared without our fuse.0 (the official code has no conv there; as each level adds the
    upsampled one before, the conv would carry into levels 2-4): its BAT's output. No padded
    words: there the BAT's float mask differs as documented (test_vatex_bat_differs_...)."""
    differences = cmd_differences(our_cmd())
    print(f"CMD max abs differences { {k: f'{v:.1e}' for k, v in differences.items()} } "
          f"(official {VATEX_CMD['repo']} @ {VATEX_CMD['commit'][:7]})")
    report("VATEX CMD: early BATs, deformable encoder, levels 2-4 (Eq. 4), no padded words", VATEX_CMD, max(differences.values()))
    assert max(differences.values()) <= TOLERANCE


def test_vatex_cmd_parity_fails_on_a_broken_port():
    """The BATs of levels 2 and 3 swapped in the key map, or the GroupNorms of their FPN convs,
    land far above the tolerance."""
    bats = max(cmd_differences(our_cmd(lambda m: swap(m, "fusion2_1", "fusion2_2"))).values())
    norms = max(cmd_differences(our_cmd(lambda m: swap(m, "layer_3.norm", "layer_2.norm")))
                .values())
    print(f"CMD: level BATs swapped {bats:.2e}, FPN norms swapped {norms:.2e}")
    report("VATEX CMD: early BATs, deformable encoder, levels 2-4 (Eq. 4), no padded words", VATEX_CMD, min(bats, norms), broken=True)
    assert min(bats, norms) > 100 * TOLERANCE


# ------------------------------------------------------------------------------ VATEX decoder
VATEX_DECODER = load("vatex_decoder")


def decoder_key_map(decoder) -> dict:
    """Official key -> our key(s) of `decoder.state_dict()`, for its number of layers: the official
    modeling/transformer_decoder/vatext_trans_decoder.py, VATEXTransformerDecoder (in a checkpoint
    under `sem_seg_head.predictor.`; ours: VATEX's `decoder.`). Its three lists of per-layer
    modules are our layers' parts; its input projections are identities (C in = C), as ours."""
    attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    pairs = [("query_embed.weight", ["query_pos.weight"]),
             ("level_embed.weight", ["level_embed.weight"]),
             *param_keys("decoder_norm", "decoder_norm"), *param_keys("class_embed", "class_head")]
    for j in range(len(decoder.mask_embed.layers)):
        pairs += param_keys(f"mask_embed.layers.{j}", f"mask_embed.layers.{j}")
    for i in range(len(decoder.layers)):
        cross, ours = f"transformer_cross_attention_layers.{i}", f"layers.{i}"
        pairs += [*param_keys(f"{cross}.multihead_attn", f"{ours}.cross_attn", attn),
                  *param_keys(f"{cross}.multihead_attn_text", f"{ours}.word_attn", attn),
                  *param_keys(f"{cross}.norm", f"{ours}.cross_norm"),
                  *param_keys(f"transformer_self_attention_layers.{i}.self_attn",
                              f"{ours}.self_attn", attn),
                  *param_keys(f"transformer_self_attention_layers.{i}.norm", f"{ours}.self_norm")]
        for official, name in (("linear1", "ffn.0"), ("linear2", "ffn.3"), ("norm", "ffn_norm")):
            pairs += param_keys(f"transformer_ffn_layers.{i}.{official}", f"{ours}.{name}")
    return dict(pairs)


def our_vatex_decoder(edit=None):
    """Our VatexDecoder at the fixture's sizes, loaded (strict) from the official state dict
    through decoder_key_map (`edit` changes the map first: the broken variants)."""
    import vatex
    s = VATEX_DECODER["sizes"]
    decoder = vatex.VatexDecoder(hidden_dim=s["hidden_dim"], num_queries=s["num_queries"],
                                 num_layers=s["dec_layers"], num_heads=s["nheads"],
                                 ffn_dim=s["dim_feedforward"])
    key_map = decoder_key_map(decoder)
    load_mapped(decoder, edit(key_map) if edit else key_map, VATEX_DECODER["state_dict"])
    return decoder


def vatex_decoder_difference(decoder, case):
    """Max abs difference over every prediction (the one from the sentence-feature queries, then
    each layer's): class logits and mask logits. Our positions of the levels are our own (the
    2-D sine the CMD gives the decoder); the words in our layout (N, L, C), the mask True on the
    real words."""
    from common.backbones import sine_position_embedding
    f = VATEX_DECODER
    prior = f["list_vis"][0] if case == "prior" else None  # (N, C)
    with torch.no_grad():
        out = decoder(f["maps"], [sine_position_embedding(m, m.shape[1]) for m in f["maps"]],
                      f["mask_features"], f["sentence"], prior, f["words"].transpose(0, 1),
                      f["word_pos"].transpose(0, 1), ~f["word_mask"])
    predictions = [*out["aux_outputs"], out]
    theirs = f["cases"][case]
    assert len(predictions) == len(theirs["pred_logits"])
    return max(max(float((p["pred_logits"] - logits).abs().max()),
                   float((p["pred_masks"] - masks).abs().max()))
               for p, logits, masks in zip(predictions, theirs["pred_logits"],
                                           theirs["pred_masks"], strict=True))


@pytest.mark.parametrize("case", ["prior", "no_prior"])
def test_vatex_decoder_equals_the_official(case):
    """Sec. 3.4's decoder (decoder_key_map): the queries = the sentence feature F_s
    repeated, the first prediction, the CLIP prior added to every query (case "prior"; "no_prior":
    --no-clip-prior, the official list_vis None), then per layer the visual (masked from the
    second layer on, an all-blocked row unblocked) and word cross-attention summed under one
    LayerNorm, self-attention, FFN, and the class and mask heads of every prediction, round robin
    over levels 1-3 of sizes that do not divide the mask features'. With padded words: the
    official decoder's word mask is the caption's bool mask (True on a pad), the same as ours,
    so the BAT's float-mask deviation does not arise here. No other documented deviation is in
    the decoder; the official positions are the 3-D sine of one frame (position_encoding.py),
    which adds one constant vector to every key of a level, a shift of each query's logits that
    the softmax removes: ours (2-D) are compared as they are. Official in training mode (one
    frame per clip; at test it reads a batch as one clip), dropout 0."""
    difference = vatex_decoder_difference(our_vatex_decoder(), case)
    print(f"decoder ({case}): max abs difference {difference:.2e} (official "
          f"{VATEX_DECODER['repo']} @ {VATEX_DECODER['commit'][:7]})")
    report("VATEX decoder (Sec. 3.4), padded words", VATEX_DECODER, difference)
    assert difference <= TOLERANCE


def test_vatex_decoder_parity_fails_on_a_broken_port():
    """The visual and word cross-attention of the second layer swapped in the key map, or the
    LayerNorms of the first layer's cross- and self-attention, land far above the tolerance."""
    attentions = vatex_decoder_difference(our_vatex_decoder(lambda m: swap(
        m, "transformer_cross_attention_layers.1.multihead_attn",
        "transformer_cross_attention_layers.1.multihead_attn_text")), "prior")
    norms = vatex_decoder_difference(our_vatex_decoder(lambda m: swap(
        m, "transformer_cross_attention_layers.0.norm",
        "transformer_self_attention_layers.0.norm")), "prior")
    print(f"decoder: cross-attentions swapped {attentions:.2e}, norms swapped {norms:.2e}")
    report("VATEX decoder (Sec. 3.4), padded words", VATEX_DECODER, min(attentions, norms),
           broken=True)
    assert min(attentions, norms) > 100 * TOLERANCE


# ------------------------------------------------------------------------------ VATEX MCC loss
VATEX_MCC = load("vatex_mcc")


def infonce_difference(triplets):
    """Our `--mcc-loss infonce` (vatex.infonce_loss at the Config's temperature) on the fixture's
    sentence features: max abs difference of the loss and of its gradient from the official."""
    import vatex
    sentence = VATEX_MCC["sentence"].clone().requires_grad_()
    loss = vatex.infonce_loss(sentence, triplets, vatex.Config().mcc_temperature)
    loss.backward()
    return max(float((loss.detach() - VATEX_MCC["loss"]).abs()),
               float((sentence.grad - VATEX_MCC["grad"]).abs().max()))


def test_vatex_infonce_equals_the_official_mcc_loss():
    """The official MCC (criterion.py loss_contrastive: the `info-nce-pytorch` InfoNCE, unpaired
    negatives, temperature 0.1, both ways) against ours, loss and gradient, on one process, where
    the official all-gather (vatex.py's Deviations: ours takes this process's negatives) is the
    identity, and with a negative in every triplet (the official "None" caption of a triplet
    without one is the other deviation: none here). The official caption order per image is
    (expression, negative, positive); our triplets name them. Read in our own order instead
    (positive and negative exchanged), the loss lands far above the tolerance. Our default
    temperature is the official InfoNCE's."""
    import vatex
    assert vatex.Config().mcc_temperature == VATEX_MCC["temperature"]
    T = len(VATEX_MCC["sentence"]) // 3
    official = torch.tensor([[3 * t, 3 * t + 2, 3 * t + 1] for t in range(T)])  # p1, p2, n
    difference = infonce_difference(official)
    swapped = infonce_difference(official[:, [0, 2, 1]])
    print(f"MCC InfoNCE: max abs difference {difference:.2e}, positive and negative exchanged "
          f"{swapped:.2e} (official {VATEX_MCC['repo']} @ {VATEX_MCC['commit'][:7]})")
    report("VATEX MCC, official symmetric InfoNCE (--mcc-loss infonce), one process", VATEX_MCC,
           difference)
    report("VATEX MCC, official symmetric InfoNCE (--mcc-loss infonce), one process", VATEX_MCC,
           swapped, broken=True)
    assert difference <= TOLERANCE < swapped / 100
