"""common/vita.py: the ObjectEncoder against VITA's own window and shifted-window attention (a port of
vita/modeling/transformer_decoder/vita.py encode_frame_query, seq-first as the original), and
its attention masks by hand; the converter of the official checkpoints on a synthetic state dict
with the official key names and shapes."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from common.vita import SWIN_L_OVIS, ObjectEncoder, build_vita, window_bias


def official_encode(encoder, frame_query, training):
    """VITA encode_frame_query on (T, fQ, LB, C), the encoder's weights, post-norm layers."""
    T0, fQ, LB, C = frame_query.shape
    W = encoder.window
    pad = -T0 % W
    frame_query = F.pad(frame_query, (0, 0, 0, 0, 0, 0, 0, pad))
    T = T0 + pad
    attn_mask = frame_query.new_ones(LB, T).bool()
    attn_mask[:, :T0] = False
    Nw, half_W = T // W, int(math.ceil(W / 2))
    heads = encoder.layers[0].heads
    window_mask = attn_mask.view(LB * Nw, W)[..., None].repeat(1, 1, fQ).flatten(1)
    _attn_mask = torch.roll(attn_mask, half_W, 1)
    _attn_mask = _attn_mask.view(LB, Nw, W)[..., None].repeat(1, 1, 1, W)
    _attn_mask[:, 0] = _attn_mask[:, 0] | _attn_mask[:, 0].transpose(-2, -1)
    _attn_mask[:, -1] = _attn_mask[:, -1] | _attn_mask[:, -1].transpose(-2, -1)
    _attn_mask[:, 0, :half_W, half_W:] = True
    _attn_mask[:, 0, half_W:, :half_W] = True
    _attn_mask = _attn_mask.view(LB * Nw, 1, W, 1, W, 1).repeat(1, heads, 1, fQ, 1, fQ).view(
        LB * Nw * heads, W * fQ, W * fQ)
    shift_mask = _attn_mask.float() * -1000

    def layer(i, x, key_padding=None, mask=None):  # x (WfQ, LB*Nw, C), seq-first
        lay = encoder.layers[i]
        xb = x.transpose(0, 1)
        attended = lay.self_attn(xb, xb, xb, key_padding_mask=key_padding, attn_mask=mask)[0].transpose(0, 1)
        x = lay.self_norm((x + attended).transpose(0, 1)).transpose(0, 1)
        return lay.ffn_norm((x + lay.ffn(x)).transpose(0, 1)).transpose(0, 1)

    for i in range(len(encoder.layers)):
        if training or i % 2 == 0:
            x = frame_query.view(Nw, W, fQ, LB, C).permute(1, 2, 3, 0, 4).reshape(W * fQ, LB * Nw, C)
            x = layer(i, x, key_padding=window_mask)
            frame_query = x.reshape(W, fQ, LB, Nw, C).permute(3, 0, 1, 2, 4).reshape(T, fQ, LB, C)
        else:
            x = torch.roll(frame_query, half_W, 0).view(Nw, W, fQ, LB, C).permute(1, 2, 3, 0, 4)
            x = layer(i, x.reshape(W * fQ, LB * Nw, C), mask=shift_mask)
            x = x.reshape(W, fQ, LB, Nw, C).permute(3, 0, 1, 2, 4).reshape(T, fQ, LB, C)
            frame_query = torch.roll(x, -half_W, 0)
    return frame_query[:T0]


def test_object_encoder_equals_vita_in_training_and_at_test():
    torch.manual_seed(0)
    encoder = ObjectEncoder(dim=16, heads=2, ffn_dim=32, num_layers=4, window=6)
    frames = torch.randn(2, 15, 3, 16)  # (B, T, Q, C): 15 frames -> 3 windows of 6, 3 padded frames
    for training in (True, False):
        encoder.train(training)
        ours = encoder(frames)  # (B, T, Q, C)
        theirs = official_encode(encoder, frames.permute(1, 2, 0, 3), training)  # (T, Q, B, C)
        torch.testing.assert_close(ours, theirs.permute(2, 0, 1, 3), atol=1e-5, rtol=0)
    encoder.eval()
    assert not torch.allclose(encoder(frames), encoder.train()(frames))  # test-time shifts matter


