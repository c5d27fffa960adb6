"""DMVS (dmvs.py): Eqs. (1)-(4) and (7) by hand, the sigma rule, the frozen VITA, the ablation
wiring, chunked inference, the toy VITA stage, training, resume, DDP, CLI errors, parameters."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dmvs
from common.datasets import collate_video
from common.engine import read_checkpoint, setup_distributed
from common.run import parse_config, video_query_masks
from common.text import build_vocab
from data import toy_pretrain
from data.toy import make_toy_video
from ddp_launch import run_two_ranks
from test_dshmp import FixedVideoTokens  # a stand-in for a model's infer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--num-frames", "4", "--batch-size", "2", "--workers", "0", "--decoder-layers", "2",
         "--vita-steps", "2", "--num-points", "256"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "mevis"
    make_toy_video(root, seed=3, train_videos=6, valid_videos=2, verbose=False)
    return root


def toy_config(root, out, *extra):
    return parse_config(dmvs.Config, dmvs.PRESETS, ["--data", "toy", "--data-root", str(root), "--out", str(out),
                                                    "--vita-weights", str(Path(out) / "vita" / "last.pt"),
                                                    *SMALL, "--train", *extra])


def toy_model(cfg, root, **overrides):
    dataset = dmvs.make_dataset(cfg, root, "train", train=True)
    torch.manual_seed(0)
    model = dmvs.build_model(cfg.__class__(**{**cfg.__dict__, **overrides}),
                             vocab=build_vocab([s["expression"] for s in dataset.samples]))
    return model, collate_video([dataset[0], dataset[1]])


@pytest.fixture(scope="module")
def toy(toy_root, tmp_path_factory):
    cfg = toy_config(toy_root, tmp_path_factory.mktemp("run"))
    return (cfg, *toy_model(cfg, toy_root))


# ---------------------------------------------------------------------------------- equations
def test_static_and_motion_cues_follow_the_papers_example(toy):
    """Sec. 3.2: adjectives, prepositions and nouns are static cues, adverbs and verbs motion cues; its
    example "Cat turning around and playing with toy" gives static {cat, toy} and motion {turning
    around, playing with}: a preposition attached to a verb is motion; "and" is in neither set."""
    e = "Cat turning around and playing with toy"
    split = {kind: [e[s:t] for s, t, k in dmvs.decoupled_cues(e) if k == kind] for kind in ("static", "motion", None)}
    assert split == {"static": ["Cat", "toy"], "motion": ["turning", "around", "playing", "with"], None: ["and"]}
    e = "the man on the left walking slowly towards the car"
    split = {kind: [e[s:t] for s, t, k in dmvs.decoupled_cues(e) if k == kind] for kind in ("static", "motion")}
    assert split == {"static": ["man", "on", "left", "car"], "motion": ["walking", "slowly", "towards"]}
    # the model's token masks (the sentence embedding, last, joins both sets)
    _, model, _ = toy
    e = e.lower()
    text, offsets = model.encode_text([e]), model.text_encoder([e])["offsets"][0].tolist()
    def tokens(mask):
        return [e[s:t] for (s, t), keep in zip(offsets, mask[0, :-1].tolist()) if keep]
    assert tokens(text.static_mask) == ["man", "on", "left", "car"] and text.static_mask[0, -1]
    assert tokens(text.motion_mask) == ["walking", "slowly", "towards"] and text.motion_mask[0, -1]


def test_dmvs_layers_are_initialised_as_vitas(toy):
    """No official DMVS code: its attention and FFN layers take VITA's xavier_uniform_ initialisation."""
    from test_vita import assert_xavier
    _, model, _ = toy
    matrices = [p for part in (model.encoder, model.layers) for p in part.parameters() if p.dim() > 1]
    assert len(matrices) > 10
    for p in matrices:
        assert_xavier(p)


