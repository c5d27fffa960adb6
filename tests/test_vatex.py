"""VATEX (vatex.py): BAT, the CMD (--no-cmd, initialisation, fp32), the CLIP prior's pairing, Eqs. (5)-(6), inference,
training, resume, DDP, CLI."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vatex
from common.datasets import collate_image
from common.engine import read_checkpoint
from common.metrics import oc_iou
from common.run import parse_config
from common.text import build_vocab
from data.toy import make_toy_image
from ddp_launch import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--encoder-layers", "1", "--decoder-layers", "2", "--toy-clip-steps", "2", "--batch-size", "2",
         "--workers", "0", "--num-points", "256"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "refcoco"
    make_toy_image(root, seed=5, train_images=6, val_images=3, test_images=1, verbose=False)
    return root


def toy_config(root, out, *extra):
    return parse_config(vatex.Config, vatex.PRESETS, ["--data", "toy", "--data-root", str(root), "--out", str(out),
                                                      *SMALL, "--train", *extra])


@pytest.fixture(scope="module")
def toy(toy_root, tmp_path_factory):
    cfg = toy_config(toy_root, tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    dataset = vatex.make_dataset(cfg, toy_root, "train", train=True)
    vocab = build_vocab([s["expression"] for s in dataset.samples] + ["a photo of ."])
    model = vatex.build_model(cfg, vocab=vocab)
    first = {}  # one sentence of each of the first three images
    for i, s in enumerate(dataset.samples):
        first.setdefault(s["image_id"], i)
    batch = collate_image([dataset[i] for i in list(first.values())[:3]])
    return cfg, dataset, model, batch


# ------------------------------------------------------------------------------ Eqs. (2)-(3)
def test_bat_equals_hand_computation_and_ignores_padded_words():
    torch.manual_seed(0)
    bat = vatex.BAT(dim=8, heads=1).eval()
    visual, words, pos = torch.randn(1, 6, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, True, False]])

    def attend(mha, q, k, v, keep=None):  # one head, by hand
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        logits = (q @ wq.T + bq) @ (k @ wk.T + bk).transpose(1, 2) / math.sqrt(8)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None], -math.inf)
        return (logits.softmax(-1) @ (v @ wv.T + bv)) @ mha.out_proj.weight.T + mha.out_proj.bias

    new_words = attend(bat.text_attn, words + pos, visual, visual) * words  # Eq. (2)
    new_visual = attend(bat.visual_attn, visual, new_words + pos, new_words, mask) * visual  # Eq. (3)
    out_visual, out_words = bat(visual, words, pos, mask)
    torch.testing.assert_close(out_words, new_words)
    torch.testing.assert_close(out_visual, new_visual)
    # the padded word changes nothing the pixels see
    changed = words.clone()
    changed[0, 3] = 100.0
    torch.testing.assert_close(bat(visual, changed, pos, mask)[0], out_visual)


# ------------------------------------------------------------------------ Sec. 3.2 CMD
def small_cmd(heads=4):
    torch.manual_seed(0)
    return vatex.ContextualMultimodalDecoder(in_channels=[32, 64, 128, 256], dim=64, heads=heads,
                                             encoder_layers=2, encoder_ffn_dim=128)


def test_no_cmd_keeps_text_guided_pixels_and_drops_only_the_word_update(toy, toy_root, tmp_path):
    """Table 4's baseline uses "only text-guided vision features" and no vision-aware text features:
    with --no-cmd every BAT (3 early, 4 CMD levels) still updates the pixels from the words, Eq. (3),
    with f_w as the resizer gives it (no Eq. 2), so the pixels depend on the sentence while the
    decoder's word attention and the queries (the mean, Eq. 5) read f_w itself. With the CMD the
    words reaching the decoder are updated. The unused word attention is not built (DDP waits for
    every parameter's gradient) and every parameter that is built gets one."""
    cfg, dataset, model, batch = toy
    vocab = build_vocab([s["expression"] for s in dataset.samples] + ["a photo of ."])
    plain_cfg = toy_config(toy_root, tmp_path, "--no-cmd")
    torch.manual_seed(0)
    plain = vatex.build_model(plain_cfg, vocab=vocab)
    bats = [*plain.pixel_decoder.early_bats, *plain.pixel_decoder.bats]
    assert len(bats) == 7 and all(b.text_attn is None for b in bats)
    assert all(b.text_attn is not None for b in [*model.pixel_decoder.early_bats, *model.pixel_decoder.bats])
    texts = ["the red circle", "the small blue square on the left that is moving up"]
    image, size = batch["images"][:1], batch["image_sizes"][:1]
    for m, updates_words in ((plain, False), (model, True)):
        seen, training = {}, m.training
        hooks = [m.text_proj.register_forward_hook(lambda mod, a, out: seen.update(f_w=out)),
                 m.pixel_decoder.register_forward_hook(lambda mod, a, out: seen.update(pixels=out)),
                 m.decoder.register_forward_pre_hook(
                     lambda mod, args: seen.update(sentence=args[3], words=args[5]))]
        m.eval()
        with torch.no_grad():
            m(image, size, texts, torch.zeros(2, dtype=torch.long))  # two sentences, one image
        for hook in hooks:
            hook.remove()
        m.train(training)
        pixels = seen["pixels"]["mask_features"]  # (2, C, h, w): the same image for both
        assert not torch.allclose(pixels[0], pixels[1], atol=1e-4)  # text-guided vision features
        if updates_words:
            assert not torch.allclose(seen["words"], seen["f_w"], atol=1e-4)  # F_4^w
        else:
            torch.testing.assert_close(seen["words"], seen["f_w"], rtol=0, atol=0)
            mask = model.clip.encode_words(texts)["attn_mask"]
            for n in range(2):
                torch.testing.assert_close(seen["sentence"][n], seen["f_w"][n][mask[n]].mean(0))
    plain.train()
    texts, index, targets, triplets = vatex.captions_of(batch)
    outputs = plain(batch["images"], batch["image_sizes"], texts, index)
    sum(vatex.compute_losses(plain_cfg, outputs, targets, triplets=triplets).values()).backward()
    assert_gradients_reach_every_trainable_parameter(plain)


def test_deformable_encoder_and_cmd_start_as_the_official_code():
    """Deformable DETR's initialisation (MSDeformAttn._reset_parameters, as the official
    Mask2Former encoder runs it): zero offset weights and a bias that puts point k of head h k + 1
    cells out along the direction 2 pi h / heads, scaled so that its largest coordinate is 1, on
    every level; a zero attention-weight projection, so every query starts attending uniformly
    over its points; zero value / output biases. The official cmd.py zeroes the biases of the
    input projections and of the mask projection."""
    cmd = small_cmd(heads=8)
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]])
    for layer in cmd.encoder.layers:
        attn = layer.self_attn
        assert (attn.n_heads, attn.n_levels, attn.n_points) == (8, 3, 4)
        assert not attn.sampling_offsets.weight.any()
        bias = attn.sampling_offsets.bias.detach().view(8, 3, 4, 2)  # heads, levels, points, xy
        for h, level, k in itertools.product(range(8), range(3), range(4)):
            torch.testing.assert_close(bias[h, level, k], directions[h].float() * (k + 1),
                                       rtol=0, atol=1e-5)
        assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
        weights = attn.attention_weights(torch.randn(5, 64)).view(5, 8, 3 * 4).softmax(-1)
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 12))
        assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()
    assert not any(proj[0].bias.any() for proj in cmd.input_proj) and not cmd.mask_proj.bias.any()


