"""DsHmp (dshmp.py): each stage's shapes and equations, the losses, training, resume, inference, DDP, CLI."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dshmp
from common.datasets import collate_video
from common.engine import read_checkpoint
from common.lavt import LanguageAwareSwin
from common.run import load_trained, parse_config, video_query_masks
from common.text import build_vocab
from data.toy import make_toy_video
from ddp_launch import run_two_ranks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "mevis"
    make_toy_video(root, seed=3, train_videos=6, valid_videos=2, verbose=False)
    return root


def toy_config(root, out, *extra):
    return parse_config(dshmp.Config, dshmp.PRESETS, ["--data", "toy", "--data-root", str(root), "--out", str(out),
                                                      "--num-frames", "4", "--batch-size", "2", "--workers", "0",
                                                      "--train", *extra])


def toy_vocab(dataset):
    return build_vocab([s["expression"] for s in dataset.samples])


@pytest.fixture(scope="module")
def toy(toy_root, tmp_path_factory):
    cfg = toy_config(toy_root, tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    dataset = dshmp.make_dataset(cfg, toy_root, "train", train=True)
    model = dshmp.build_model(cfg, vocab=toy_vocab(dataset))
    batch = collate_video([dataset[0], dataset[1]])
    return cfg, dataset, model, batch


# ---------------------------------------------------------------------------------- shapes
def test_layers_are_initialised_as_the_official_code(toy):
    """Official DsHmp: the cue injections (CrossAttentionLayer), HMP's self-attention and FFN and the
    Motion Decoder's layers are xavier_uniform_ed, vita_mask_features gets c2_xavier_fill; the
    hierarchical cross-attention keeps PyTorch's default."""
    from test_vita import assert_xavier
    _, _, model, _ = toy
    blocks = model.motion_perception.blocks
    parts = [model.static_injection, model.motion_injection, *model.motion_decoder.layers,
             *(b.self_attn for b in blocks), *(b.ffn for b in blocks)]
    matrices = [p for part in parts for p in part.parameters() if p.dim() > 1]
    assert len(matrices) > 10
    for p in matrices:
        assert_xavier(p)
    weight = model.motion_mask_proj.weight  # kaiming_uniform_(a=1): bound sqrt(3 / fan_in)
    assert not model.motion_mask_proj.bias.any()
    assert 0.9 < weight.abs().max().item() / math.sqrt(3 / weight[0].numel()) <= 1


def test_the_swin_stages_get_no_language_feedback(toy):
    """The official gate is zero-initialised and never opens (common.lavt): no gate is built and
    what enters each Swin stage does not depend on the sentence; with LAVT's live gate in its
    place (feedback=True) it does."""
    _, _, model, batch = toy
    assert model.fusion.gates is None
    gated = copy.deepcopy(model)
    gated.fusion = LanguageAwareSwin(channels=model.pixel_level.backbone.channels,
                                     word_dim=model.text_encoder.hidden_size, feedback=True)
    assert len(gated.fusion.gates) == 3

    def stage_inputs(m, expressions):
        seen = []
        block = m.pixel_level.backbone.swin.encoder.layers[2].blocks[0]
        hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        with torch.no_grad():
            m.eval()(batch["frames"], expressions)
        hook.remove()
        return seen[0]

    one, other = ["the red circle"] * 2, ["the blue square moving left"] * 2
    torch.testing.assert_close(stage_inputs(model, one), stage_inputs(model, other))
    assert not torch.allclose(stage_inputs(gated, one), stage_inputs(gated, other))
    model.train()