def test_window_masks_by_hand():
    valid = torch.tensor([[True] * 6 + [False] * 2])  # 6 frames padded to 8, windows of 4
    plain = window_bias(valid, 4, shifted=False)[0] < 0  # (n, K, K) blocked
    assert not plain[0].any() and plain[1][:, 2:].all() and not plain[1][:, :2].any()  # padded keys
    shifted = window_bias(valid, 4, shifted=True)[0] < 0
    # rolled by 2: window 0 holds frames 6, 7 (padding, wrapped around) and 0, 1; window 1 frames 2-5
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[2:, 2:] = False  # only frames 0 and 1 see each other
    assert torch.equal(shifted[0], expected) and not shifted[1].any()
    unpadded = window_bias(torch.ones(1, 8, dtype=torch.bool), 4, shifted=True)[0] < 0
    assert unpadded[0, :2, 2:].all() and unpadded[0, 2:, :2].all() and not unpadded[0, :2, :2].any()


def tiny_vita():
    """A tiny VITA: 5 frame queries, 4 video queries, 3 classes, width 32, windows of 3 frames."""
    from common.backbones import PixelLevel
    from common.mask2former import MaskedAttentionDecoder
    from common.vita import VITA
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny(hidden_dim=32)
    decoder = MaskedAttentionDecoder(hidden_dim=32, num_queries=5, num_layers=2, num_heads=4, ffn_dim=64,
                                     num_classes=3, mask_dim=pixel_level.mask_channels)
    vita = VITA(pixel_level=pixel_level, decoder=decoder, dim=32, heads=4, ffn_dim=64, enc_layers=2, dec_layers=2,
                window=3, num_video_queries=4, num_classes=3)
    return vita


def test_vita_shapes_and_gradients():
    vita = tiny_vita()
    out = vita(torch.randn(2, 5, 3, 64, 64))  # 5 frames: windows of 3, one padded frame
    assert out["pred_logits"].shape == (2, 4, 4) and out["pred_masks"].shape == (2, 4, 5, 16, 16)
    assert len(out["aux_outputs"]) == 1 and out["frame_queries"].shape == (2, 5, 5, 32)
    assert out["sim_frame"].shape == (2, 5, 5, 32) and out["sim_video"].shape == (2, 4, 32)
    assert out["frame_outputs"]["pred_logits"].shape == (10, 5, 4)
    loss = out["pred_masks"].sum() + out["pred_logits"].sum() + out["sim_frame"].sum() + out["sim_video"].sum() \
        + out["frame_outputs"]["pred_masks"].sum() + out["frame_outputs"]["pred_logits"].sum()
    loss.backward()
    no_grad = [n for n, p in vita.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_similarity_loss_by_hand():
    from common.vita import similarity_loss
    embeds = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    objects, clips = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1])
    logits = embeds @ embeds.T
    bce = lambda x, y: -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x)))
    pairs = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1), (2, 2, 1)]  # same-clip pairs: (i, j, same object)
    expected = sum(bce(logits[i, j], torch.tensor(float(y))) for i, j, y in pairs) / len(pairs)
    assert torch.allclose(similarity_loss(embeds, objects, clips), expected, atol=1e-5)


# ---------------------------------------------------------------- VITA's losses
def softplus(x):
    return math.log1p(math.exp(x))


def ce(row, label):  # cross-entropy of one row of logits
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def hand_dice(num_fg, num_pixels, s):  # a mask predicted +-3 at the right places, s = sigmoid(3)
    pred_sum = num_fg * s + (num_pixels - num_fg) * (1 - s)
    return 1 - (2 * num_fg * s + 1) / (pred_sum + num_fg + 1)