def test_residual_attention_is_eqs_1_to_4_by_hand():
    """With one head and identity projections, the layer is X + softmax(X Y^T / sqrt(C)) Y, then
    its LayerNorm; padded keys get no weight."""
    torch.manual_seed(0)
    C = 8
    layer = dmvs.ResidualAttention(C, 1)
    with torch.no_grad():
        layer.attn.in_proj_weight.copy_(torch.eye(C).repeat(3, 1))
        layer.attn.in_proj_bias.zero_()
        layer.attn.out_proj.weight.copy_(torch.eye(C))
        layer.attn.out_proj.bias.zero_()
    x, y = torch.randn(2, 3, C), torch.randn(2, 5, C)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    logits = x @ y.transpose(1, 2) / math.sqrt(C)  # (2, 3, 5)
    attn = logits.masked_fill(~mask[:, None], -math.inf).softmax(-1)
    expected = F.layer_norm(x + attn @ y, (C,))
    assert torch.allclose(layer(x, y, mask), expected, atol=1e-5)


def _identity_attention(attn, C):
    with torch.no_grad():  # one head, identity projections: softmax(q k^T / sqrt(C)) v
        attn.in_proj_weight.copy_(torch.eye(C).repeat(3, 1))
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(C))
        attn.out_proj.bias.zero_()


def _attend(q, k, v, mask=None):  # (B, M, C) x (B, K, C) -> (B, M, C), one head
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], -math.inf)
    return logits.softmax(-1) @ v


def test_motion_query_decoder_layer_is_eq_8_by_hand():
    """Eq. (8) with one head and identity projections: the words (padded ones get no weight),
    then F_me, then self-attention, then the FFN, each a post-norm residual; the query positions
    are added to the queries (and to the keys of the self-attention), never to the values."""
    torch.manual_seed(0)
    C = 8
    layer = dmvs.DecoderLayer(dim=C, heads=1, ffn_dim=16)
    for attn in (layer.word_attn, layer.motion_expr_attn, layer.self_attn):
        _identity_attention(attn, C)
    queries, pos = torch.randn(2, 3, C), torch.randn(2, 3, C)
    words, f_me = torch.randn(2, 5, C), torch.randn(2, 1, C)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x = F.layer_norm(queries + _attend(queries + pos, words, words, mask), (C,))
    x = F.layer_norm(x + _attend(x + pos, f_me, f_me), (C,))
    x = F.layer_norm(x + _attend(x + pos, x + pos, x), (C,))
    expected = F.layer_norm(x + layer.ffn(x), (C,))
    assert torch.allclose(layer(queries, pos, words, mask, f_me), expected, atol=1e-5)


def test_heads_are_eqs_9_and_10_on_every_layer(toy):
    """Eq. (9): class logits H_c(q); Eq. (10): masks H_m(q) . mask features, for the normed
    queries of every decoder layer (the last as the output, the others as aux_outputs)."""
    cfg, model, batch = toy
    torch.manual_seed(0)
    B, T, h, w = 2, 3, 4, 5
    found = dmvs.Instances(frame_queries=torch.randn(B, T, 4, cfg.dim),
                           video_queries=torch.randn(B, 6, cfg.dim),
                           scores=torch.rand(B, 6),
                           mask_features=torch.randn(B, T, model.mask_embed.layers[-1].out_features, h, w))
    text = model.encode_text(batch["expression"])
    seen = []
    hooks = [layer.register_forward_hook(lambda module, args, out: seen.append(out)) for layer in model.layers]
    try:
        out = model.decode(found, text)
    finally:
        for hook in hooks:
            hook.remove()
    preds = [*out["aux_outputs"], out]
    assert len(preds) == len(seen) == len(model.layers)
    for pred, queries in zip(preds, seen):
        q = F.layer_norm(queries, (cfg.dim,), model.norm.weight, model.norm.bias)
        assert torch.allclose(pred["pred_logits"], q @ model.class_head.weight.T + model.class_head.bias, atol=1e-5)
        embed = model.mask_embed(q)  # (B, M, D)
        masks = (embed[:, :, None, :, None, None] * found.mask_features[:, None]).sum(3)  # (B, M, T, h, w)
        assert torch.allclose(pred["pred_masks"], masks, atol=1e-4)