def test_shapes_of_every_stage(toy):
    cfg, _, model, batch = toy
    frames, expressions = batch["frames"], batch["expression"]  # (2, 4, 3, 64, 96)
    B, T, _, H, W = frames.shape
    N_s, N_m, C = cfg.num_static_queries, cfg.num_motion_queries, cfg.dim
    text = model.encode_text(expressions)
    words, static_mask, motion_mask = text.cues, text.static_mask, text.motion_mask
    L = words.shape[1]
    assert words.shape == (B, L, C) and static_mask.shape == motion_mask.shape == (B, L)
    assert text.encoder_words.shape[:2] == text.encoder_mask.shape == (B, L - 1)  # no sentence token
    assert static_mask[:, -1].all() and motion_mask[:, -1].all()  # the sentence joins both cue sets
    assert not (static_mask[:, :-1] & motion_mask[:, :-1]).any()  # a word is static or motion, not both
    queries = model.static_queries(text)
    assert queries.shape == (B, N_s, C)
    frame_text = dshmp.Text(*(x.repeat_interleave(T, 0) for x in text))
    frame_out, mask_feats = model.segment_frames(frames.flatten(0, 1), queries.repeat_interleave(T, 0), frame_text)
    assert frame_out["pred_logits"].shape == (B * T, N_s, 2)
    assert frame_out["pred_masks"].shape == (B * T, N_s, H // 4, W // 4)
    assert len(frame_out["aux_outputs"]) == cfg.m2f_layers
    assert mask_feats.shape == (B * T, C, H // 4, W // 4)
    tokens = frame_out["query_embeds"][-1].view(B, T, N_s, C)
    assert model.motion_perception(tokens, words, motion_mask).shape == (B, T, N_s, C)
    out = model(frames, expressions)
    assert out["pred_logits"].shape == (B, N_m, 2)
    assert out["pred_masks"].shape == (B, N_m, T, H // 4, W // 4)
    assert len(out["aux_outputs"]) == cfg.decoder_layers - 1
    assert out["embeds"].shape == (B, N_m, cfg.cl_dim)


def test_static_motion_split_reaches_the_injections(toy):
    _, _, model, _ = toy
    text = model.encode_text(["the red circle moving to the left"])
    static_mask, motion_mask = text.static_mask, text.motion_mask
    ids = model.text_encoder.tokenizer("the red circle moving to the left")["input_ids"]
    tokens = model.text_encoder.tokenizer.convert_ids_to_tokens(ids)
    motion_tokens = [t for t, m in zip(tokens, motion_mask[0, : len(tokens)].tolist()) if m]
    static_tokens = [t for t, m in zip(tokens, static_mask[0, : len(tokens)].tolist()) if m]
    assert motion_tokens == ["moving"]
    assert static_tokens == ["the", "red", "circle", "to", "the", "left"]


def test_cue_injection_is_eqs_1_and_2_by_hand():
    """Eqs. (1)-(2) with one head and identity projections, in eval mode (no dropout):
    Q = Q_0 + scale * LN(Q_0 + softmax(Q_0 F^T / sqrt(C)) F), the words outside the cue set
    (static words for Eq. 1, motion words for Eq. 2) getting no weight."""
    torch.manual_seed(0)
    C, scale = 8, 0.5
    layer = dshmp.CueInjection(dim=C, heads=1, scale=scale).eval()
    with torch.no_grad():
        layer.attn.in_proj_weight.copy_(torch.eye(C).repeat(3, 1))
        layer.attn.in_proj_bias.zero_()
        layer.attn.out_proj.weight.copy_(torch.eye(C))
        layer.attn.out_proj.bias.zero_()
    queries, words = torch.randn(2, 3, C), torch.randn(2, 5, C)
    cues = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    logits = (queries @ words.transpose(1, 2) / math.sqrt(C)).masked_fill(~cues[:, None], -math.inf)
    expected = queries + scale * F.layer_norm(queries + logits.softmax(-1) @ words, (C,))
    assert torch.allclose(layer(queries, words, cues), expected, atol=1e-5)
    other = words.clone()
    other[~cues] = torch.randn(int((~cues).sum()), C)  # change only the words outside the cue set
    assert torch.allclose(layer(queries, other, cues), expected, atol=1e-5)


# ---------------------------------------------------------------------------------- Sec. 3.2
def test_hungarian_step_realigns_a_permuted_token_sequence():
    torch.manual_seed(0)
    T, N, C = 6, 5, 16
    objects = torch.randn(N, C)  # one token per object, slightly different in every frame
    order = [torch.arange(N), torch.tensor([1, 2, 3, 4, 0])]  # a 5-cycle: not its own inverse
    order += [torch.randperm(N) for _ in range(T - 2)]
    tokens = torch.stack([objects[o] + 0.01 * torch.randn(N, C) for o in order])[None]  # (1, T, N, C)
    perm = dshmp.align_tokens(tokens)  # (1, T, N)
    for t in range(T):  # slot i holds the same object in every frame
        assert torch.equal(order[t][perm[0, t]], order[0])
    aligned = torch.gather(tokens, 2, perm[..., None].expand_as(tokens))
    assert torch.allclose(aligned[0], objects[order[0]].expand(T, N, C), atol=0.05)


def test_weighted_merge_equals_hand_computation():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0], [5.0, 1.0]])  # (S=5, C=2)
    weights = torch.tensor([0.25, 0.75, 1.0, 1.0, 2.0])
    valid = torch.tensor([True, True, True, True, True])
    merged, merged_valid = dshmp.merge_neighbours(x, weights, valid)
    expected = torch.stack([
        (0.25 * x[0] + 0.75 * x[1]) / 1.0,  # Eq. (6): weighted average of frames 0 and 1
        (1.0 * x[2] + 1.0 * x[3]) / 2.0,
        x[4],  # the odd last frame is merged with a zero-weight padding frame
    ])
    assert torch.allclose(merged, expected, atol=1e-6)
    assert merged_valid.tolist() == [True, True, True]
    # a padded frame has zero weight, so it never enters a merge, and a fully padded pair stays invalid
    merged, merged_valid = dshmp.merge_neighbours(x[:4], torch.tensor([0.5, 0.0, 0.0, 0.0]),
                                                  torch.tensor([True, False, False, False]))
    assert torch.allclose(merged[0], x[0]) and merged_valid.tolist() == [True, False]