def test_vita_losses_by_hand():
    """One clip of 2 frames, 4x4: object A (label 1) only in frame 0, object B (label 0) only in
    frame 1, and an object without pixels; K = 2 classes. In every frame and in the clip one query predicts each object's mask
    with logits +-3 on the right pixels and another the opposite, and the wrong one has the higher
    class score, so only the masks make the matcher right. Whole masks (num_points=None)."""
    from common.matching import frame_targets
    from common.vita import VITA_LOSS_WEIGHTS, vita_losses
    a, b = torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 pixels in frame 0
    b[1, 2:, 1:] = True  # 6 pixels in frame 1
    empty = torch.zeros_like(a)  # an object with no pixel in the clip is dropped (prepare_targets)
    targets = [{"masks": torch.stack([a, b, empty]), "labels": torch.tensor([1, 0, 0]),
                "ids": torch.tensor([7, 9, 4])}]
    assert [f["objects"].tolist() for f in frame_targets(targets)] == [[0], [1]]  # B is frame 1's 0th
    sign = lambda m: 3.0 * (2 * m.float() - 1)  # logits +-3, right everywhere
    frame_masks = torch.stack([torch.stack([-sign(a[0]), sign(a[0])]),  # frame 0: q1 is right
                               torch.stack([sign(b[1]), -sign(b[1])])])  # frame 1: q0 is right
    frame_logits = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]],
                                 [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])  # (B*T, Q, K+1)
    video_masks = torch.stack([sign(b), -sign(a), sign(a)])[None]  # (1, V=3, T, 4, 4): B, wrong, A
    video_logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.0]]])
    flip = lambda x: x.flip(1)  # the aux layers hold the same queries in reverse order
    frame_out = {"pred_logits": frame_logits, "pred_masks": frame_masks}
    video_out = {"pred_logits": video_logits, "pred_masks": video_masks}
    sim_frame = torch.tensor([[[[3.0, -1.0], [1.0, 0.0]], [[0.0, 1.0], [-2.0, 2.0]]]])  # (1, T, Q, 2)
    sim_video = torch.tensor([[[0.5, 1.0], [2.0, 2.0], [1.0, -0.5]]])  # (1, V, 2)
    outputs = {**video_out, "aux_outputs": [{k: flip(v) for k, v in video_out.items()}],
               "frame_outputs": {**frame_out, "aux_outputs": [{k: flip(v) for k, v in frame_out.items()}]},
               "sim_frame": sim_frame, "sim_video": sim_video}
    terms = vita_losses(outputs, targets, num_points=None)

    s = 1 / (1 + math.exp(-3))
    # no-object weight 0.1: CE = sum w_y CE / sum w_y over all queries of all frames (of the clip)
    frame_ce = (ce([0, 1, 0], 1) + 0.1 * ce([0, 2, 0], 2) + ce([1, 0, 0], 0) + 0.1 * ce([2, 0, 0], 2)) / 2.2
    video_ce = (ce([1, 0, 0], 0) + 0.1 * ce([0, 2, 0], 2) + ce([0, 1, 0], 1)) / 2.1
    expected = {  # two layers each (final + aux); BCE and dice divided by the 2 target masks
        "frame_ce": 2 * frame_ce, "frame_bce": 2 * softplus(-3),
        "frame_dice": 2 * (hand_dice(4, 16, s) + hand_dice(6, 16, s)) / 2,
        "video_ce": 2 * video_ce, "video_bce": 2 * softplus(-3),
        "video_dice": 2 * (hand_dice(4, 32, s) + hand_dice(6, 32, s)) / 2,  # over the 2-frame tube
    }
    # similarity: frame 0's q1 (A), frame 1's q0 (B), video q2 (A), video q0 (B); one clip
    embeds, objects = [[1.0, 0.0], [0.0, 1.0], [1.0, -0.5], [0.5, 1.0]], [0, 1, 0, 1]
    pairs = [(sum(x * y for x, y in zip(embeds[i], embeds[j])), objects[i] == objects[j])
             for i in range(4) for j in range(4)]
    expected["sim"] = sum(softplus(-x) if same else softplus(x) for x, same in pairs) / 16
    assert set(terms) == set(expected) == set(VITA_LOSS_WEIGHTS)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key
    # the weights of VITA's configs (vita_model.py from_config, configs/ovis/vita_SWIN_bs8.yaml)
    assert VITA_LOSS_WEIGHTS == {"frame_ce": 2.0, "frame_bce": 5.0, "frame_dice": 5.0, "video_ce": 2.0,
                                 "video_bce": 5.0, "video_dice": 5.0, "sim": 0.5}