def test_encoder_order_and_table_4_switches(toy):
    """Eq. (3) reads Q'_f (after Eq. 1), Eq. (4) reads Q'_v (after Eq. 2); without the cues the
    raw queries are read, and the Eq. (1)/(2) layers do not exist."""
    cfg, model, batch = toy
    torch.manual_seed(0)
    text = model.encode_text(batch["expression"])
    fq, vq = torch.randn(2, 12, cfg.dim), torch.randn(2, 10, cfg.dim)
    enc = model.encoder
    by_hand = enc.read_videos(enc.read_frames(text.sentence, enc.static(fq, text.cues, text.static_mask)),
                              enc.motion(vq, text.cues, text.motion_mask))
    assert torch.allclose(enc(fq, vq, text), by_hand)
    plain = dmvs.MotionExpressionEncoder(dim=cfg.dim, heads=cfg.heads, static_cues=False, motion_cues=False)
    plain.load_state_dict(enc.state_dict(), strict=False)
    assert plain.static is None and plain.motion is None
    assert torch.allclose(plain(fq, vq, text), enc.read_videos(enc.read_frames(text.sentence, fq), vq))


def test_cue_masks_hold_the_sentence_and_split_the_words(toy):
    _, model, _ = toy
    text = model.encode_text(["the red circle moving to the left"])
    static, motion = text.static_mask[0], text.motion_mask[0]
    assert static[-1] and motion[-1]  # F_se joins both sets, so neither is empty
    assert torch.equal(text.cues[:, -1:], text.sentence)
    words = static[:-1] | motion[:-1]
    assert not (words & ~text.word_mask[0]).any() and not (static[:-1] & motion[:-1]).any()
    # "red circle left" static, "moving to" motion, the two "the" in neither (Sec. 3.2)
    assert motion[:-1].sum() == 2 and static[:-1].sum() == 3 and (text.word_mask[0] & ~words).sum() == 2


def test_topk_initialization_is_eq_7_by_hand():
    video_queries = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.4, 0.3, 0.2, 0.95]])
    picked = dmvs.select_queries(video_queries, scores, 2)
    assert torch.equal(picked[0], video_queries[0, [1, 3]]) and torch.equal(picked[1], video_queries[1, [4, 0]])


def test_s_v_is_the_best_foreground_probability(toy):
    _, model, batch = toy
    found = model.find_instances(batch["frames"])
    logits = model.vita(batch["frames"])["pred_logits"]  # (B, V, K+1), the last class is no object
    assert torch.allclose(found.scores, logits.softmax(-1)[..., :-1].max(-1).values)
    decoded = model.decode(found, model.encode_text(batch["expression"]))
    mqi = model.initial_queries(found, model.encode_text(batch["expression"]))
    assert torch.equal(mqi, dmvs.select_queries(found.video_queries, found.scores, model.num_motion_queries))
    assert decoded["pred_logits"].shape == (2, model.num_motion_queries, 2)


def test_sigma_rule_keeps_the_union_of_queries_above_0_7():
    assert dmvs.Config().score_threshold == 0.7 and dmvs.PRESETS["ytvos"]["top1"]
    masks = torch.full((3, 2, 16, 16), -5.0)
    masks[0, :, :4] = 5.0  # query 0: the top rows, score 0.75
    masks[1, :, 8:] = 5.0  # query 1: the bottom half, score 0.69
    masks[2, :, :, :4] = 5.0  # query 2: the left columns, score 0.9
    p = torch.tensor([0.75, 0.69, 0.9])
    model = FixedVideoTokens(torch.stack([p.log(), (1 - p).log()], 1), masks)
    out = video_query_masks(model, torch.zeros(2, 3, 64, 64), "x", (64, 64), threshold=0.7, chunk=8)
    expected = (F.interpolate(masks[[0, 2]], size=(64, 64), mode="bilinear") > 0).any(0)
    assert torch.equal(out, expected) and out[:, :8].all() and not out[:, 40:, 20:].any()
    top1 = video_query_masks(model, torch.zeros(2, 3, 64, 64), "x", (64, 64), threshold=0.7, chunk=8, top1=True)
    assert torch.equal(top1, F.interpolate(masks[2:], size=(64, 64), mode="bilinear")[0] > 0)


