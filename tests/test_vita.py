"""common/vita.py: the ObjectEncoder against VITA's own window and shifted-window attention (a port of
vita/modeling/transformer_decoder/vita.py encode_frame_query, seq-first as the original), and
its attention masks by hand."""
import math

import torch
import torch.nn.functional as F

from common.vita import ObjectEncoder, window_bias


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


def test_vita_shapes_and_gradients():
    from common.backbones import PixelLevel
    from common.mask2former import MaskedAttentionDecoder
    from common.vita import VITA
    torch.manual_seed(0)
    pixel_level = PixelLevel.tiny(hidden_dim=32)
    decoder = MaskedAttentionDecoder(hidden_dim=32, num_queries=5, num_layers=2, num_heads=4, ffn_dim=64,
                                     num_classes=3, mask_dim=pixel_level.mask_channels)
    vita = VITA(pixel_level=pixel_level, decoder=decoder, dim=32, heads=4, ffn_dim=64, enc_layers=2, dec_layers=2,
                window=3, num_video_queries=4, num_classes=3)
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
