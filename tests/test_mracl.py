"""MRaCL on LAVT (mracl.py): the reconstructed loss (verbonly, alpha), false negatives, the ambiguity
filter, verb-phrase samples, the fused embedding, the partners kept out of the mask decoder, the LAVT
schedule and parameter count, training, resume, DDP, CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mracl
from common.datasets import collate_image
from common.engine import read_checkpoint
from common.run import parse_config
from common.text import build_vocab
from data.toy import make_toy_image
from ddp_launch import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "4", "--workers", "0", "--decoder-dim", "32", "--toy-text-dim", "32"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "refcoco"
    make_toy_image(root, seed=7, train_images=8, val_images=3, test_images=1, verbose=False)
    return root


def toy_config(root, out, *extra):
    return parse_config(mracl.Config, mracl.PRESETS, ["--data", "toy", "--data-root", str(root), "--out", str(out),
                                                      *SMALL, "--train", *extra])


def tiny_model(*texts):
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--data", "toy", *SMALL, "--count-params"])
    torch.manual_seed(0)
    return mracl.build_model(cfg, vocab=build_vocab(list(texts)))


def hand_loss(embeds, anchor, positive, negatives, m=0.5, tau=0.05):
    """-log of the margined positive's share against the listed negatives (angular similarity)."""
    z = F.normalize(embeds, dim=-1)
    theta = torch.arccos((z @ z.T).clamp(-1 + 1e-6, 1 - 1e-6))
    pos = (1 - 2 * (theta[anchor, positive] + m) / math.pi) / tau
    negs = [(1 - 2 * theta[anchor, k] / math.pi) / tau for k in negatives]
    return -(pos - torch.logsumexp(torch.stack([pos, *negs]), 0))


def loss_batch():
    """Four samples: 0 a sentence with its verb phrase; 1 a verb-phrase sample (its partner: its
    sentence); 2 a sentence without a phrase; 3 a sentence with its phrase, another target of sample
    0's image and category (a false negative of 0)."""
    return {"expression": ["s0", "p1", "s2", "s3"], "partner": ["p0", "s1", None, "p3"],
            "is_phrase": [False, True, False, False], "ann_id": [10, 11, 12, 13], "image_id": [1, 2, 3, 1],
            "category_id": [5, 5, 5, 5], "pad_mask": torch.zeros(4, 8, 8, dtype=torch.bool),
            "targets": [{"masks": torch.zeros(1, 8, 8, dtype=torch.bool)} for _ in range(4)]}


def batch_loss(*flags):
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params", *flags])
    batch = loss_batch()
    index, _ = mracl.with_partners(cfg, batch)
    assert index == [0, 1, 2, 3, 0, 1, 3]
    embeds = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    outputs = {"pred_masks": torch.zeros(4, 2, 8, 8), "embeds": embeds}
    pairs = mracl.contrastive_pairs(cfg, batch, index)
    terms = mracl.compute_losses(cfg, outputs, batch["targets"], pad_mask=batch["pad_mask"], pairs=pairs)
    return terms["mracl"], embeds


# ------------------------------------------------------------------------------ the MRaCL loss
def test_verbonly_loss_is_the_block_of_originals_and_phrases_weighted_by_alpha():
    """Embeddings 0-3 the samples, 4-6 the partners of samples 0, 1, 3. Originals: 0, 5 (sample 1's
    sentence), 3; their phrases: 4, 1, 6. In the 3 x 3 block (rows originals, columns phrases, the
    diagonal positive) the pairs of 0 and 3 are false negatives (same image and category); sample 2
    (no phrase) takes no part."""
    got, embeds = batch_loss("--alpha", "0.3")
    rows = [hand_loss(embeds, 0, 4, [1]), hand_loss(embeds, 5, 1, [4, 6]), hand_loss(embeds, 3, 6, [1])]
    cols = [hand_loss(embeds, 4, 0, [5]), hand_loss(embeds, 1, 5, [0, 3]), hand_loss(embeds, 6, 3, [5])]
    torch.testing.assert_close(got, 0.3 * torch.stack(rows).mean() + 0.7 * torch.stack(cols).mean())