def test_hierarchical_cross_attention_equals_hand_computation():
    torch.manual_seed(0)
    hca = dshmp.HierarchicalCrossAttention(dim=4, num_stages=2)
    traj, words = torch.randn(1, 1, 4, 4), torch.randn(1, 3, 4)  # 4 frames, 3 words
    valid, word_mask = torch.ones(1, 1, 4, dtype=torch.bool), torch.tensor([[True, False, True]])
    out = hca(traj, valid, words, word_mask)
    k, v = hca.to_k(words[0]), hca.to_v(words[0])  # (3, 4)
    x, stages = traj[0, 0], []
    for h in range(2):
        attn = torch.softmax(hca.to_q(x) @ k.T / 2.0, dim=0) * word_mask[0].float()  # Eq. (4), over frames
        w = attn.sum(1)  # Eq. (5)
        enriched = hca.norms[h](x + hca.proj[h]((attn / w[:, None]) @ v))
        x = torch.stack([(w[i] * enriched[i] + w[i + 1] * enriched[i + 1]) / (w[i] + w[i + 1])
                         for i in range(0, len(w), 2)])  # Eq. (6)
        stages.append(x.repeat_interleave(4 // len(x), 0))
    expected = hca.norm(traj[0, 0] + stages[0] + stages[1])  # Eq. (7)
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


def test_hierarchical_cross_attention_with_a_window_of_six():
    """Eq. (7) expands every stage back to the frames by the frames each merged token covers: with
    K = 6, stage 1 merges pairs (2 frames per token), stage 2 merges 3 tokens padded to 4 (frames
    0-3 and 4-5), stage 3 one token for all six."""
    torch.manual_seed(0)
    hca = dshmp.HierarchicalCrossAttention(dim=4, num_stages=3)
    traj, words = torch.randn(1, 1, 6, 4), torch.randn(1, 2, 4)
    valid, word_mask = torch.ones(1, 1, 6, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    out = hca(traj, valid, words, word_mask)
    k, v = hca.to_k(words[0]), hca.to_v(words[0])  # (2, 4)
    x, stage_valid, expanded = traj[0, 0], torch.ones(6, dtype=torch.bool), []
    for h in range(3):
        logits = (hca.to_q(x) @ k.T / 2.0).masked_fill(~stage_valid[:, None], float("-inf"))
        attn = torch.softmax(logits, dim=0)  # Eq. (4), over the frames
        w = attn.sum(1)  # Eq. (5)
        enriched = hca.norms[h](x + hca.proj[h]((attn / w[:, None]) @ v))
        if len(x) % 2:  # an odd stage gets a zero-weight padding token
            enriched, w = torch.cat([enriched, torch.zeros(1, 4)]), torch.cat([w, torch.zeros(1)])
            stage_valid = torch.cat([stage_valid, torch.zeros(1, dtype=torch.bool)])
        x = torch.stack([(w[i] * enriched[i] + w[i + 1] * enriched[i + 1]) / (w[i] + w[i + 1] + 1e-8)
                         for i in range(0, len(w), 2)])  # Eq. (6)
        stage_valid = stage_valid.view(-1, 2).any(1)
        expanded.append(x)
    frame_token = [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1], [0] * 6]  # frame -> its token at each stage
    expected = hca.norm(traj[0, 0] + sum(expanded[h][frame_token[h]] for h in range(3)))  # Eq. (7)
    assert torch.allclose(out[0, 0], expected, atol=1e-5)


def test_hmp_handles_lengths_that_are_not_a_window_multiple(toy):
    cfg, _, model, _ = toy
    text = model.encode_text(["circle jumping"])
    words, motion_mask = text.cues, text.motion_mask
    model.eval()
    tokens = torch.randn(1, 11, cfg.num_static_queries, cfg.dim)
    out = model.motion_perception(tokens, words, motion_mask)
    assert out.shape == tokens.shape and torch.isfinite(out).all()
    # padding frames are masked out: the first window's tokens do not depend on how the video ends
    longer = model.motion_perception(torch.cat([tokens, torch.randn(1, 3, cfg.num_static_queries, cfg.dim)], 1),
                                     words, motion_mask)
    assert torch.allclose(out[:, :8], longer[:, :8], atol=1e-5)
    model.train()


def test_a_clip_played_backwards_gets_the_same_scores(toy, monkeypatch):
    """No temporal position anywhere (paper and official code): a clip and the clip played
    backwards get the same scores and the same masks in reverse order, so a look-alike moving left
    cannot be told from one moving right (tests/bench/README.md, "What the toy set shows about
    motion"). Eq. (3)'s first frame as the reference is the one step that sees the order; it is
    held at identity (the tracks of a scene whose tokens keep their slots) so that the rest is
    compared exactly."""
    _, _, model, batch = toy
    identity = lambda tokens: torch.arange(tokens.shape[2]).repeat(*tokens.shape[:2], 1)  # (B, T, Q)
    monkeypatch.setattr(dshmp, "align_tokens", identity)
    frames, expressions = batch["frames"], batch["expression"]  # (2, 4, 3, H, W)
    model.eval()
    with torch.no_grad():
        forward, backward = model(frames, expressions), model(frames.flip(1), expressions)
        shuffled = model(frames[:, [0, 2, 1, 3]], expressions)
    model.train()
    assert torch.allclose(forward["pred_logits"], backward["pred_logits"], atol=1e-5)
    assert torch.allclose(forward["pred_masks"], backward["pred_masks"].flip(2), atol=1e-5)
    # the test can fail: Eq. (6) merges neighbouring frames, so another order changes the scores
    assert not torch.allclose(forward["pred_logits"], shuffled["pred_logits"], atol=1e-4)


def moving_and_still_masks(T, Q, h, w, step=3):
    """Mask logits (T, Q, h, w): query 0 a square moving right by `step` pixels a frame, query 1 a
    square that stays, the others empty."""
    masks = torch.full((T, Q, h, w), -30.0)
    for t in range(T):
        masks[t, 0, 2:6, 2 + step * t:6 + step * t] = 30.0
        masks[t, 1, 8:12, 4:8] = 30.0
    return masks


def test_token_position_is_off_by_default_and_reads_where_each_mask_lies(toy, toy_root, tmp_path):
    """--token-position (ours, a diagnostic outside the paper): off by default, and built last, so
    the other weights start as without it. On, each frame token O gets PositionEmbedding(centre,
    area of its own mask) before HMP: the same in every frame for a token whose mask stays,
    different for one whose mask moves; infer() (chunks) reads the same masks as forward()."""
    cfg, dataset, _, batch = toy
    assert not cfg.token_position
    torch.manual_seed(0)
    plain = dshmp.build_model(cfg, vocab=toy_vocab(dataset))
    torch.manual_seed(0)
    flagged = dshmp.build_model(toy_config(toy_root, tmp_path, "--token-position"), vocab=toy_vocab(dataset))
    assert plain.token_position is None
    extra = {k: v for k, v in flagged.state_dict().items() if k not in plain.state_dict()}
    assert sorted(extra) == ["token_position.proj.bias", "token_position.proj.weight"]
    for key, value in plain.state_dict().items():
        assert torch.equal(value, flagged.state_dict()[key]), key

    T, Q, C, h, w = 3, cfg.num_static_queries, cfg.dim, 16, 24
    tokens = torch.randn(1, Q, C).expand(T, Q, C)  # every frame the same tokens
    masks = moving_and_still_masks(T, Q, h, w)  # (T, Q, h, w)
    with torch.no_grad():
        got, moved, plain_got = (model.frame_tokens({"query_embeds": [tokens], "pred_masks": m})
                                 for model, m in ((flagged, masks), (flagged, masks.roll(5, dims=-1)),
                                                  (plain, masks)))
    torch.testing.assert_close(got, tokens + flagged.token_position(dshmp.mask_position(masks)))
    assert not torch.allclose(got[0, 0], got[1, 0], atol=1e-3)  # query 0 moves
    torch.testing.assert_close(got[0, 1:], got[1, 1:])  # query 1 stays, the rest empty
    assert not torch.allclose(got[:, 1], moved[:, 1], atol=1e-3)  # elsewhere: another embedding
    assert torch.equal(plain_got, tokens)  # off: no position

    flagged.eval()  # forward hands frame_tokens' output, position included, to HMP
    made, seen = [], []
    frame_tokens = flagged.frame_tokens

    def recorded(out):
        made.append(frame_tokens(out))
        return made[-1]
    flagged.frame_tokens = recorded
    hook = flagged.motion_perception.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        flagged(batch["frames"][:1], batch["expression"][:1])
    hook.remove()
    del flagged.frame_tokens
    assert torch.equal(seen[0][0], made[0]) and flagged.token_position is not None

    frames = batch["frames"][0]  # (T, 3, 64, 96): no padding, so infer sees forward's masks
    with torch.no_grad():
        whole = flagged(frames[None], batch["expression"][:1])
        logits, pred = flagged.infer(frames, batch["expression"][0], chunk=3)
    torch.testing.assert_close(logits, whole["pred_logits"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(pred, whole["pred_masks"][0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- Sec. 3.3
def test_memory_bank_update_is_eq8():
    bank = dshmp.MemoryBank(dim=4, target_video=torch.tensor([0, 0, 1]), momentum=0.2)
    before = bank.centroids.clone()
    anchor = torch.tensor([[3.0, 0.0, 4.0, 0.0]])
    bank.update(anchor, torch.tensor([1]))
    expected = F.normalize(0.2 * before[1] + 0.8 * torch.tensor([0.6, 0.0, 0.8, 0.0]), dim=0)
    assert torch.allclose(bank.centroids[1], expected, atol=1e-6)
    assert torch.equal(bank.centroids[[0, 2]], before[[0, 2]])


def test_negatives_come_from_the_same_video_first():
    target_video = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    bank = dshmp.MemoryBank(dim=4, target_video=target_video, momentum=0.2)
    g = torch.Generator().manual_seed(0)
    negatives = bank.negatives(1, 5, generator=g).tolist()
    assert len(negatives) == len(set(negatives)) == 5 and 1 not in negatives
    assert set(negatives[:2]) == {0, 2}  # the other targets of video 0 first
    assert all(target_video[n] != 0 for n in negatives[2:])
    assert set(bank.negatives(1, 1, generator=g).tolist()) <= {0, 2}  # truncated to the same video
    assert len(bank.negatives(8, 100, generator=g)) == 8  # at most every other target


def test_contrastive_loss_is_infonce_eq9():
    bank = dshmp.MemoryBank(dim=2, target_video=torch.tensor([0, 0, 1]), momentum=0.2)
    bank.centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    anchor = torch.tensor([[2.0, 2.0]])  # normalised: (0.7071, 0.7071)
    loss = dshmp.contrastive_loss(anchor, bank, torch.tensor([0]), num_negatives=2, temperature=0.5)
    s = 0.5 ** 0.5
    pos, negs = s / 0.5, [s / 0.5, -s / 0.5]
    expected = -pos + torch.logsumexp(torch.tensor([pos, *negs]), 0)
    assert torch.allclose(loss, expected, atol=1e-6)


# ---------------------------------------------------------------------------------- losses and training
def test_gradients_reach_every_trainable_parameter(toy):
    cfg, dataset, model, batch = toy
    st, tv = dshmp.memory_bank_targets(dataset.samples)
    bank = dshmp.MemoryBank(dim=cfg.cl_dim, target_video=tv, momentum=0.2)
    model.zero_grad()
    out = model(batch["frames"], batch["expression"])
    terms, anchors, _ = dshmp.compute_losses(cfg, out, batch["targets"], bank=bank, bank_targets=st[batch["index"]])
    assert set(terms) == {"frame_ce", "frame_bce", "frame_dice", "video_ce", "video_bce", "video_dice", "cl"}
    assert anchors.shape == (2, cfg.cl_dim)
    sum(terms.values()).backward()
    # transformers initialises the deformable attention's offsets to zero, so the pixel decoder's
    # level embedding gets an exactly zero gradient at the first step (it is still in the graph)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert no_grad == [] and zero == ["pixel_level.pixel_decoder.level_embed"]


def test_a_clip_without_a_visible_target_keeps_the_loss_finite(toy):
    """A target can vanish from a clip (a few pixels at full size): its sample has no matched video
    token, so no contrastive anchor; the loss stays finite and the memory bank skips it."""
    cfg, dataset, model, batch = toy
    st, tv = dshmp.memory_bank_targets(dataset.samples)
    bank = dshmp.MemoryBank(target_video=tv, dim=cfg.cl_dim, momentum=0.2)
    targets = [{"masks": torch.zeros_like(batch["targets"][0]["masks"]), "labels": batch["targets"][0]["labels"]},
               batch["targets"][1]]  # the first clip's target is empty in every frame
    out = model(batch["frames"], batch["expression"])
    terms, anchors, matched = dshmp.compute_losses(cfg, out, targets, bank=bank, bank_targets=st[batch["index"]])
    assert matched.tolist() == [False, True] and anchors.shape == (2, cfg.cl_dim)
    assert all(torch.isfinite(v) for v in terms.values())
    one = dshmp.contrastive_loss(anchors[1:], bank, st[batch["index"]][1:], num_negatives=cfg.cl_negatives,
                                 temperature=cfg.cl_temperature)
    assert torch.allclose(terms["cl"], one)  # the anchor of the clip with a target alone
    before = bank.centroids.clone()
    bank.update(anchors[matched].detach(), st[batch["index"]][matched])
    changed = (bank.centroids != before).any(1).nonzero().flatten().tolist()
    assert changed == [int(st[batch["index"][1]])]
    targets[1] = {"masks": torch.zeros_like(batch["targets"][1]["masks"]), "labels": batch["targets"][1]["labels"]}
    terms, _, matched = dshmp.compute_losses(cfg, out, targets, bank=bank, bank_targets=st[batch["index"]])
    assert not matched.any() and terms["cl"] == 0 and all(torch.isfinite(v) for v in terms.values())


def test_overfitting_one_batch_makes_the_loss_fall(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path, "--no-cl")
    torch.manual_seed(0)
    dataset = dshmp.make_dataset(cfg, toy_root, "train", train=True)
    model = dshmp.build_model(cfg, vocab=toy_vocab(dataset))
    batch = collate_video([dataset[2], dataset[3]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        terms, _, _ = dshmp.compute_losses(cfg, model(batch["frames"], batch["expression"]), batch["targets"])
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_resume_and_eval_write_their_files(toy_root, tmp_path, capsys, monkeypatch):
    # threshold 0 keeps every video token (a 3-step model scores every token under 0.5)
    common = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path), "--score-threshold", "0"]
    modes = []  # the model's mode each time the inference rule is called
    rule = dshmp.predict_masks
    monkeypatch.setattr(dshmp, "predict_masks", lambda model, *a, **k: modes.append(model.training) or rule(model, *a, **k))
    args = [*common, "--num-frames", "4", "--batch-size", "2", "--workers", "0", "--log-every", "1",
            "--save-every", "2", "--hmp-blocks", "1", "--cl-start", "0", "--train"]
    dshmp.main([*args, "--steps", "2"])
    assert modes and not any(modes)  # --train scores the model it trained in eval mode
    first = json.loads((tmp_path / "eval.json").read_text())
    bank_at_2 = read_checkpoint(tmp_path / "last.pt")["extra"]["memory_bank"]
    dshmp.main([*args, "--steps", "3", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the resumed run continued at step 3
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3
    result = json.loads((tmp_path / "eval.json").read_text())
    n = len(dshmp.MeViS(toy_root, "valid_u", train=False))
    assert result["n"] == first["n"] == n and len(result["per_expression"]) == n
    assert 0 <= result["J&F"] <= 1 and result["motion_only"]["n"] > 0
    assert list((tmp_path / "vis").glob("*/*.gif"))
    # --eval rebuilds the model with the settings it was trained with (--hmp-blocks 1), not the defaults,
    # and scores it as the end of --train did: both in eval mode (dropout off)
    (tmp_path / "eval.json").unlink()
    dshmp.main([*common, "--eval"])
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["per_expression"] == result["per_expression"]
    # --resume restores the memory bank: resuming with nothing left to do returns the saved bank
    cfg = toy_config(toy_root, tmp_path, "--hmp-blocks", "1", "--cl-start", "0", "--steps", "3", "--resume")
    from common.engine import setup_distributed
    bank = dshmp.train(cfg, setup_distributed(device="cpu"), toy_root, tmp_path).memory_bank
    saved = read_checkpoint(tmp_path / "last.pt")["extra"]["memory_bank"]
    assert torch.equal(bank.centroids, saved) and not torch.equal(saved, bank_at_2)


def test_config_round_trip_rebuilds_an_identical_model(toy_root, tmp_path):
    """A non-default model field (--toy-text-dim 32) needs no repeating: --eval and --predict rebuild
    the model from the checkpoint's own config and vocabulary."""
    args = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path), "--num-frames", "4",
            "--batch-size", "2", "--workers", "0", "--steps", "1", "--hmp-blocks", "1", "--toy-text-dim", "32",
            "--no-cl"]
    dshmp.main([*args, "--train"])
    trained = read_checkpoint(tmp_path / "last.pt")
    assert trained["config"]["toy_text_dim"] == 32 and trained["extra"]["vocab"]
    model, cfg = load_trained(tmp_path / "last.pt", dshmp.Config, dshmp.build_model, torch.device("cpu"))
    assert (cfg.toy_text_dim, cfg.hmp_blocks, cfg.cl) == (32, 1, False)
    assert model.text_encoder.hidden_size == 32 and len(model.motion_perception.blocks) == 1
    frames = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    logits, masks = model.infer(frames, "the red circle", chunk=8)
    again, _ = load_trained(tmp_path / "last.pt", dshmp.Config, dshmp.build_model, torch.device("cpu"))
    assert torch.equal(again.infer(frames, "the red circle", chunk=8)[1], masks)
    (tmp_path / "eval.json").unlink()
    dshmp.main(["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path), "--eval"])
    assert json.loads((tmp_path / "eval.json").read_text())["n"] > 0


# ---------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("num_frames", [1, 37])
def test_chunked_inference_on_short_and_long_videos(toy, num_frames):
    cfg, _, model, _ = toy
    model.eval()
    torch.manual_seed(1)
    frames = torch.randn(num_frames, 3, 64, 96)
    logits, pred = model.infer(frames, "the blue square moving up", chunk=16)
    logits_one_chunk, pred_one_chunk = model.infer(frames, "the blue square moving up", chunk=64)
    assert pred.shape == (cfg.num_motion_queries, num_frames, 16, 24)
    assert torch.allclose(pred, pred_one_chunk, atol=1e-4)  # chunking does not change the result
    assert torch.allclose(logits, logits_one_chunk, atol=1e-4)
    model.train()


class FixedVideoTokens(torch.nn.Module):
    """Stands in for DsHmp.infer: fixed scores and mask logits for M = 3 video tokens."""

    def __init__(self, logits, masks):
        super().__init__()
        self.logits, self.masks = logits, masks

    def infer(self, frames, expression, *, chunk):
        self.inferred_in_training_mode = self.training
        return self.logits, self.masks


def test_predict_masks_is_the_union_of_kept_tokens_cropped_and_resized():
    T, H, W = 2, 40, 60  # a frame of 40x60 is padded to 64x64 before the model; masks are at 16x16
    masks = torch.full((3, T, 16, 16), -5.0)
    masks[0, :, 2:6, 2:6] = 5.0  # token 0: a block near the top left
    masks[1, 1, 8:10, 12:14] = 5.0  # token 1: a block in frame 1 only
    masks[2] = 5.0  # token 2: everything, but its score is low
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-2.0, 0.0]])  # target scores 0.95, 0.73, 0.12
    model = FixedVideoTokens(logits, masks).train()
    frames = torch.zeros(T, 3, H, W)
    out = video_query_masks(model, frames, "x", (80, 120), threshold=0.5, chunk=8)
    assert model.inferred_in_training_mode is False  # the rule puts the model in eval mode
    # by hand: upsample the kept tokens to the padded 64x64, crop to 40x60, resize to 80x120, logit > 0, union
    kept = F.interpolate(masks[:2], size=(64, 64), mode="bilinear")[..., :40, :60]
    expected = (F.interpolate(kept, size=(80, 120), mode="bilinear") > 0).any(0)
    assert out.shape == (T, 80, 120) and out.dtype == torch.bool and torch.equal(out, expected)
    # a mask cell is 4 padded pixels, 8 output pixels: token 0 covers output rows and columns 16-48
    assert out[0, 20:44, 20:44].all() and not out[0, :, 60:].any() and not out[0, 60:].any()
    assert out[1, 66:78, 98:110].all() and not out[0, 66:78, 98:110].any()  # token 1, frame 1 only
    # no token above the threshold: an empty mask
    assert not video_query_masks(model, frames, "x", (80, 120), threshold=0.99, chunk=8).any()
    # single-object sets: the best token alone, whatever the threshold
    top1 = video_query_masks(model, frames, "x", (80, 120), threshold=0.99, chunk=8, top1=True)
    only_token_0 = F.interpolate(masks[:1], size=(64, 64), mode="bilinear")[..., :40, :60]
    assert torch.equal(top1, (F.interpolate(only_token_0, size=(80, 120), mode="bilinear") > 0)[0])
    # Ref-DAVIS17's protocol takes probabilities: the sigmoid of the best kept token's mask logits
    probs = video_query_masks(model, frames, "x", (80, 120), threshold=0.5, chunk=8, probabilities=True)
    expected = F.interpolate(kept, size=(80, 120), mode="bilinear").amax(0).sigmoid()
    assert probs.dtype == torch.float16 and torch.allclose(probs.float(), expected, atol=1e-3)
    assert torch.equal(probs > 0.5, out)
    # 300 frames: upsampled 5 at a time, the same as all at once
    long = FixedVideoTokens(logits, masks.repeat(1, 150, 1, 1))
    assert torch.equal(video_query_masks(long, torch.zeros(300, 3, H, W), "x", (80, 120), threshold=0.5, chunk=8),
                       out.repeat(150, 1, 1))


# ---------------------------------------------------------------------------------- DDP and CLI
DDP_SCRIPT = """
import sys, torch
import dshmp
from common.engine import setup_distributed, cleanup_distributed
from common.run import parse_config
from pathlib import Path
cfg = parse_config(dshmp.Config, dshmp.PRESETS, sys.argv[1:])
ddp = setup_distributed(device="cpu")
made, make_dataset = [], dshmp.make_dataset
def recording(*args, **kwargs):  # the training set train() builds on this process
    made.append(make_dataset(*args, **kwargs))
    return made[-1]
dshmp.make_dataset = recording
model = dshmp.train(cfg, ddp, Path(cfg.data_root), Path(cfg.out))
bank = model.memory_bank
torch.manual_seed(0)  # the same global RNG state on both processes: the draws differ by the data seed alone
draws = torch.stack([made[0][0]["frame_idx"] for _ in range(4)])
torch.save({"params": model.state_dict(), "bank": bank.centroids, "seed": made[0].seed, "draws": draws},
           f"{cfg.out}/rank{ddp.rank}.pt")
cleanup_distributed()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(toy_root, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path), "--num-frames", "4",
            "--batch-size", "2", "--workers", "0", "--steps", "2", "--cl-start", "0", "--train"]
    run_two_ranks([script, *args], env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert torch.equal(r0["bank"], r1["bank"])  # the memory bank stays the same on every process
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2
    # each process draws its own augmentations: its training set has the data seed seed + rank
    assert (r0["seed"], r1["seed"]) == (0, 1) and not torch.equal(r0["draws"], r1["draws"])


@pytest.mark.slow
def test_missing_mevis_exits_with_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "dshmp.py", "--data", "mevis", "--data-root", str(tmp_path / "nowhere"),
                             "--train"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert str(tmp_path / "nowhere") in result.stderr and "data/README.md" in result.stderr
    assert "Traceback" not in result.stderr


def test_count_params_builds_the_paper_configuration():
    cfg = parse_config(dshmp.Config, dshmp.PRESETS, ["--count-params"])
    model = dshmp.build_model(cfg, vocab=["a"], pretrained=False)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert counts["text_encoder"] == 124_645_632 - 590_592  # roberta-base without its (untrained) pooler
    assert frozen == counts["text_encoder"] + 1_536  # + the Swin's unused final LayerNorm
    assert counts["pixel_level"] == 27_522_234 + 5_421_504  # transformers' Swin-T + MSDeformAttn pixel decoder
    # PWAM on the Swin-T stages (96, 192, 384, 768 channels) over the 768-d words: four 1x1 convs
    # C -> C and the key and value projections 768 -> C, with biases; no language gate (the official
    # one never opens)
    pwams = sum(4 * (c * c + c) + 2 * (768 * c + c) for c in (96, 192, 384, 768))
    assert counts["fusion"] == pwams == 5_353_920
    assert model.decoder.query_feat.weight.shape == (20, 256)
    assert model.motion_decoder.query_feat.weight.shape == (10, 256)
    assert len(model.motion_perception.blocks) == 6 and len(model.motion_decoder.layers) == 3


def test_stage_probe_reads_the_stages_of_the_inference_path(toy):
    """tests/bench/toy_stage_probe.py: its video tokens are those DsHmp.infer scores, one feature
    and one mask tube per trajectory and per video token, and a clip whose frames are all the same
    (nothing moves) changes neither the frame tokens nor HMP's output over time."""
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    import toy_stage_probe
    cfg, _, model, batch = toy
    frames, expression = batch["frames"][0], batch["expression"][0]  # (4, 3, H, W)
    size = tuple(frames.shape[-2:])
    model.eval()
    with torch.no_grad():
        inputs, stages = toy_stage_probe.stage_features(model, frames, expression, size)
        logits, masks = model.infer(frames, expression, chunk=cfg.eval_chunk)
        _, still = toy_stage_probe.stage_features(model, frames[:1].expand(4, -1, -1, -1), expression, size)
    model.train()
    Q, M, T = cfg.num_static_queries, cfg.num_motion_queries, len(frames)
    assert all(len(stages[s]) == Q for s in toy_stage_probe.STAGES[:4]) and len(stages["video_tokens"]) == M
    assert inputs["tokens"].shape == (T, Q, cfg.dim)  # what HMP receives, in trajectory order
    assert all(tube.shape == (T, *size) for _, tube in stages["frame_tokens_mean"] + stages["video_tokens"])
    features = torch.stack([f for f, _ in stages["video_tokens"]])  # (M, C)
    assert torch.allclose(model.class_head(features), logits, atol=1e-5)
    expected = F.interpolate(masks, size=size, mode="bilinear") > 0  # (M, T, H, W)
    assert np.array_equal(np.stack([tube for _, tube in stages["video_tokens"]]), expected.numpy())
    for stage in ("frame_tokens_std", "hmp_std"):
        assert max(float(f.abs().max()) for f, _ in still[stage]) < 1e-4
        assert max(float(f.abs().max()) for f, _ in stages[stage]) > 1e-3  # real frames do change them
