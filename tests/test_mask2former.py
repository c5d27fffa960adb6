"""common/mask2former.py: our masked-attention decoder equals transformers' Mask2Former layer by
layer, loads every decoder weight of the real checkpoint's architecture, and trains."""
import pytest
import torch
from torch import nn
from transformers import Mask2FormerForUniversalSegmentation

from common.backbones import (
    PixelLevel,
    count_parameters,
    load_mask2former,
    parameter_report,
    swin_tiny_coco_config,
    tiny_mask2former_config,
)
from common.mask2former import (
    HF_DECODER_PREFIXES,
    MaskedAttentionDecoder,
    PositionEmbedding,
    decoder_kwargs_from_hf,
    hf_decoder_key_map,
    load_decoder_weights,
    mask_position,
)

TOL = 1e-4


def pixel_level_state_dict(hf_state_dict: dict) -> dict:
    """`PixelLevel`'s state dict taken from a `Mask2FormerForUniversalSegmentation` state dict: its
    children `backbone` and `pixel_decoder` are transformers' `encoder` and `decoder`."""
    renamed = {}
    for key, value in hf_state_dict.items():
        for theirs, ours in (("model.pixel_level_module.encoder.", "backbone."),
                             ("model.pixel_level_module.decoder.", "pixel_decoder.")):
            if key.startswith(theirs):
                renamed[ours + key[len(theirs):]] = value
    return renamed


def _tiny_hf(**overrides):
    torch.manual_seed(0)
    # 4 decoder layers, so the round robin over the 3 levels wraps around once
    config = tiny_mask2former_config(num_queries=6, decoder_layers=5, num_labels=3, dim_feedforward=64, **overrides)
    return Mask2FormerForUniversalSegmentation(config).eval(), config


def _ours_from_hf(hf, config):
    torch.manual_seed(1)  # a different random init, so a weight that is not copied shows up
    pixel_level = PixelLevel(config).eval()
    pixel_level.load_state_dict(pixel_level_state_dict(hf.state_dict()), strict=True)
    decoder = MaskedAttentionDecoder(**decoder_kwargs_from_hf(config)).eval()
    assert load_decoder_weights(decoder, hf.state_dict()) == []
    return pixel_level, decoder