def test_full_matrix_loss_weights_original_and_phrase_anchors_by_alpha():
    """--no-verbonly: every embedding of the batch; negatives all but self, the positive, the same
    target and the same image and category (0, 3, 4, 6 all show image 1, category 5)."""
    got, embeds = batch_loss("--no-verbonly", "--alpha", "0.3")
    originals = [hand_loss(embeds, 0, 4, [1, 2, 5]), hand_loss(embeds, 5, 1, [0, 2, 3, 4, 6]),
                 hand_loss(embeds, 3, 6, [1, 2, 5])]
    phrases = [hand_loss(embeds, 4, 0, [1, 2, 5]), hand_loss(embeds, 1, 5, [0, 2, 3, 4, 6]),
               hand_loss(embeds, 6, 3, [1, 2, 5])]
    torch.testing.assert_close(got, 0.3 * torch.stack(originals).mean() + 0.7 * torch.stack(phrases).mean())
    # at alpha 0.5 the plain mean over every anchor, the loss before alpha and verbonly existed
    half, _ = batch_loss("--no-verbonly")
    torch.testing.assert_close(half, torch.stack(originals + phrases).mean())


def test_angular_margin_loss_equals_hand_computation():
    embeds = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]])
    positive = torch.zeros(4, 4, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True
    negative = ~positive & ~torch.eye(4, dtype=torch.bool)
    negative[0, 3] = negative[3, 0] = False  # a filtered false negative
    m, tau = 0.5, 0.05
    z = F.normalize(embeds, dim=-1)
    theta = torch.arccos((z @ z.T).clamp(-1 + 1e-6, 1 - 1e-6))
    s = 1 - 2 * theta / math.pi
    losses = []
    for a, p in ((0, 1), (1, 0)):
        pos = (1 - 2 * (theta[a, p] + m) / math.pi) / tau
        negs = [s[a, k] / tau for k in range(4) if negative[a, k]]
        losses.append(-(pos - torch.logsumexp(torch.stack([pos, *negs]), 0)))
    expected = torch.stack(losses).mean()
    got = mracl.angular_contrastive_loss(embeds, positive, negative, margin=m, temperature=tau)
    torch.testing.assert_close(got, expected)
    # the margin makes the loss larger: the positive must beat the negatives by m
    assert got > mracl.angular_contrastive_loss(embeds, positive, negative, margin=0.0, temperature=tau)


@pytest.mark.parametrize("second", [[1.0, 0.0], [-1.0, 0.0]], ids=["theta_0", "theta_pi"])
def test_angular_loss_has_a_finite_gradient_at_theta_0_and_pi(second):
    """arccos'(x) = -1/sqrt(1 - x^2) is unbounded at x = +-1: the cosine is clamped first."""
    embeds = torch.tensor([[1.0, 0.0], second, [0.0, 1.0]], requires_grad=True)
    positive = torch.zeros(3, 3, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True
    negative = ~positive & ~torch.eye(3, dtype=torch.bool)
    loss = mracl.angular_contrastive_loss(embeds, positive, negative, margin=0.5, temperature=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeds.grad).all()


def test_table3_objectives_equal_hand_computations():
    embeds = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    positive = torch.zeros(4, 4, dtype=torch.bool)
    positive[0, 2] = positive[2, 0] = True
    negative = ~positive & ~torch.eye(4, dtype=torch.bool)
    z = F.normalize(embeds, dim=-1)
    cos = z @ z.T
    for loss, tau in (("infonce", 0.1), ("simcse", 0.05)):
        cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params", "--loss", loss])
        expected = torch.stack([-(cos[a, p] / tau).sub(torch.logsumexp(cos[a, [p, *[k for k in range(4)
                                if negative[a, k]]]] / tau, 0)) for a, p in ((0, 2), (2, 0))]).mean()
        torch.testing.assert_close(mracl.contrastive_terms(cfg, embeds, positive, negative), expected)
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params", "--loss", "l2"])
    torch.testing.assert_close(mracl.contrastive_terms(cfg, embeds, positive, negative), ((z[0] - z[2]) ** 2).sum())


def test_false_negative_masks_on_a_hand_made_batch():
    # samples: 0 and 1 the same target (two sentences), 2 the same image and category, 3 another image
    # of that category, 4 the verb phrase of sample 0 (its positive)
    ann, image, category = [10, 10, 11, 12, 10], [1, 1, 1, 2, 1], [5, 5, 5, 5, 5]
    positives = torch.tensor([[0, 4]])
    positive, negative = mracl.pair_masks(ann, image, category, positives, fn_filter=True)
    assert positive.nonzero().tolist() == [[0, 4], [4, 0]]
    # with the filter, sample 0's only negative is sample 3 (another image)
    assert negative[0].nonzero().flatten().tolist() == [3]
    assert negative[3].nonzero().flatten().tolist() == [0, 1, 2, 4]
    _, unfiltered = mracl.pair_masks(ann, image, category, positives, fn_filter=False)
    assert unfiltered[0].nonzero().flatten().tolist() == [1, 2, 3]  # all but itself and its positive
    assert not unfiltered.diagonal().any()


# ------------------------------------------------------------------- verb phrases and the filter
def test_ambiguity_filter_and_verb_phrase_samples(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path)
    once = mracl.make_dataset(cfg, toy_root, "train", train=True)
    none = mracl.make_dataset(toy_config(toy_root, tmp_path, "--filter", "none"), toy_root, "train", train=True)
    counts = {}
    for ann in once.base.annotations.values():
        counts[(ann["image_id"], ann["category_id"])] = counts.get((ann["image_id"], ann["category_id"]), 0) + 1
    crowded = [i for i in none.phrase if counts[(none.samples[i]["image_id"], none.samples[i]["category_id"])] > 1]
    assert crowded and len(once.phrase) == len(none.phrase) - len(crowded)  # only unique categories keep phrases
    assert all(counts[(once.samples[i]["image_id"], once.samples[i]["category_id"])] == 1 for i in once.phrase)
    assert len(once) == len(once.base) + len(once.phrase)  # one extra sample per phrase
    torch.manual_seed(0)
    k = len(once.base)  # the first verb-phrase sample
    item, source = once[k], once[once.extra[0]]
    assert item["expression"] == once.phrase[once.extra[0]] and item["partner"] == source["expression"]
    assert torch.equal(item["mask"], source["mask"]) and item["ann_id"] == source["ann_id"]
    assert source["partner"] == item["expression"]
    assert item["is_phrase"] and not source["is_phrase"]
    no_vp = mracl.make_dataset(toy_config(toy_root, tmp_path, "--no-vp"), toy_root, "train", train=True)
    assert len(no_vp) == len(no_vp.base) and no_vp.phrase == once.phrase  # phrases stay positives


def test_default_phrase_keeps_the_subject_as_the_page_figure():
    """The page's figure: "A black and white cat stretching its paw in the air" -> "Cat stretching its
    paw" (the subject's head noun kept; our rule also keeps the trailing "in the air")."""
    caption = [{"sent_id": 1, "expression": "a black and white cat stretching its paw in the air"}]
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params"])
    assert mracl.load_phrases(cfg, caption)["1"] == "cat stretching its paw in the air"
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params", "--no-phrase-subject"])
    assert mracl.load_phrases(cfg, caption)["1"] == "stretching its paw in the air"


def test_verb_phrases_file_replaces_the_rule(toy_root, tmp_path):
    base = mracl.make_dataset(toy_config(toy_root, tmp_path), toy_root, "train", train=False)
    first = str(base.samples[0]["sent_id"])
    path = tmp_path / "phrases.json"
    path.write_text(json.dumps({first: "moving up and down"}))
    dataset = mracl.make_dataset(toy_config(toy_root, tmp_path, "--verb-phrases", str(path), "--filter", "none"),
                                 toy_root, "train", train=True)
    assert dataset.phrase == {0: "moving up and down"}


def test_motion_split_uses_the_verb_rule():
    samples = [{"sent_id": 1, "expression": "the man riding a bike"},
               {"sent_id": 2, "expression": "the red umbrella on the left"},
               {"sent_id": 3, "expression": "a dog that is running"}]
    assert mracl.motion_split(samples) == {"motion": {"1", "3"}, "static": {"2"}}


# ------------------------------------------------------------------- the model: embedding, decoder
def test_fused_embedding_averages_the_valid_pixels_only():
    """A 80 x 96 image on a 128 x 96 canvas: of the stage-4 map's rows (32 pixels each) 0-1 are valid,
    2 half valid, 3 padding. Large values written into row 3 leave the embedding as it was."""
    texts = ["the red circle moving left", "the blue square"]
    model = tiny_model(*texts).eval()
    g = torch.Generator().manual_seed(0)
    batch = collate_image([{"image": torch.randn(3, h, 96, generator=g), "mask": torch.zeros(h, 96, dtype=torch.bool)}
                           for h in (80, 128)])
    assert batch["images"].shape[-2:] == (128, 96)
    seen = []

    def fill(value):
        def hook(module, inputs, outputs):
            x = outputs[3].clone()  # (2, C, 4, 3)
            x[0, :, 3] = value
            seen.append(x)
            return [*outputs[:3], x]
        return hook

    embeds = []
    for value in (0.0, 1e3):
        handle = model.fusion.register_forward_hook(fill(value))
        with torch.no_grad():
            embeds.append(model(batch["images"], texts, pad_mask=batch["pad_mask"])["embeds"])
        handle.remove()
    torch.testing.assert_close(embeds[0], embeds[1])
    x = seen[1]
    valid_mean = (x[0, :, :2].sum((1, 2)) + 0.5 * x[0, :, 2].sum(1)) / (2 * 3 + 0.5 * 3)
    with torch.no_grad():
        torch.testing.assert_close(embeds[1][0], model.fuser(valid_mean))
        torch.testing.assert_close(embeds[1][1], model.fuser(x[1].mean((1, 2))))  # no padding: every cell


def test_the_partners_stay_out_of_the_mask_decoder():
    """In training the decoder's BatchNorm normalises with the statistics of what it decodes: the
    samples' logits and the running statistics are the same with and without the partners in the pass."""
    texts = ["the red circle moving left", "the blue square", "circle moving left"]
    model = tiny_model(*texts).train()
    model.text_encoder.eval()  # its dropout would draw differently in the two passes
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    norms = [m for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)]

    def run(index):
        for norm in norms:
            norm.reset_running_stats()
        with torch.no_grad():
            outputs = model(images[index], texts[:len(index)], samples=2)
        return outputs, [torch.cat([n.running_mean, n.running_var]) for n in norms]

    (alone, stats_alone), (paired, stats_paired) = run([0, 1]), run([0, 1, 0])
    assert paired["pred_masks"].shape == (2, 2, 96, 96) and paired["embeds"].shape[0] == 3
    torch.testing.assert_close(paired["pred_masks"], alone["pred_masks"])
    torch.testing.assert_close(stats_paired, stats_alone)


def test_the_schedule_is_lavts_40_epochs_on_gref_umd():
    """LAVT-RIS: an epoch is one random sentence per ref (data/dataset_refer_bert.py, len = refs);
    G-Ref umd has 42,226 training refs; DistributedSampler gives each of 8 processes ceil(n / 8),
    DataLoader(batch_size=4, drop_last=True); 40 epochs."""
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params"])
    assert cfg.steps == 40 * (math.ceil(42_226 / 8) // 4) == 52_760


# ---------------------------------------------------------------------------------- training
def test_one_step_reaches_every_parameter_and_the_partners_get_no_segmentation_loss(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path, "--filter", "none")
    torch.manual_seed(0)
    dataset = mracl.make_dataset(cfg, toy_root, "train", train=True)
    vocab = build_vocab([s["expression"] for s in dataset.samples] + list(dataset.phrase.values()))
    model = mracl.build_model(cfg, vocab=vocab)
    with_phrase = [i for i in range(len(dataset.base)) if i in dataset.phrase][:2]
    without = [i for i in range(len(dataset.base)) if i not in dataset.phrase][:2]
    batch = collate_image([dataset[i] for i in with_phrase + without])
    index, texts = mracl.with_partners(cfg, batch)
    assert index == [0, 1, 2, 3, 0, 1] and texts[4:] == [dataset.phrase[i] for i in with_phrase]
    outputs = model(batch["images"][index], texts, pad_mask=batch["pad_mask"][index], samples=4)
    assert outputs["pred_masks"].shape[0] == 4 and outputs["embeds"].shape[0] == 6
    terms = mracl.compute_losses(cfg, outputs, batch["targets"], pad_mask=batch["pad_mask"],
                                 pairs=mracl.contrastive_pairs(cfg, batch, index) if cfg.mracl else None)
    model.zero_grad()
    (terms["ce"] + terms["mracl"]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    # the cross-entropy reads the four samples only
    ce = mracl.segmentation_loss(cfg, outputs["pred_masks"][:4], batch["targets"], batch["pad_mask"])
    torch.testing.assert_close(terms["ce"], ce)


def test_train_resume_and_eval(toy_root, tmp_path, capsys, monkeypatch):
    common = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "run"), *SMALL]
    args = [*common, "--log-every", "1", "--save-every", "2", "--train"]
    modes = []  # the model's mode each time the inference rule is called
    rule = mracl.predict_masks
    monkeypatch.setattr(mracl, "predict_masks", lambda model, *a: modes.append(model.training) or rule(model, *a))
    mracl.main([*args, "--steps", "2"])
    assert modes and not any(modes)  # --train scores the model it trained in eval mode
    mracl.main([*args, "--steps", "3", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["motion"]["n"] + result["static"]["n"] == result["n"] > 0 and "Oc-IoU" in result
    # --eval of the checkpoint scores what the end of --train scored (both in eval mode: BatchNorm's
    # running statistics, dropout off)
    (tmp_path / "run" / "eval.json").unlink()
    mracl.main([*common, "--eval"])
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["per_expression"] == result["per_expression"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(toy_root, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text("import sys, mracl\nmracl.main(sys.argv[1:])\n")
    ddp_args = ["--data", "toy", "--data-root", str(toy_root), "--out", str(tmp_path / "ddp"), *SMALL, "--steps", "2",
                "--train"]
    run_two_ranks([script, *ddp_args], env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    assert read_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 2


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_missing_refcocog_exits_with_one_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "mracl.py", "--data", "refcocog", "--data-root", str(tmp_path / "nowhere"),
                             "--train"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "data/README.md" in result.stderr


def test_count_params_compares_with_the_lavt_reference():
    """LAVT-RIS @ 1da0af9 counted from its module definitions (Swin-B w12, BERT-base without pooler):
    Swin 86,876,536 + per-stage norms 3,840; PWAMs 8,531,200; language gates 2,785,280 (four, 2 C^2
    each); SimpleDecoding 20,651,010; BERT 108,891,648. Ours builds no gate on stage 4 (2 x 1024^2,
    it feeds nothing), keeps transformers' unused final Swin LayerNorm (frozen) and adds the Fuser."""
    cfg = parse_config(mracl.Config, mracl.PRESETS, ["--count-params"])
    model = mracl.build_model(cfg, pretrained=False)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.backbone) == 86_876_536 + 3_840 + 2_048
    assert count(model.fusion.pwams) == 8_531_200
    assert count(model.fusion.gates) == 2_785_280 - 2 * 1024 ** 2
    assert count(model.decoder) == 20_651_010
    assert count(model.text_encoder) == 108_891_648
    assert count(model.fuser) == 1024 * 256 + 256


# ----------------------------------------------------------- LLM verb phrases (data/extract_verb_phrases.py)
def test_extract_verb_phrases_writes_and_resumes(toy_root, tmp_path):
    """A tiny random causal LM saved locally stands in for the instruct model (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.text import word_tokenizer
    from data import extract_verb_phrases as ex
    tokenizer = word_tokenizer(build_vocab([ex.PROMPT, "none"]), max_length=512)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    out = tmp_path / "phrases.json"
    args = ["--model", str(tmp_path / "lm"), "--data-root", str(toy_root), "--dataset", "refcoco", "--split-by", "unc",
            "--split", "val", "--out", str(out), "--batch-size", "4"]
    ex.main([*args, "--limit", "5"])
    first = json.loads(out.read_text())
    assert len(first) == 5 and all(isinstance(v, str) for v in first.values())
    key = next(iter(first))
    first[key] = "kept from the first run"
    out.write_text(json.dumps(first))
    ex.main(args)  # resumes: only the missing sentences are generated
    done = json.loads(out.read_text())
    assert done[key] == "kept from the first run"
    n = len(mracl.make_dataset(toy_config(toy_root, tmp_path), toy_root, "val", train=False))
    assert len(done) == n


def test_answer_reads_the_first_line():
    from data.extract_verb_phrases import answer
    assert answer(" cat stretching its paw.\nExpression: x") == "cat stretching its paw"
    assert answer(" NONE\n") == "" and answer("\n\n") == ""


def test_without_mracl_every_parameter_is_used(toy_root, tmp_path):
    """DDP needs a gradient for every parameter: --no-mracl builds no projection it would not use."""
    cfg = toy_config(toy_root, tmp_path, "--no-mracl")
    dataset = mracl.make_dataset(cfg, toy_root, "train", train=True)
    model = mracl.build_model(cfg, vocab=build_vocab([s["expression"] for s in dataset.samples]))
    assert model.fuser is None
    batch = collate_image([dataset[0], dataset[1]])
    index, texts = mracl.with_partners(cfg, batch)
    assert index == [0, 1]  # no partner passes without the loss
    terms = mracl.compute_losses(cfg, model(batch["images"][index], texts), batch["targets"],
                                 pad_mask=batch["pad_mask"])
    assert set(terms) == {"ce"}
    terms["ce"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