def test_cmd_levels_are_eq_4_by_hand():
    """Eq. (4): F_i = Conv2d(V_i' + Ups(F_{i-1})), V_i' the BAT's pixels of level i (Eqs. 2-3),
    Ups a bilinear resize to level i's size, no Ups term at level 1; the mask features are the
    1x1 projection of F_4 (what Eq. 7 dots the queries with)."""
    cmd = small_cmd().eval()
    stages = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])]
    words, pos, mask = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
    bat_pixels, fused_in, fused_out = [], [], []
    hooks = [bat.register_forward_hook(lambda m, a, out: bat_pixels.append(out[0])) for bat in cmd.bats]
    def keep(module, args, out):  # returns None: the output stays as it is
        fused_in.append(args[0])
        fused_out.append(out)
    hooks += [f.register_forward_hook(keep) for f in cmd.fuse]
    with torch.no_grad():
        out = cmd(stages, words, pos, mask)
    for hook in hooks:
        hook.remove()
    for i in range(4):
        h, w = fused_out[i].shape[-2:]
        v = bat_pixels[i].transpose(1, 2).reshape(2, 64, h, w)  # V_i' (N, C, h, w)
        if i > 0:
            v = v + F.interpolate(fused_out[i - 1], size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(fused_in[i], v)
        torch.testing.assert_close(fused_out[i], cmd.fuse[i](v))
    assert [tuple(f.shape[-2:]) for f in fused_out] == [(2, 3), (4, 6), (8, 12), (16, 24)]
    torch.testing.assert_close(out["features"], fused_out[:3])
    torch.testing.assert_close(out["mask_features"], cmd.mask_proj(fused_out[3]))


def test_decoder_masks_are_eq_7_on_every_prediction(toy):
    """Eq. (7): s = Sigmoid(F_4 . F_o^T): each prediction's mask logits are the mask embedding
    of the normed queries dotted with the mask features (the sigmoid is applied by the loss and
    at inference), for the first prediction (before any layer) and after every layer."""
    _, _, model, batch = toy
    decoder = model.decoder
    torch.manual_seed(0)
    N, C, h, w = 2, decoder.hidden_dim, 8, 12
    features = [torch.randn(N, C, 2 * 2 ** i, 3 * 2 ** i) for i in range(3)]
    pos = [torch.randn_like(f) for f in features]
    mask_features, sentence = torch.randn(N, C, h, w), torch.randn(N, C)
    words, word_pos = torch.randn(N, 4, C), torch.randn(N, 4, C)
    seen = []  # the queries each prediction reads: the sentence repeated, then each layer's output
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in decoder.layers]
    with torch.no_grad():
        out = decoder(features, pos, mask_features, sentence, None, words, word_pos,
                      torch.ones(N, 4, dtype=torch.bool))
    for hook in hooks:
        hook.remove()
    queries = [sentence[:, None].expand(N, decoder.num_queries, C), *seen]
    preds = [*out["aux_outputs"], out]
    assert len(preds) == len(queries) == len(decoder.layers) + 1
    for pred, q in zip(preds, queries):
        embed = decoder.mask_embed(decoder.decoder_norm(q))  # (N, Q, C)
        torch.testing.assert_close(pred["pred_masks"], torch.einsum("nqc,nchw->nqhw", embed, mask_features))