# ---------------------------------------------------------------------------------- the model
def test_ablations_wire_the_decoder_memory(toy_root, toy):
    cfg, model, batch = toy
    text = model.encode_text(batch["expression"])
    found = model.find_instances(batch["frames"])
    seen = []
    hook = model.layers[0].motion_expr_attn.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
    model.decode(found, text)
    V = found.video_queries.shape[1]
    for overrides, memory in [(dict(mqi="random"), 1 + V), (dict(mqi="text"), 1 + V), (dict(mee=False), 1),
                              (dict(mqi="random", mee=False), 1 + V)]:
        other, _ = toy_model(cfg, toy_root, **overrides)
        other.layers[0].motion_expr_attn.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
        other.decode(found, other.encode_text(batch["expression"]))
        assert seen[-1] == memory, overrides
        assert (other.encoder is None) == (not overrides.get("mee", True))
        assert (other.random_queries is not None) == (overrides.get("mqi") == "random")
    hook.remove()
    assert seen[0] == 1  # the full model reads F_me alone
    text_init, _ = toy_model(cfg, toy_root, mqi="text")
    t = text_init.encode_text(batch["expression"])
    assert torch.equal(text_init.initial_queries(found, t), t.sentence.expand(-1, cfg.num_motion_queries, -1))
    with pytest.raises(ValueError, match="mqi"):
        toy_model(cfg, toy_root, mqi="best")


def test_frozen_vita_gets_no_gradient_and_stays_bit_identical(toy):
    cfg, model, batch = toy
    model.train()
    assert not model.vita.training and model.text_encoder.training
    before = {k: v.clone() for k, v in model.vita.state_dict().items()}
    groups = dmvs.param_groups(model, lr=1e-3, weight_decay=0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.vita.parameters()}
    terms = dmvs.compute_losses(cfg, model(batch["frames"], batch["expression"]), batch["targets"])
    (terms["ce"] + terms["bce"] + terms["dice"]).backward()
    assert all(p.grad is None for p in model.vita.parameters())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.vita.state_dict().items())
    optimizer.zero_grad()


def test_chunked_inference_equals_the_whole_clip(toy):
    _, model, batch = toy
    model.eval()
    frames = batch["frames"][:1]  # (1, T, 3, H, W), H and W multiples of 32
    whole = model(frames, batch["expression"][:1])
    logits, masks = model.infer(frames[0], batch["expression"][0], chunk=3)
    assert torch.allclose(logits, whole["pred_logits"][0], atol=1e-4)
    assert torch.allclose(masks, whole["pred_masks"][0], atol=1e-3)
    model.train()


def square_track(T, h, w, columns):
    """(T, h, w) mask logits: a 4 x 2 square at rows 2-5 and the given first column per frame
    (None: empty in that frame)."""
    masks = torch.full((T, h, w), -30.0)
    for t, c in enumerate(columns):
        if c is not None:
            masks[t, 2:6, c:c + 2] = 30.0
    return masks


def test_track_displacement_is_the_centre_minus_the_first_visible_centre():
    T, h, w = 3, 8, 10
    masks = torch.stack([square_track(T, h, w, [1, 3, 5]),  # moving right 2 pixels a frame
                         square_track(T, h, w, [4, 4, 4]),  # still
                         square_track(T, h, w, [None, 2, 4])])[None]  # entering at frame 1
    expected = torch.tensor([[[0, 0], [0.2, 0], [0.4, 0]], [[0, 0]] * 3, [[0, 0], [0, 0], [0.2, 0]]])
    torch.testing.assert_close(dmvs.track_displacement(masks)[0], expected)