@pytest.mark.parametrize("input_proj", [False, True])
def test_every_layer_equals_transformers(input_proj):
    hf, config = _tiny_hf(enforce_input_projection=input_proj)
    pixel_level, decoder = _ours_from_hf(hf, config)
    assert isinstance(decoder.input_proj[0], nn.Conv2d) == input_proj
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(images, output_hidden_states=True, output_auxiliary_logits=True)
        normed_queries = hf.model(images, output_hidden_states=True).transformer_decoder_intermediate_states
        pix = pixel_level(images)
        out = decoder(pix["features"], pix["pos"], pix["mask_features"])

    # pixel level: 1/32, 1/16, 1/8 in the order the decoder visits them, and the 1/4 mask features
    assert [tuple(f.shape[-2:]) for f in pix["features"]] == [(2, 3), (4, 6), (8, 12)]
    for ours, theirs in zip(pix["features"], ref.pixel_decoder_hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(pix["mask_features"], ref.pixel_decoder_last_hidden_state, atol=TOL, rtol=0)

    # decoder: the prediction from the input queries plus one per layer, every one compared
    ours = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    theirs = ref.auxiliary_logits + [{"class_queries_logits": ref.class_queries_logits,
                                      "masks_queries_logits": ref.masks_queries_logits}]
    assert len(ours) == len(theirs) == 5 and len(out["query_embeds"]) == 5
    for o, t in zip(ours, theirs, strict=True):
        assert o["pred_masks"].shape == (2, 6, 16, 24) and o["pred_logits"].shape == (2, 6, 4)
        torch.testing.assert_close(o["pred_masks"], t["masks_queries_logits"], atol=TOL, rtol=0)
        torch.testing.assert_close(o["pred_logits"], t["class_queries_logits"], atol=TOL, rtol=0)
    for o, t in zip(out["query_embeds"], normed_queries, strict=True):
        torch.testing.assert_close(o, t.transpose(0, 1), atol=TOL, rtol=0)  # theirs is (Q, B, C)

    # The comparison exercises masked attention: the masks block part, not all or none, of the keys.
    initial = decoder.query_feat.weight.expand(2, -1, -1)  # (B, Q, C)
    blocked = decoder.predict(initial, pix["mask_features"], pix["features"][0].shape[-2:])[3]
    assert 0.05 < blocked.float().mean() < 0.95


def test_query_features_from_the_caller():
    hf, config = _tiny_hf()
    pixel_level, decoder = _ours_from_hf(hf, config)
    with torch.no_grad():
        pix = pixel_level(torch.randn(2, 3, 64, 96))
        default = decoder(pix["features"], pix["pos"], pix["mask_features"])
        same = decoder.query_feat.weight.expand(2, -1, -1)
        passed = decoder(pix["features"], pix["pos"], pix["mask_features"], queries=same)
        other = decoder(pix["features"], pix["pos"], pix["mask_features"], queries=torch.randn(2, 6, 32))
    torch.testing.assert_close(passed["pred_masks"], default["pred_masks"])
    assert not torch.allclose(other["pred_masks"], default["pred_masks"], atol=1e-3)
    with pytest.raises(ValueError, match="queries must have shape"):
        decoder(pix["features"], pix["pos"], pix["mask_features"], queries=torch.randn(2, 5, 32))


def test_empty_mask_attends_everywhere():
    decoder = MaskedAttentionDecoder(hidden_dim=8, num_queries=2, num_layers=1, num_heads=2, ffn_dim=16,
                                     num_classes=1, mask_dim=4)
    last = decoder.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))
    mask_features = torch.ones(1, 4, 4, 4)
    mask_features[:, 0, :, :2] = -1.0  # mask logit -1 * feature 0: +1 on the left half, -1 on the right
    # query 0: every pixel at probability sigmoid(-1) < 0.5 would be blocked -> fully unblocked instead
    queries = torch.randn(1, 2, 8)
    _, _, _, attn_mask = decoder.predict(queries, mask_features, (4, 4))
    assert attn_mask.shape == (1 * 2, 2, 16)
    mask_features[:, 0] = 1.0
    _, _, _, empty = decoder.predict(queries, mask_features, (4, 4))
    assert not empty.any()  # all blocked -> attends everywhere
    blocked = attn_mask[0, 0].reshape(4, 4)  # left half has logit +1 (kept), right half -1 (blocked)
    assert not blocked[:, :2].any() and blocked[:, 2:].all()
    assert torch.equal(attn_mask[0], attn_mask[1])  # same mask for every head


def test_loading_covers_the_swin_tiny_checkpoint():
    """Built with the configuration of facebook/mask2former-swin-tiny-coco-instance (random init,
    no download): every parameter name and shape of the real checkpoint is loaded and none is unused."""
    config = swin_tiny_coco_config()
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(config)
    hf_state = hf.state_dict()
    pixel_level = PixelLevel(config)
    decoder = MaskedAttentionDecoder(**decoder_kwargs_from_hf(config))
    assert (decoder.num_queries, len(decoder.layers), decoder.class_head.out_features) == (100, 9, 81)

    pixel_state = pixel_level_state_dict(hf_state)
    pixel_level.load_state_dict(pixel_state, strict=True)  # raises on any missing/unexpected key or shape
    assert load_decoder_weights(decoder, hf_state) == []

    key_map = hf_decoder_key_map(decoder)
    decoder_keys = {k for theirs in key_map.values() for k in theirs}
    pixel_keys = {k for k in hf_state if k.startswith("model.pixel_level_module.")}
    assert len(pixel_state) == len(pixel_keys)
    assert set(key_map) == set(decoder.state_dict())
    assert not decoder_keys & pixel_keys
    assert decoder_keys | pixel_keys == set(hf_state) - {"criterion.empty_weight"}  # the loss's no-object weight
    assert all(k.startswith(HF_DECODER_PREFIXES) for k in decoder_keys)
    theirs = "model.transformer_module.decoder.layers.8.self_attn.k_proj.weight"
    torch.testing.assert_close(decoder.layers[8].self_attn.in_proj_weight[256:512], hf_state[theirs])

    # Parameter counts of the paper configuration equal transformers' module by module.
    ours = count_parameters(nn.ModuleDict({"pixel_level": pixel_level, "decoder": decoder}), depth=2)
    hf_counts = count_parameters(hf, depth=3)
    # the same parameters; ours has the unused final Swin LayerNorm (768 + 768) frozen
    assert ours["pixel_level.backbone"][1] == 2 * 768
    assert sum(ours["pixel_level.backbone"]) == sum(hf_counts["model.pixel_level_module.encoder"])
    assert ours["pixel_level.pixel_decoder"] == hf_counts["model.pixel_level_module.decoder"]
    assert ours["decoder.class_head"] == hf_counts["class_predictor"]
    decoder_total = sum(t for name, (t, _) in ours.items() if name.startswith("decoder.") and name != "decoder.class_head")
    assert decoder_total == sum(p.numel() for p in hf.model.transformer_module.parameters())
    assert sum(t + f for t, f in ours.values()) == sum(p.numel() for p in hf.parameters())
    print("\n" + parameter_report(nn.ModuleDict({"pixel_level": pixel_level, "decoder": decoder}), depth=2))