def test_cmd_runs_in_fp32_under_autocast():
    """As the official cmd.py (`autocast(enabled=False)`, inputs cast to float): under bf16 autocast
    (CPU here; CUDA's autocast casts Linear and Conv2d alike) and with bf16 inputs, the CMD's inner
    layers and its outputs are float32."""
    cmd = small_cmd().eval()
    stages = [torch.randn(2, c, 64 // s, 96 // s).bfloat16()
              for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])]  # (2, C_s, 64/s, 96/s)
    words, pos = torch.randn(2, 5, 64).bfloat16(), torch.randn(2, 5, 64)  # (2, L, C)
    dtypes = {}
    for name, module in (("deformable value_proj", cmd.encoder.layers[0].self_attn.value_proj),
                         ("lateral conv", cmd.lateral[2][0]), ("fusion conv", cmd.fuse[3][0])):
        module.register_forward_hook(lambda m, a, out, name=name: dtypes.update({name: out.dtype}))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = cmd(stages, words, pos, torch.ones(2, 5, dtype=torch.bool))
    assert set(dtypes.values()) == {torch.float32} and len(dtypes) == 3, dtypes
    tensors = [*out["features"], *out["pos"], out["mask_features"], out["words"]]
    assert all(t.dtype == torch.float32 for t in tensors), [t.dtype for t in tensors]