def test_token_position_is_off_by_default_and_embeds_the_tracks(toy_root, toy):
    """--token-position (ours, a diagnostic outside the paper): off by default, and built last, so
    DMVS's other weights start as without it. On, before the MEE each video query gets the mean
    over the frames of PositionEmbedding(its track's displacement): the same for every still track
    wherever it sits, another for a moving one; each frame query gets that of its mask's centre.
    infer() (chunks) reads the same masks as forward()."""
    cfg, _, batch = toy
    assert not cfg.token_position
    plain, _ = toy_model(cfg, toy_root)
    flagged, _ = toy_model(cfg, toy_root, token_position=True)
    assert plain.token_position is None
    extra = {k: v for k, v in flagged.state_dict().items() if k not in plain.state_dict()}
    assert sorted(extra) == ["token_position.proj.bias", "token_position.proj.weight"]
    assert all(torch.equal(v, flagged.state_dict()[k]) for k, v in plain.state_dict().items())

    torch.manual_seed(0)
    B, T, Q, V, h, w = 1, 3, 4, 6, 8, 10
    tracks = [[1, 3, 5], [4, 4, 4], [6, 6, 6], [None, 2, 4], [None] * 3, [None] * 3]
    video_masks = torch.stack([square_track(T, h, w, c) for c in tracks])[None]  # (1, V, T, h, w)
    found = dmvs.Instances(frame_queries=torch.randn(B, T, Q, cfg.dim), video_queries=torch.randn(B, V, cfg.dim),
                           scores=torch.rand(B, V),
                           mask_features=torch.randn(B, T, plain.mask_embed.layers[-1].out_features, h, w),
                           frame_masks=video_masks[0, :Q].transpose(0, 1)[None], video_masks=video_masks)
    seen = []
    text = plain.encode_text(batch["expression"][:1])
    for model in (flagged, plain):
        model.eval()
        hook = model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[:2]))
        with torch.no_grad():
            model.decode(found, text)
        hook.remove()
    (frame_in, video_in), (plain_frame_in, plain_video_in) = seen
    embed = flagged.token_position
    expected = found.video_queries + embed(dmvs.track_displacement(video_masks)).mean(2)
    torch.testing.assert_close(video_in, expected)
    added = video_in - found.video_queries  # (1, V, C)
    torch.testing.assert_close(added[0, 1], added[0, 2])  # two still tracks, in different places
    torch.testing.assert_close(added[0, 1], embed(torch.zeros(2)))
    assert not torch.allclose(added[0, 0], added[0, 1], atol=1e-3)  # moving against still
    centres = dmvs.mask_position(found.frame_masks)[..., :2]  # (1, T, Q, 2)
    torch.testing.assert_close(frame_in, (found.frame_queries + embed(centres)).flatten(1, 2))
    assert torch.equal(plain_video_in, found.video_queries)  # off: no position
    assert torch.equal(plain_frame_in, found.frame_queries.flatten(1, 2))

    frames = batch["frames"][:1]  # (1, T, 3, H, W), H and W multiples of 32
    with torch.no_grad():
        whole = flagged(frames, batch["expression"][:1])
        logits, masks = flagged.infer(frames[0], batch["expression"][0], chunk=3)
    torch.testing.assert_close(logits, whole["pred_logits"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(masks, whole["pred_masks"][0], atol=1e-3, rtol=0)


def test_overfitting_one_batch_makes_the_loss_fall(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path)
    model, batch = toy_model(cfg, toy_root)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        terms = dmvs.compute_losses(cfg, model(batch["frames"], batch["expression"]), batch["targets"])
        loss = 2 * terms["ce"] + 5 * terms["bce"] + 5 * terms["dice"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------- running
def test_toy_vita_stage_trains_then_is_reused(toy_root, tmp_path, capsys):
    cfg = toy_config(toy_root, tmp_path)
    ddp = setup_distributed(device="cpu")
    path = toy_pretrain.train_toy_vita(cfg, ddp, toy_root)
    saved = read_checkpoint(path)
    assert saved["step"] == 2 and saved["extra"]["sizes"] == toy_pretrain.toy_vita_sizes(cfg)
    assert (toy_root / "train" / "instances_vis.json").is_file()
    assert toy_pretrain.train_toy_vita(cfg, ddp, toy_root) == path
    assert "reusing the toy VITA" in capsys.readouterr().out
    assert torch.equal(read_checkpoint(path)["model"]["class_head.weight"], saved["model"]["class_head.weight"])
    other = toy_config(toy_root, tmp_path, "--vita-video-queries", "8")
    with pytest.raises(SystemExit, match="other sizes"):
        toy_pretrain.train_toy_vita(other, ddp, toy_root)
    assert toy_pretrain.toy_vita_path(parse_config(dmvs.Config, dmvs.PRESETS, ["--data", "toy", "--train"])) == \
        Path("runs/vita-toy/last.pt")


def test_train_resume_and_eval_write_their_files(toy_root, tmp_path, capsys, monkeypatch):
    # threshold 0 keeps every motion query (a 3-step model scores every query under 0.7)
    common = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path), "--score-threshold", "0"]
    modes = []  # the model's mode each time the inference rule is called
    rule = dmvs.predict_masks
    monkeypatch.setattr(dmvs, "predict_masks", lambda model, *a, **k: modes.append(model.training) or rule(model, *a, **k))
    args = [*common, "--vita-weights", str(tmp_path / "vita" / "last.pt"), *SMALL, "--log-every", "1",
            "--save-every", "2", "--train"]
    dmvs.main([*args, "--steps", "2"])
    assert modes and not any(modes)  # --train scores the model it trained in eval mode
    vita = read_checkpoint(tmp_path / "vita" / "last.pt")["model"]
    trained = read_checkpoint(tmp_path / "last.pt")["model"]
    assert all(torch.equal(trained[f"vita.{k}"], v) for k, v in vita.items())  # the toy VITA, frozen
    dmvs.main([*args, "--steps", "3", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and read_checkpoint(tmp_path / "last.pt")["step"] == 3
    result = json.loads((tmp_path / "eval.json").read_text())
    n = len(dmvs.MeViS(toy_root, "valid_u", train=False))
    assert result["n"] == n and 0 <= result["J&F"] <= 1 and result["motion_only"]["n"] > 0
    (tmp_path / "eval.json").unlink()
    dmvs.main([*common, "--eval"])  # rebuilt from the checkpoint's config (--decoder-layers 2), eval mode
    assert json.loads((tmp_path / "eval.json").read_text())["per_expression"] == result["per_expression"]


DDP_SCRIPT = """
import sys, torch
import dmvs
from common.engine import setup_distributed, cleanup_distributed
from common.run import parse_config
from pathlib import Path
cfg = parse_config(dmvs.Config, dmvs.PRESETS, sys.argv[1:])
ddp = setup_distributed(device="cpu")
model = dmvs.train(cfg, ddp, Path(cfg.data_root), Path(cfg.out))
torch.save(model.state_dict(), f"{cfg.out}/rank{ddp.rank}.pt")
cleanup_distributed()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(toy_root, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path),
            "--vita-weights", str(tmp_path / "vita" / "last.pt"), *SMALL, "--steps", "2", "--train"]
    run_two_ranks([script, *args], env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # VITA stage and DMVS stage alike
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert read_checkpoint(tmp_path / "vita" / "last.pt")["step"] == 2


# ---------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("extra, message", [([], "--vita-weights PATH"),
                                            (["--vita-weights", "nowhere.pth"], "nowhere.pth")])
def test_paper_configuration_needs_the_vita_weights(tmp_path, extra, message):
    cfg = parse_config(dmvs.Config, dmvs.PRESETS, ["--data", "mevis", "--train", *extra])
    vita = dmvs.build_vita({**toy_pretrain.TOY_VITA, "conv_dim": 32, "mask_dim": 32, "hidden": 32, "heads": 4, "ffn": 64,
                            "num_classes": 2, "frame_queries": 3, "video_queries": 3})
    with pytest.raises((SystemExit, FileNotFoundError), match=message):
        dmvs.load_vita(cfg, setup_distributed(device="cpu"), None, vita)


@pytest.mark.slow
def test_missing_mevis_exits_with_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "dmvs.py", "--data", "mevis", "--data-root", str(tmp_path / "nowhere"),
                             "--train"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr


def test_count_params_at_the_paper_configuration():
    """Table 8: 12.7M learnable parameters; VITA (Swin-L, OVIS) and RoBERTa frozen. Built on the
    meta device (no memory, nothing downloaded)."""
    cfg = parse_config(dmvs.Config, dmvs.PRESETS, ["--count-params"])
    with torch.device("meta"):
        model = dmvs.build_model(cfg, vocab=["a"], pretrained=False)
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert learnable == 12_707_586 and abs(learnable / 12.7e6 - 1) < 0.05
    # by hand (C = 256, FFN 2048): an attention + LayerNorm is 4C^2 + 4C + 2C = 263,680
    attention = 4 * 256 * 256 + 4 * 256 + 2 * 256
    assert counts["encoder"] == 4 * attention  # Eqs. (1)-(4), no FFN
    assert counts["layers"] == 6 * (3 * attention + 2 * 256 * 2048 + 2048 + 256 + 512)  # Eq. (8)
    assert counts["word_proj"] == counts["sentence_proj"] == 768 * 256 + 256 + 512
    assert counts["vita"] == 228_707_752 and counts["text_encoder"] == 124_055_040
    assert model.vita.decoder.num_queries == 200 and model.vita.class_head.out_features == 26