def test_load_first_queries_and_new_class_head():
    hf, config = _tiny_hf()
    state = hf.state_dict()
    kwargs = decoder_kwargs_from_hf(config)
    # DsHmp: the first 20 of 100 COCO queries and a 2-way class head; here the first 4 of 6, 1 class
    decoder = MaskedAttentionDecoder(**{**kwargs, "num_queries": 4, "num_classes": 1})
    with pytest.raises(ValueError, match="load_class_head=False"):
        load_decoder_weights(decoder, state, num_queries=4)
    left = load_decoder_weights(decoder, state, num_queries=4, load_class_head=False)
    assert sorted(left) == ["class_head.bias", "class_head.weight"]
    torch.testing.assert_close(decoder.query_feat.weight, state["model.transformer_module.queries_features.weight"][:4])
    torch.testing.assert_close(decoder.query_pos.weight, state["model.transformer_module.queries_embedder.weight"][:4])

    full = MaskedAttentionDecoder(**kwargs)
    with pytest.raises(ValueError, match="shapes do not match"):
        load_decoder_weights(full, state, num_queries=4)
    missing = {k: v for k, v in state.items() if not k.endswith("layers.3.fc2.bias")}
    with pytest.raises(ValueError, match=r"missing \['model.transformer_module.decoder.layers.3.fc2.bias'\]"):
        load_decoder_weights(full, missing)
    extra = {**state, "model.transformer_module.decoder.layers.4.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unused \['model.transformer_module.decoder.layers.4.fc1.weight'\]"):
        load_decoder_weights(full, extra)


def test_forward_backward_reaches_every_parameter():
    """2 clips x 8 frames at 96x96 through PixelLevel.tiny and the decoder, on CPU."""
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny()
    decoder = MaskedAttentionDecoder(hidden_dim=32, num_queries=5, num_layers=3, num_heads=4, ffn_dim=64,
                                     num_classes=1, mask_dim=32)
    assert isinstance(decoder.input_proj[0], nn.Identity)  # in_channels defaults to hidden_dim
    frames = torch.randn(2 * 8, 3, 96, 96)  # (B*T, 3, H, W)
    pix = pixel_level(frames)
    out = decoder(pix["features"], pix["pos"], pix["mask_features"])
    assert out["pred_masks"].shape == (16, 5, 24, 24) and out["pred_logits"].shape == (16, 5, 2)
    assert len(out["aux_outputs"]) == 3 and len(out["query_embeds"]) == 4
    assert out["query_embeds"][-1].shape == (16, 5, 32)
    loss = sum(
        (p["pred_masks"] * torch.randn_like(p["pred_masks"])).mean() + p["pred_logits"].logsumexp(-1).mean()
        for p in out["aux_outputs"] + [out]
    )
    loss.backward()
    model = nn.ModuleDict({"pixel_level": pixel_level, "decoder": decoder})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    # The pixel decoder's level embedding only enters the deformable attention's sampling-offset and
    # attention-weight projections, which transformers initialises to zero (Deformable DETR's init),
    # so its first gradient is exactly zero; every other parameter gets a nonzero one.
    zero = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0]
    assert zero == ["pixel_level.pixel_decoder.level_embed"]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "pixel_level.backbone.swin.layernorm.weight", "pixel_level.backbone.swin.layernorm.bias"]