# ------------------------------------------------------------------------------- Sec. 3.1 prior
def test_clip_prior_pairs_each_caption_with_its_own_image(toy):
    """Three images, captions in VATEX's interleaved order (two per image): the prior of caption k
    is the prior of its image alone. The official tiling (caption k with image k mod B) fails this."""
    _, _, model, batch = toy
    texts = ["the red circle", "a blue square", "the green shape", "the big triangle", "a ball", "the box"]
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    together = model.clip_prior(batch["images"], batch["image_sizes"], texts, index)  # (6, C)
    for k, b in enumerate(index.tolist()):
        alone = model.clip_prior(batch["images"][b:b + 1], batch["image_sizes"][b:b + 1], [texts[k]],
                                 torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(together[k], alone[0])
    images = batch["images"].repeat(2, 1, 1, 1)  # the official pairing for comparison: image k mod B
    official = model.clip_prior(images, batch["image_sizes"] * 2, texts, torch.arange(6) % 3)
    assert not torch.allclose(official[1], together[1])


def test_clip_heatmap_is_eq1_normalised_cosine():
    patches, text = torch.randn(2, 5, 3), torch.randn(2, 3)
    expected = torch.stack([F.cosine_similarity(patches[n], text[n][None], dim=-1) for n in range(2)])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(vatex.clip_heatmap(patches, text), expected)
    torch.testing.assert_close(vatex.clip_heatmap(patches * 7, text * 0.1), expected)  # scale-free


# ------------------------------------------------------------------------------ Eqs. (5)-(6)
def test_sentence_feature_is_a_per_sample_masked_mean(toy):
    _, _, model, batch = toy
    texts = ["the red circle", "the small blue square on the left that is moving up"]
    captured = {}
    model.pixel_decoder.register_forward_hook(lambda m, a, out: captured.update(words=out["words"]))
    model.eval()
    with torch.no_grad():
        out = model(batch["images"][:1], batch["image_sizes"][:1], texts, torch.zeros(2, dtype=torch.long))
    mask = model.clip.encode_words(texts)["attn_mask"]
    assert mask[0].sum() < mask[1].sum()  # the short sentence is padded
    for n in range(2):
        expected = captured["words"][n][mask[n]].mean(0)
        torch.testing.assert_close(out["sentence"][n], expected)


def test_mcc_loss_is_eq6():
    sentence = torch.randn(5, 4)
    triplets = torch.tensor([[0, 1, 2], [3, 4, -1]])  # the second has no negative
    p1, p2, n = (F.normalize(sentence[i], dim=0) for i in (0, 1, 2))
    sim = lambda a, b: torch.exp(a @ b)  # noqa: E731
    expected = -torch.log(sim(p1, p2) / (sim(p1, n) + sim(p2, n)))
    torch.testing.assert_close(vatex.mcc_loss(sentence, triplets), expected)
    assert vatex.mcc_loss(sentence, triplets[1:]).item() == 0.0


def test_infonce_loss_is_the_official_symmetric_unpaired_form():
    sentence = torch.randn(7, 4)
    triplets = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 0, -1]])
    f = F.normalize(sentence, dim=-1)
    negatives = f[[2, 5]]
    total = 0.0
    for a, b in ((0, 1), (1, 0)):  # InfoNCE(q, p, N) + InfoNCE(p, q, N)
        losses = []
        for q_i, p_i in triplets[:, [a, b]].tolist():
            logits = torch.cat([(f[q_i] @ f[p_i])[None], negatives @ f[q_i]]) / 0.1
            losses.append(-logits.log_softmax(0)[0])
        total = total + torch.stack(losses).mean()
    torch.testing.assert_close(vatex.infonce_loss(sentence, triplets, 0.1), total)


def test_triplets_sample_positive_and_negative_as_the_official_mapper(toy):
    _, dataset, _, _ = toy
    base = dataset.base
    torch.manual_seed(0)
    for i in range(len(dataset)):
        item, sample = dataset[i], dataset.samples[i]
        own = base.sentences[sample["ref_id"]]
        assert item["positive"] in own or (item["positive"][:-1] == item["expression"] and item["positive"][-1] == ".")
        if item["negative"] is not None:
            refs = [r for r in base.image_refs[sample["image_id"]] if base.ref_ann[r] != sample["ann_id"]]
            assert any(item["negative"] in base.sentences[r] for r in refs)
            assert item["negative_mask"].shape == item["mask"].shape and item["negative_mask"].any()
            assert not (item["negative_mask"] & item["mask"]).all()


def test_captions_of_keeps_images_and_targets_together(toy):
    _, _, _, batch = toy
    texts, index, targets, triplets = vatex.captions_of(batch)
    assert len(texts) == len(index) == len(targets)
    for b, (p1, p2, n) in enumerate(triplets.tolist()):
        assert texts[p1] == batch["expression"][b] and index[p1] == index[p2] == b
        assert torch.equal(targets[p1]["masks"], batch["targets"][b]["masks"])
        if n >= 0:
            assert texts[n] == batch["negative"][b] and index[n] == b
            assert targets[n]["masks"].shape == targets[p1]["masks"].shape