def test_vita_losses_reach_every_parameter():
    from common.vita import VITA_LOSS_WEIGHTS, vita_losses
    vita = tiny_vita()
    masks = torch.zeros(3, 3, 64, 64, dtype=torch.bool)  # (N, T, H, W)
    masks[0, :, 8:30, 8:30] = True
    masks[1, 1:, 30:60, 20:50] = True  # absent from frame 0
    targets = [{"masks": masks, "labels": torch.tensor([0, 2, 1]), "ids": torch.tensor([1, 2, 3])},  # 3rd empty
               {"masks": masks[1:2], "labels": torch.tensor([1]), "ids": torch.tensor([5])}]
    terms = vita_losses(vita(torch.randn(2, 3, 3, 64, 64)), targets, num_points=64)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values()), terms
    sum(VITA_LOSS_WEIGHTS[k] * v for k, v in terms.items()).backward()
    no_grad = [n for n, p in vita.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    for part in (vita.decoder, vita.encoder, vita.object_decoder, vita.sim_frame, vita.sim_video):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0


# ---------------------------------------------------------------- official checkpoints (converter)
def official_vita_shapes(*, embed_dim, depths, swin_heads, window, conv_dim, mask_dim, pixel_decoder_layers,
                         pixel_decoder_heads, hidden, heads, frame_queries, dec_layers, num_classes, enc_layers, vita_dec_layers,
                         video_queries, pixel_decoder_ffn=1024, ffn=2048, points=4, enc_window=6) -> dict:
    """{key: shape} of an official VITA checkpoint, written from the constructors of the official
    modules (github.com/sukjunhwang/VITA @ 59c24ad) for a Swin backbone: D2SwinTransformer (patch 4,
    MLP ratio 4, qkv bias, patch norm, no APE, norm0-3), MSDeformAttnPixelDecoder (res3-res5 in the
    deformable encoder, one FPN level on res2, norm "GN"), VitaMultiScaleMaskedTransformerDecoder
    (dec_layers = DEC_LAYERS - 1; CONVS_DIM = HIDDEN_DIM, so no input_proj) and the VITA module
    (ENFORCE_INPUT_PROJ and SIM_USE_CLIP on), plus the persistent buffers. `heads` (of the
    decoders' attention) does not change any shape."""
    shapes = {}

    def affine(name, *weight_shape, bias=True):
        shapes[f"{name}.weight"] = weight_shape
        if bias:
            shapes[f"{name}.bias"] = weight_shape[:1]

    def mha(name, d):  # nn.MultiheadAttention
        shapes[f"{name}.in_proj_weight"], shapes[f"{name}.in_proj_bias"] = (3 * d, d), (3 * d,)
        affine(f"{name}.out_proj", d, d)

    def self_attention_layer(name):  # SelfAttentionLayer
        mha(f"{name}.self_attn", hidden)
        affine(f"{name}.norm", hidden)

    def ffn_layer(name):  # FFNLayer
        affine(f"{name}.linear1", ffn, hidden)
        affine(f"{name}.linear2", hidden, ffn)
        affine(f"{name}.norm", hidden)

    def decoder_layers(prefix, n):  # cross-attention, self-attention and FFN layers in three ModuleLists
        for i in range(n):
            mha(f"{prefix}transformer_cross_attention_layers.{i}.multihead_attn", hidden)
            affine(f"{prefix}transformer_cross_attention_layers.{i}.norm", hidden)
            self_attention_layer(f"{prefix}transformer_self_attention_layers.{i}")
            ffn_layer(f"{prefix}transformer_ffn_layers.{i}")

    b = "backbone."
    affine(b + "patch_embed.proj", embed_dim, 3, 4, 4)
    affine(b + "patch_embed.norm", embed_dim)
    for i, (depth, stage_heads) in enumerate(zip(depths, swin_heads)):
        dim = embed_dim * 2 ** i
        for j in range(depth):
            blk = f"{b}layers.{i}.blocks.{j}."
            affine(blk + "norm1", dim)
            shapes[blk + "attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, stage_heads)
            shapes[blk + "attn.relative_position_index"] = (window ** 2, window ** 2)
            affine(blk + "attn.qkv", 3 * dim, dim)
            affine(blk + "attn.proj", dim, dim)
            affine(blk + "norm2", dim)
            affine(blk + "mlp.fc1", 4 * dim, dim)
            affine(blk + "mlp.fc2", dim, 4 * dim)
        if i < len(depths) - 1:
            affine(f"{b}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            affine(f"{b}layers.{i}.downsample.norm", 4 * dim)
    for i in range(len(depths)):
        affine(f"{b}norm{i}", embed_dim * 2 ** i)

    p = "sem_seg_head.pixel_decoder."
    for level, stage in enumerate((3, 2, 1)):  # res5, res4, res3
        affine(f"{p}input_proj.{level}.0", conv_dim, embed_dim * 2 ** stage, 1, 1)
        affine(f"{p}input_proj.{level}.1", conv_dim)
    shapes[p + "transformer.level_embed"] = (3, conv_dim)
    for i in range(pixel_decoder_layers):
        e = f"{p}transformer.encoder.layers.{i}."
        affine(e + "self_attn.sampling_offsets", pixel_decoder_heads * 3 * points * 2, conv_dim)
        affine(e + "self_attn.attention_weights", pixel_decoder_heads * 3 * points, conv_dim)
        affine(e + "self_attn.value_proj", conv_dim, conv_dim)
        affine(e + "self_attn.output_proj", conv_dim, conv_dim)
        affine(e + "norm1", conv_dim)
        affine(e + "linear1", pixel_decoder_ffn, conv_dim)
        affine(e + "linear2", conv_dim, pixel_decoder_ffn)
        affine(e + "norm2", conv_dim)
    affine(p + "mask_features", mask_dim, conv_dim, 1, 1)
    affine(p + "adapter_1", conv_dim, embed_dim, 1, 1, bias=False)
    affine(p + "adapter_1.norm", conv_dim)
    affine(p + "layer_1", conv_dim, conv_dim, 3, 3, bias=False)
    affine(p + "layer_1.norm", conv_dim)

    d = "sem_seg_head.predictor."
    decoder_layers(d, dec_layers)
    affine(d + "decoder_norm", hidden)
    shapes[d + "query_feat.weight"] = shapes[d + "query_embed.weight"] = (frame_queries, hidden)
    shapes[d + "level_embed.weight"] = (3, hidden)
    affine(d + "class_embed", num_classes + 1, hidden)
    for j, out in enumerate((hidden, hidden, mask_dim)):
        affine(f"{d}mask_embed.layers.{j}", out, hidden)

    v = "vita_module."
    for i in range(enc_layers):
        self_attention_layer(f"{v}enc_self_attn.{i}")
        ffn_layer(f"{v}enc_ffn.{i}")
    decoder_layers(v, vita_dec_layers)
    affine(v + "vita_mask_features", mask_dim, conv_dim, 1, 1)
    affine(v + "decoder_norm", hidden)
    shapes[v + "query_feat.weight"] = shapes[v + "query_embed.weight"] = (video_queries, hidden)
    shapes[v + "fq_pos.weight"] = (frame_queries, hidden)
    affine(v + "input_proj_dec", hidden, hidden)
    affine(v + "class_embed", num_classes + 1, hidden)
    for j, out in enumerate((hidden, hidden, mask_dim)):
        affine(f"{v}mask_embed.layers.{j}", out, hidden)
    affine(v + "sim_embed_frame", hidden, hidden)
    affine(v + "sim_embed_clip", hidden, hidden)
    shapes["criterion.empty_weight"] = shapes["vita_criterion.empty_weight"] = (num_classes + 1,)
    return shapes


def official_relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w): the index into the (2w-1)^2 bias table of each pair of positions in a window, as
    the official WindowAttention builds it (row offset * (2w - 1) + column offset, both shifted >= 0)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dr, dc = rows[:, None] - rows[None] + window - 1, cols[:, None] - cols[None] + window - 1
    return dr * (2 * window - 1) + dc


# official configurations: Swin, pixel decoder (CONVS_DIM, MASK_DIM), Mask2Former (DEC_LAYERS - 1), VITA
SMALL = dict(embed_dim=16, depths=(2, 1, 2, 1), swin_heads=(1, 2, 2, 4), window=4,
             conv_dim=32, mask_dim=16, pixel_decoder_layers=2, pixel_decoder_heads=4, pixel_decoder_ffn=64,
             hidden=32, heads=4, ffn=64, frame_queries=5, dec_layers=3, num_classes=3,
             enc_layers=2, vita_dec_layers=2, video_queries=4)


def random_official_state(c: dict, seed: int = 0) -> dict:
    """A synthetic official checkpoint: random values, the real relative_position_index buffers."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator) for k, shape in official_vita_shapes(**c).items()}
    for k in state:
        if k.endswith("relative_position_index"):
            state[k] = official_relative_position_index(c["window"])
    return state


@pytest.fixture(scope="module")
def small_loaded():
    """A small VITA and the official-layout state dict loaded into it."""
    from common.vita import load_official_vita
    torch.manual_seed(0)
    model = build_vita(SMALL).eval()
    official = random_official_state(SMALL)
    left = load_official_vita(model, official)
    return model, official, left


def test_official_checkpoint_loads_every_tensor(small_loaded):
    from common.vita import OFFICIAL_KEYS_NOT_LOADED, OUR_KEYS_NOT_LOADED, official_vita_key_map
    model, official, left = small_loaded
    assert sorted(left) == sorted(OUR_KEYS_NOT_LOADED)
    key_map, own = official_vita_key_map(model), model.state_dict()
    assert set(key_map) == set(official) - set(OFFICIAL_KEYS_NOT_LOADED)  # no official key left over
    targets = [k for ours in key_map.values() for k in ours]
    assert len(targets) == len(set(targets))
    assert set(own) - set(targets) == set(OUR_KEYS_NOT_LOADED)  # every key of ours filled
    buffers = dict(model.named_buffers())
    for theirs, ours in key_map.items():
        for name, part in zip(ours, official[theirs].chunk(len(ours))):
            if name in own:
                assert torch.equal(own[name], part), f"{name} <- {theirs}"
            else:  # relative_position_index: checked, equal to ours (flat)
                assert torch.equal(buffers[name], part.flatten()), name
    # the fused qkv really is cut into q, k, v in that order
    qkv = official["backbone.layers.1.blocks.0.attn.qkv.weight"]
    attention = model.pixel_level.backbone.swin.encoder.layers[1].blocks[0].attention
    assert torch.equal(attention.k_proj.weight, qkv[32:64]) and torch.equal(attention.v_proj.weight, qkv[64:])


def test_official_swin_attention_by_hand(small_loaded):
    """One Swin window attention of the loaded model equals the official WindowAttention computed
    from the official-layout tensors (fused qkv reshaped to (3, heads, head_dim), relative bias)."""
    from einops import rearrange
    model, official, _ = small_loaded
    k, heads, window, dim = "backbone.layers.1.blocks.0.attn.", 2, SMALL["window"], 32
    x = torch.randn(3, window * window, dim, generator=torch.Generator().manual_seed(0))  # (windows, N, C)
    qkv = x @ official[k + "qkv.weight"].T + official[k + "qkv.bias"]  # (windows, N, 3C)
    q, key, v = rearrange(qkv, "w n (s h d) -> s w h n d", s=3, h=heads)  # as reshape(B_, N, 3, heads, d)
    table, index = official[k + "relative_position_bias_table"], official[k + "relative_position_index"]
    bias = table[index]  # (N, N, heads)
    scores = q @ key.transpose(-2, -1) * (dim // heads) ** -0.5 + rearrange(bias, "i j h -> h i j")
    out = rearrange(scores.softmax(-1) @ v, "w h n d -> w n (h d)")
    expected = out @ official[k + "proj.weight"].T + official[k + "proj.bias"]
    with torch.no_grad():
        ours = model.pixel_level.backbone.swin.encoder.layers[1].blocks[0].attention(x)[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_vita_masks_read_the_raw_pixel_decoder_map(small_loaded):
    """VITA's masks = mask embedding . vita_mask_features(raw stride-4 map), the raw map being the
    input of Mask2Former's own projection (official `clip_mask_features`)."""
    from common.vita import pixel_level_with_raw_map
    model, official, _ = small_loaded
    frames = torch.randn(1, 3, 3, 64, 64)  # (B, T, 3, H, W)
    with torch.no_grad():
        out = model(frames)
        pixels = pixel_level_with_raw_map(model.pixel_level, frames[0])
        projected = model.pixel_level.pixel_decoder.mask_projection(pixels["raw_map"])
        v = "vita_module."
        vita_feats = F.conv2d(pixels["raw_map"], official[v + "vita_mask_features.weight"],
                              official[v + "vita_mask_features.bias"])  # (T, D, h, w)
        expected = torch.einsum("vd,tdhw->vthw", model.mask_embed(out["video_queries"][0]), vita_feats)
    assert pixels["raw_map"].shape == (3, SMALL["conv_dim"], 16, 16)
    torch.testing.assert_close(projected, pixels["mask_features"], atol=1e-6, rtol=0)
    assert out["pred_masks"].shape == (1, SMALL["video_queries"], 3, 16, 16)
    torch.testing.assert_close(out["pred_masks"][0], expected, atol=1e-4, rtol=1e-4)


def test_official_checkpoint_mismatches_are_listed_and_nothing_is_loaded():
    from common.vita import load_official_vita
    torch.manual_seed(0)
    model = build_vita(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    official = random_official_state(SMALL)
    del official["vita_module.fq_pos.weight"]
    official["vita_module.extra_head.weight"] = torch.zeros(2)
    official["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(7, SMALL["hidden"])  # 6 classes
    official["backbone.layers.0.blocks.0.attn.relative_position_index"] = official_relative_position_index(3)
    with pytest.raises(ValueError) as err:
        load_official_vita(model, official)
    message = str(err.value)
    assert "vita_module.extra_head.weight" in message
    assert "object_decoder.slot_pos.weight <- vita_module.fq_pos.weight (absent)" in message
    assert "decoder.class_head.weight (4, 32) <- sem_seg_head.predictor.class_embed.weight (7, 32)" in message
    assert "blocks.0.attn.relative_position_index differs" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_official_checkpoint_files(tmp_path, small_loaded):
    from common.vita import load_official_vita_checkpoint, read_official_checkpoint
    missing = tmp_path / "vita_swin_ovis.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_official_vita_checkpoint(build_vita(SMALL), missing)
    assert str(err.value).startswith(f"VITA checkpoint not found: '{missing}'") and "\n" not in str(err.value)
    _, official, _ = small_loaded
    torch.save({"model": official, "iteration": 1}, tmp_path / "detectron2.pth")  # Checkpointer's layout
    torch.save(official, tmp_path / "bare.pth")
    with open(tmp_path / "detectron2.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "test"}, f)
    for name in ("detectron2.pth", "bare.pth", "detectron2.pkl"):
        read = read_official_checkpoint(tmp_path / name)
        assert read.keys() == official.keys() and all(torch.equal(read[k], official[k]) for k in official)
    model = build_vita(SMALL)
    load_official_vita_checkpoint(model, tmp_path / "detectron2.pth")
    assert torch.equal(model.object_decoder.slot_pos.weight, official["vita_module.fq_pos.weight"])


def test_swin_large_ovis_key_map_covers_the_official_checkpoint():
    """The real configuration (Swin-L, OVIS: 200 frame queries, 25 classes), built on the meta
    device (no memory): every official key has a place of the same size, every key of ours a source."""
    from common.vita import OFFICIAL_KEYS_NOT_LOADED, OUR_KEYS_NOT_LOADED, official_vita_key_map
    with torch.device("meta"):
        model = build_vita(SWIN_L_OVIS)
    shapes = official_vita_shapes(**SWIN_L_OVIS)
    key_map, own, buffers = official_vita_key_map(model), model.state_dict(), dict(model.named_buffers())
    assert set(key_map) == set(shapes) - set(OFFICIAL_KEYS_NOT_LOADED)
    assert set(own) - {k for ours in key_map.values() for k in ours} == set(OUR_KEYS_NOT_LOADED)
    for theirs, ours in key_map.items():
        for name, part in zip(ours, torch.empty(shapes[theirs], device="meta").chunk(len(ours))):
            if name in own:
                assert part.shape == own[name].shape, f"{name} {own[name].shape} <- {theirs} {part.shape}"
            else:
                assert part.numel() == buffers[name].numel(), name
    vita_module = sum(math.prod(s) for k, s in shapes.items() if k.startswith("vita_module."))
    assert round(vita_module / 1e6, 1) == 13.2  # ../notes/dmvs_vita.md section 3


# ---------------------------------------------------------------------------------- initialisation
def assert_xavier(weight):
    """A weight drawn by xavier_uniform_: inside, and reaching close to, sqrt(6 / (fan_in + fan_out))."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    bound = math.sqrt(6 / (fan_in + fan_out))
    top = weight.abs().max().item()
    assert 0.9 * bound < top <= bound, (tuple(weight.shape), top, bound)


def test_vita_is_initialised_as_the_official_code():
    """Official VITA: every SelfAttentionLayer / CrossAttentionLayer / FFNLayer xavier_uniform_s its
    matrices (`_reset_parameters`), `vita_mask_features` gets detectron2's c2_xavier_fill. PyTorch's
    defaults differ on the FFN and the attention's output projection (kaiming, bound 1/sqrt(fan_in))."""
    torch.manual_seed(0)
    model = build_vita(SMALL)
    layers = [*model.encoder.layers, *model.object_decoder.layers, *model.decoder.layers]
    matrices = [p for layer in layers for p in layer.parameters() if p.dim() > 1]
    assert len(matrices) > 20
    for p in matrices:
        assert_xavier(p)
    weight, bias = model.mask_proj.weight, model.mask_proj.bias  # kaiming_uniform_(a=1): sqrt(3 / fan_in)
    assert not bias.any() and 0.9 < weight.abs().max().item() / math.sqrt(3 / weight[0].numel()) <= 1