def test_load_mask2former_from_a_local_directory(tmp_path):
    """The real loading path (transformers' from_pretrained on a save_pretrained directory), offline."""
    hf, _ = _tiny_hf()
    hf.save_pretrained(tmp_path)
    pixel_level, decoder_state, config = load_mask2former(str(tmp_path), local_files_only=True)
    assert all(k.startswith(HF_DECODER_PREFIXES) for k in decoder_state)
    decoder = MaskedAttentionDecoder(**decoder_kwargs_from_hf(config))
    load_decoder_weights(decoder, decoder_state)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = hf(images)
        pix = pixel_level.eval()(images)
        out = decoder.eval()(pix["features"], pix["pos"], pix["mask_features"])
    torch.testing.assert_close(out["pred_masks"], ref.masks_queries_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out["pred_logits"], ref.class_queries_logits, atol=TOL, rtol=0)


def test_word_attention_loads_mask2former_weights_and_reads_the_words():
    hf, config = _tiny_hf()
    torch.manual_seed(2)
    decoder = MaskedAttentionDecoder(**decoder_kwargs_from_hf(config), word_attention=True).eval()
    left = load_decoder_weights(decoder, hf.state_dict())
    # the word attention has no Mask2Former counterpart: it alone stays at its initialisation
    assert left and all(".word_attn." in k or ".word_norm." in k for k in left)
    assert len(left) == 6 * len(decoder.layers)  # in_proj and out_proj weight and bias, the norm weight and bias
    torch.testing.assert_close(decoder.layers[0].cross_attn.in_proj_weight,
                               hf.state_dict()["model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight"])
    pixel_level = PixelLevel(config).eval()
    with torch.no_grad():
        pix = pixel_level(torch.randn(2, 3, 64, 96))
        with pytest.raises(ValueError, match="pass words"):
            decoder(pix["features"], pix["pos"], pix["mask_features"])
        words, mask = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True, True, False, False, False]])
        out = decoder(pix["features"], pix["pos"], pix["mask_features"], words=words, word_mask=mask)
        changed = words.clone()
        changed[1, 3:] = 100.0  # words the mask hides change nothing
        same = decoder(pix["features"], pix["pos"], pix["mask_features"], words=changed, word_mask=mask)
        other = decoder(pix["features"], pix["pos"], pix["mask_features"], words=torch.randn(2, 5, 32), word_mask=mask)
    torch.testing.assert_close(same["pred_masks"], out["pred_masks"])
    assert not torch.allclose(other["pred_masks"], out["pred_masks"], atol=1e-3)


# --------------------------------------------------- the --token-position diagnostic (ours)
def test_mask_position_is_the_centre_and_area_of_the_probabilities():
    logits = torch.full((3, 8, 10), -30.0)  # sigmoid(-30) ~ 1e-13: nothing outside the square
    logits[0, 2:4, 6:10] = 30.0  # rows 2-3, columns 6-9
    logits[1, :, :] = 0.0  # p = 0.5 everywhere: centre of the frame, half its area
    pos = mask_position(logits)  # logits[2]: empty
    torch.testing.assert_close(pos[0], torch.tensor([8 / 10, 3 / 8, 8 / 80]))  # pixel centres 6.5..9.5
    torch.testing.assert_close(pos[1], torch.tensor([0.5, 0.5, 0.5]))
    assert not pos[2].any()
    assert not mask_position(logits.requires_grad_()).requires_grad


def test_position_embedding_is_mask2formers_sines_then_a_linear():
    embed = PositionEmbedding(2, 16, num_feats=4)
    values = torch.tensor([[0.25, 0.5]])
    angles = torch.tensor([[0.25, 0.25 / 100], [0.5, 0.5 / 100]]) * 2 * torch.pi  # 10000^(2i/4), i = 0, 1
    features = torch.cat([angles.sin(), angles.cos()], -1).reshape(1, 8)
    torch.testing.assert_close(embed(values), features @ embed.proj.weight.T + embed.proj.bias)