# --------------------------------------------------------------------------------- inference
def test_top1_picks_the_most_probable_query_and_crops_the_padding(monkeypatch):
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]])  # query 1 has the highest target probability
    masks = torch.full((1, 3, 16, 16), -1.0)
    masks[0, 1, :4, :4] = 1.0  # a 16x16 block at the top left of the padded 64x64 input

    class Fake(torch.nn.Module):
        infer = vatex.VATEX.infer  # the image path of VATEX, around this forward

        def forward(self, images, sizes, texts, index):
            assert images.shape[-2:] == (64, 64) and sizes == [(40, 64)]
            return {"pred_logits": logits, "pred_masks": masks}

    out = vatex.predict_masks(Fake(), torch.zeros(1, 3, 40, 64), "x", (20, 32), vatex.Config())
    assert out.shape == (1, 20, 32) and out.dtype == torch.bool
    assert out[0, :7, :7].all() and not out[0, 10:].any() and not out[0, :, 10:].any()


def test_predict_and_shapes(toy):
    _, _, model, batch = toy
    texts, index, targets, triplets = vatex.captions_of(batch)
    out = model(batch["images"], batch["image_sizes"], texts, index)
    n, hp, wp = len(texts), *batch["images"].shape[-2:]
    assert out["pred_logits"].shape == (n, 5, 2) and out["pred_masks"].shape == (n, 5, hp // 4, wp // 4)
    assert len(out["aux_outputs"]) == 2 and out["sentence"].shape == (n, 64)


# ---------------------------------------------------------------------------------- training
def assert_gradients_reach_every_trainable_parameter(model):
    """A gradient for every trainable parameter (DDP waits for each), non-zero except the level
    embedding's: it reaches the loss only through the deformable encoder's offset and
    attention-weight projections, which start at zero (Deformable DETR's initialisation)."""
    starts_at_zero = {"pixel_decoder.level_embed"}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or (n not in starts_at_zero and not p.grad.any()))]
    assert not missing, missing


def test_gradients_reach_every_trainable_parameter_and_not_clip(toy):
    cfg, _, model, batch = toy
    model.train()
    texts, index, targets, triplets = vatex.captions_of(batch)
    terms = vatex.compute_losses(cfg, model(batch["images"], batch["image_sizes"], texts, index), targets, triplets=triplets)
    model.zero_grad()
    sum(terms.values()).backward()
    assert_gradients_reach_every_trainable_parameter(model)
    assert not any(p.requires_grad for p in model.clip.parameters()) and not model.clip.model.training


def test_overfitting_one_batch_makes_the_loss_fall(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path, "--no-mcc")
    torch.manual_seed(0)
    dataset = vatex.make_dataset(cfg, toy_root, "train", train=True)
    model = vatex.build_model(cfg, vocab=build_vocab([s["expression"] for s in dataset.samples]))
    batch = collate_image([dataset[0], dataset[1]])
    texts, index, targets, triplets = vatex.captions_of(batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        terms = vatex.compute_losses(cfg, model(batch["images"], batch["image_sizes"], texts, index), targets,
                                     triplets=triplets)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_resume_and_eval_with_oc_iou(toy_root, tmp_path, capsys, monkeypatch):
    common = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "run")]
    args = [*common, *SMALL, "--log-every", "1", "--save-every", "2", "--train"]
    modes = []  # the model's mode each time the inference rule is called
    rule = vatex.predict_masks
    monkeypatch.setattr(vatex, "predict_masks", lambda model, *a, **k: modes.append(model.training) or rule(model, *a, **k))
    vatex.main([*args, "--steps", "2"])
    assert modes and not any(modes)  # --train scores the model it trained in eval mode
    assert (tmp_path / "clip-toy" / "seed0.pt").is_file()  # the toy CLIP stage, beside the run
    # a run that reuses the toy CLIP trains as the one that trained it (the same losses)
    vatex.main([*common[:-1], str(tmp_path / "again"), *SMALL, "--log-every", "1", "--train", "--steps", "2"])
    def losses(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "s/it")}
                for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert losses("again") == losses("run")
    vatex.main([*args, "--steps", "3", "--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "reusing the toy CLIP" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n"] == len(result["per_expression"]) > 0 and result["motion"]["n"] > 0
    # Oc-IoU (Eqs. 9-10) equals a recomputation from the trained model's own predictions
    from common.run import load_trained
    model, cfg = load_trained(tmp_path / "run" / "last.pt", vatex.Config, vatex.build_model, torch.device("cpu"))
    dataset = vatex.make_dataset(cfg, toy_root, "val", train=False)
    groups = {}
    for i in range(len(dataset)):
        item = dataset[i]
        pred = vatex.predict_masks(model, item["image"][None], item["expression"], item["orig_size"], cfg)[0]
        groups.setdefault(item["ann_id"], (item["gt"], []))[1].append(pred)
    expected = oc_iou([(gt, torch.stack(preds)) for gt, preds in groups.values()])
    assert math.isclose(result["Oc-IoU"], expected, abs_tol=1e-9)
    # --eval of the checkpoint scores what the end of --train scored (both in eval mode)
    (tmp_path / "run" / "eval.json").unlink()
    vatex.main([*common, "--eval"])
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["per_expression"] == result["per_expression"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(toy_root, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text("import sys, torch, vatex\nvatex.main(sys.argv[1:])\n")
    args = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "run"), *SMALL,
            "--steps", "2", "--train"]
    outputs = run_two_ranks([script, *args], env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    assert sum("reusing the toy CLIP" in o for o in outputs) == 0  # trained once, by rank 0
    assert read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n"] > 0


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_missing_refcoco_exits_with_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "vatex.py", "--data", "refcoco", "--data-root", str(tmp_path / "nowhere"),
                             "--train"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "data/README.md" in result.stderr


@pytest.mark.slow
def test_unavailable_weights_name_the_model(toy_root, tmp_path):
    """The toy set read as RefCOCO (its layout is RefCOCO's), with no weights in an empty offline cache."""
    result = subprocess.run([sys.executable, "vatex.py", "--data", "refcoco", "--data-root", str(toy_root),
                             "--image-root", str(toy_root / "images"), "--out", str(tmp_path), "--train"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "microsoft/swin-base-patch4-window12-384-in22k" in result.stderr
    assert len(result.stderr.strip().splitlines()) < 12


def test_count_params_matches_the_official_model():
    """The official model counted from its module definitions (nero1342/VATEX @ 80af16a): 114,513,978
    trainable (Swin-B 86,880,376; resizers 197,632 + 116,736; CMD 10,541,504; decoder 16,777,730)
    and 149,620,736 frozen (CLIP ViT-B/16 without logit_scale). Ours adds Eq. (4)'s Conv2d at
    level 1 (3x3, 256 -> 256, no bias, GroupNorm) and keeps CLIP's logit_scale and Swin's unused
    final LayerNorm (frozen)."""
    cfg = parse_config(vatex.Config, vatex.PRESETS, ["--count-params"])
    model = vatex.build_model(cfg, vocab=["a"], pretrained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    level1_conv = 256 * 256 * 9 + 2 * 256
    assert trainable == 114_513_978 + level1_conv
    assert frozen == 149_620_736 + 1 + 2 * 1024
    cmd = sum(p.numel() for p in model.pixel_decoder.parameters())
    assert cmd == 10_541_504 + level1_conv
    assert sum(p.numel() for p in model.decoder.parameters()) == 16_777_730


def test_clip_view_ignores_padding_crops_the_centre_and_uses_clip_statistics():
    from common.backbones import clip_view
    from common.backbones import CLIP_MEAN
    from common.datasets import IMAGENET_MEAN, IMAGENET_STD
    rgb = torch.rand(3, 20, 40)  # a wide image in [0, 1]
    rgb[:, :, 10:30] = torch.tensor(CLIP_MEAN)[:, None, None]  # its centre half is CLIP's mean colour
    image = (rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    padded = F.pad(image, (0, 24, 0, 12), value=5.0)  # (3, 32, 64), padding that must not leak in
    view = clip_view(padded[None], [(20, 40)], 10, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # short side 10: (3, 10, 20), centre crop 10x10
    assert view.shape == (1, 3, 10, 10)
    assert view[0, :, :, 2:8].abs().max() < 1e-4  # the centre: CLIP's mean -> 0
    torch.testing.assert_close(view, clip_view(image[None], [(20, 40)], 10, mean=IMAGENET_MEAN,
                                                       std=IMAGENET_STD))
