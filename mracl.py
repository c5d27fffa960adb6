"""MRaCL: "Towards Motion-aware Referring Image Segmentation". Chaeyun Kim, Seunghoon Yi, Yejin
Kim, Yohan Jo, Joonseok Lee (SNU / AIM Intelligence); arXiv 2603.17413, March 2026 (PMLR v300);
the project page's BibTeX: 2025. The paper body and its code are not public: what is known is the
project page (tables, figure, captions) and the signature and defaults of the author's loss,
UniAngularLogitContrastLoss(total_fq, rows_to_filter, cols_to_filter, alpha=0.5, verbonly=True,
m=0.5, tau=0.05). MRaCL is a training recipe for an existing referring image segmentation model;
here the base is LAVT (Yang et al., CVPR 2022; reference code yz93/LAVT-RIS), one of the page's
five bases.

Implements the LAVT base (BERT-base fine-tuned; LAVT's language-aware Swin-B, common.lavt; LAVT's
lightweight mask decoder and its weighted cross-entropy) and MRaCL's two parts: verb-phrase
augmentation (each training sentence with a motion-centric verb phrase gives one more sample of
the same target; the phrase from verb_phrase in the figure's form, subject head noun
+ verb + object, or an LLM's from --verb-phrases) and the MRaCL loss on fused image-text
embeddings (angular distance, an additive angular margin on the positive, false negatives
masked), with the page's Table 3 objectives as --loss; the motion-centric split of G-Ref (the
page's M-Ref) as an evaluation subset.

The MRaCL paper's equations are not public, so lines cite the page's figure ("Fig. 2") and LAVT's
sections instead of equation numbers. Reconstructed (each "(reconstructed)" in Config, with a flag):
  - the fused embedding: the mean of the language-aware encoder's last fused map over the image's
    valid (unpadded) pixels (the author's code pools the fused map before the mask head; in LAVT
    the mask head is the SimpleDecoding decoder), then a linear projection ("Fuser", page caption);
  - the loss: angles theta = arccos(cos) between fused embeddings, angular similarity
    s = 1 - 2 theta / pi, the positive's angle plus the margin m, then -log of the positive's share
    of exp(s / tau) over the positive and the unmasked negatives. verbonly (the author's default):
    the B' x B' block of the original captions (rows) against their verb phrases (columns), the
    positive on its diagonal (the author's return_mask): an original's candidates are the batch's
    verb phrases, a phrase's the originals; alpha weights the rows' term against the columns'.
    --no-verbonly: the figure's 2B x 2B matrix of every sample and partner, both members of a pair
    anchors, alpha weighting the original anchors against the phrase anchors;
  - false negatives: other samples of the same target, or of the same image and category;
  - the partners (a sentence's verb phrase, a phrase's sentence) are not decoded (the figure:
    only original captions reach the mask decoder), so they have no segmentation loss and stay out
    of its BatchNorm statistics; with --vp the phrases are also samples of their own.

Deviations from the page: the rule's phrases keep trailing location and direction phrases (the
figure's "Cat stretching its paw" drops "in the air"; a direction such as "to the left" carries the
motion). The author's code averages every cell of the fused map (on LAVT's squashed images there
is no padding); ours leaves out the padding of a batch, a third of the canvas for a 3:2 image.

Deviations from LAVT (the base, reference code yz93/LAVT-RIS @ 1da0af9):
  - Images keep their aspect ratio (short side and long side <= 480; LAVT: squashed to 480 x 480);
    pixels padded in a batch are ignored by the loss; predictions are scored at the original
    size (LAVT: at 480 x 480 against the ground truth resized to it; Ref-ZOM: at 480 x 480 as
    RIS-DMMI scores it, common.run).
  - An epoch draws every sentence (and, with --vp, every phrase) once, so a ref with more sentences
    is seen more often (LAVT: one random sentence per ref and epoch); the step count is LAVT's.
  - All of BERT is fine-tuned, as the LAVT paper says (reference code: only layers 1-10 are in the
    optimizer; the embeddings and layers 11-12 keep their pretrained values), with dropout on
    (reference: BERT stays in eval mode). Sentences are cut to 20 tokens keeping [SEP]
    (reference: sliced, losing it); the tokenizer reads the refer API's "sent" (reference: "raw").
  - The language gate of the last Swin stage is not built (LAVT builds it; it feeds nothing).

Run (every option: --help):
  python mracl.py --data toy --train                       # toy images; CPU
  torchrun --nproc_per_node 8 mracl.py --data refcocog --train   # G-Ref (umd); data/refer
  python mracl.py --data refcocog --eval --eval-split test  # mIoU/oIoU on all, motion and static
  python mracl.py --data refzom --eval                     # Ref-ZOM test (data/README.md)
  ablations (page Tables 3-4): --no-vp, --no-mracl, --no-fn-filter, --filter none, --loss infonce
"""

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from common.backbones import (TextEncoder, load_swin_backbone, parameter_report, swin_backbone,
                              swin_base_22k_config)
from common.datasets import RefCOCO, RefZOM, collate_image
from common.engine import (Progress, autocast, cleanup_distributed, is_main, reduce_dict,
                           save_checkpoint, seed_everything, setup_distributed, to_device, unwrap)
from common.lavt import LanguageAwareSwin
from common.run import (RunConfig, check_finite, cli_errors, data_root, evaluate_image,
                        init_weights, load_trained, param_groups, parse_config, predict_files,
                        resume, run_dir, train_batches, wrap_ddp)
from common.text import build_vocab, head_noun, tag_words, word_tokenizer
from data.toy import ensure_toy, motion_sentence_keys

# Shapes: B samples in a step, R partner samples (verb phrases of the B, or their sentences),
# N = B + R image-text pairs through the encoder, D the fused embedding width, A anchors, L words,
# C_i Swin stage widths, H W input size, h w the last stage's size (H/32, W/32).


# ------------------------------------------------------------------------------------ config
@dataclass
class Config(RunConfig):
    data: str = "refcocog"  # refcoco | refcoco+ | refcocog (paper configuration) | refzom | toy
    eval_split: str = "val"  # umd: val / test (the page's M-Ref: test); unc: val / testA / testB
    split_by: str = "umd"  # page: G-Ref (UMD)
    # MRaCL, page Tables 3-4
    vp: bool = True  # verb phrases as extra samples of their target (page)
    mracl: bool = True  # the MRaCL loss (page)
    fn_filter: bool = True  # (reconstructed) no negatives of the same target / image + category
    filter: str = "once"  # page: phrases only if the target's category is once in the image; none
    loss: str = "mracl"  # mracl | infonce | simcse | l2: the page's Table 3 objectives
    verb_phrases: str = ""  # JSON {sent_id: phrase}, data/extract_verb_phrases.py; default: rule
    # page Fig. 2 ("Cat stretching its paw"; the prompt of data/extract_verb_phrases.py too): the
    # rule's phrase starts with the subject's head noun (--no-phrase-subject: the verb onwards);
    # trailing location and direction phrases stay (the figure drops "in the air"; ours keeps
    # them, since a direction such as "to the left" carries the motion)
    phrase_subject: bool = True
    margin: float = 0.5  # m in radians, the author's loss default
    temperature: float = 0.05  # tau, the author's loss default
    # (reconstructed) the author's default verbonly=True. Its return_mask takes the diagonal of a
    # B' x B' matrix as the positives, which we read as original captions (rows) x their verb
    # phrases (columns): the contrast stays in that block. The other reading: only the samples
    # that have a phrase take part. --no-verbonly: the page figure's 2B x 2B matrix of every
    # sample and partner (two originals are negatives too, subject to the false-negative filter)
    verbonly: bool = True
    # (reconstructed) the author's default alpha=0.5, read as the weight of the two directions:
    # alpha x the loss of the originals as anchors (the block's rows) + (1 - alpha) x that of the
    # phrases (its columns); the same split of the anchors with --no-verbonly. The other
    # reading: a weight between two loss terms.
    alpha: float = 0.5
    # The page gives no weight: 1.0 adds the term to LAVT's cross-entropy as a plain sum, the
    # reading that assumes nothing (the toy preset's 0.001 comes from a toy sweep).
    w_mracl: float = 1.0  # (reconstructed) the page gives no weight: a plain sum
    proj_dim: int = 256  # (reconstructed) width of the Fuser's projection
    # LAVT base
    weights: str = "microsoft/swin-base-patch4-window12-384-in22k"  # LAVT: Swin-B, ImageNet-22k
    text_weights: str = "bert-base-uncased"  # LAVT
    max_tokens: int = 20  # LAVT
    decoder_dim: int = 512  # LAVT: SimpleDecoding's hidden width, half of stage 4's 1,024
    w_background: float = 0.9  # LAVT's cross-entropy class weights
    w_target: float = 1.1  # LAVT
    toy_swin_dim: int = 32  # toy only (ours)
    toy_text_dim: int = 64  # toy only (ours)
    # LAVT: 40 epochs of batch 32, an epoch one random sentence per ref of G-Ref umd's 42,226
    # training refs (its dataset_refer_bert.py), 1,319 batches (DistributedSampler, drop_last)
    steps: int = 52_760
    epochs: int = 0  # used when steps is 0: steps = epochs x the training set's batches
    lr: float = 5e-5  # LAVT
    weight_decay: float = 0.01  # LAVT
    grad_clip: float = 0.0  # LAVT: none
    batch_size: int = 32  # LAVT: 8 GPUs x 4
    short_side: int = 480  # LAVT input size
    max_size: int = 480


PRESETS = {  # per-dataset deltas from the paper configuration above
    # toy (ours): a tiny model for 2 CPU cores, random init; grad_clip 1.0 (ours, toy): the
    # paper configuration (LAVT) clips nothing; w_mracl 0.001 (ours, toy): of the weights tried,
    # the largest whose toy mIoU stays within the seed spread of the base (tests/bench/README.md)
    "toy": dict(split_by="unc", decoder_dim=64, proj_dim=64, steps=1500, lr=5e-4, grad_clip=1.0,
                batch_size=8, short_side=96, max_size=96, workers=0, log_every=10, save_every=250,
                w_mracl=0.001),
    "refcoco": dict(split_by="unc"),
    "refcoco+": dict(split_by="unc"),
    "refcocog": dict(),
    # RIS-DMMI's --splitBy final --split test; images: COCO train2014 + val2014 (data/README.md);
    # 40 epochs, each every training sentence once (RIS-DMMI's train.sh and dataset_zom.py)
    "refzom": dict(split_by="final", eval_split="test", image_root="data/coco/trainval2014",
                   steps=0, epochs=40),
}
ABLATIONS = ("vp", "mracl", "fn_filter", "filter", "loss", "verbonly", "alpha", "phrase_subject")


# ----------------------------------------------------------------------- LAVT's mask decoder
class SimpleDecoding(nn.Module):
    """LAVT's lightweight decoder: from stage 4 down to stage 1, upsample, concatenate the next
    stage's features, two 3x3 conv + BatchNorm + ReLU; then a 1x1 classifier to 2 classes.
    stages: 4 maps (B, C_i, H/s, W/s) -> logits (B, 2, H/4, W/4)."""

    def __init__(self, *, channels, hidden):
        super().__init__()
        def block(in_channels):
            return nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU())
        self.blocks = nn.ModuleList([block(channels[3] + channels[2]), block(hidden + channels[1]),
                                     block(hidden + channels[0])])
        self.classifier = nn.Conv2d(hidden, 2, 1)

    def forward(self, stages):
        x = stages[3]  # (B, C_4, H/32, W/32)
        for block, skip in zip(self.blocks, stages[2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear",
                              align_corners=True)  # (B, *, h_i, w_i)
            x = block(torch.cat([x, skip], 1))  # (B, hidden, h_i, w_i)
        return self.classifier(x)  # (B, 2, H/4, W/4)


class LAVT(nn.Module):
    """images (N, 3, H, W) ImageNet-normalised + N expressions -> dict(pred_masks (B, 2, H, W):
    LAVT's background / target logits of every pixel at the input size, for the first B =
    `samples` pairs (default all); embeds (N, D): the fused embedding z of every pair
    (reconstructed Fuser; with proj_dim)). pad_mask (N, H, W) True on padding (default none): the
    embedding averages the valid pixels only."""

    def __init__(self, *, backbone, text_encoder, decoder_dim, proj_dim):
        super().__init__()
        self.backbone, self.text_encoder = backbone, text_encoder  # BERT, fine-tuned (LAVT)
        self.fusion = LanguageAwareSwin(channels=backbone.channels,
                                        word_dim=text_encoder.hidden_size)
        self.decoder = SimpleDecoding(channels=backbone.channels, hidden=decoder_dim)
        # (reconstructed) the projection after pooling; none without the MRaCL loss
        self.fuser = nn.Linear(backbone.channels[3], proj_dim) if proj_dim else None

    def forward(self, images, expressions, *, pad_mask=None, samples=None):
        text = self.text_encoder(expressions)  # word_feats (N, L, C_t), attn_mask (N, L)
        stages = self.fusion(self.backbone, images, text["word_feats"],
                             text["attn_mask"])  # 4 maps (N, C_i, H/s_i, W/s_i), s_i = 4..32
        # Fig. 2: only the samples reach the mask decoder; the partners would also enter its
        # BatchNorm statistics in training and change the samples' predictions
        logits = self.decoder([x[:samples] for x in stages])  # (B, 2, H/4, W/4)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                               align_corners=True)  # (B, 2, H, W)
        if self.fuser is None:
            return {"pred_masks": logits}
        # z, Fig. 2 "Fuser": the last fused map (N, C_4, H/32, W/32), pooled, projected
        return {"pred_masks": logits,
                "embeds": self.fuser(valid_mean(stages[3], pad_mask))}  # (N, D)


def valid_mean(x, pad_mask=None):
    """The mean of a stride-32 map over the valid input pixels, each cell weighted by its share of
    them, so that a batch's padding (a third of the canvas for a 3:2 image on a square one) does
    not enter the embedding. x (N, C, h, w); pad_mask (N, H, W) True on padding, or None ->
    (N, C)."""
    if pad_mask is None:
        return x.mean((2, 3))
    H, W = pad_mask.shape[-2:]
    valid = F.pad((~pad_mask)[:, None].float(), (0, -W % 32, 0, -H % 32))  # (N, 1, 32 h, 32 w)
    weight = F.avg_pool2d(valid, 32)  # (N, 1, h, w)
    return (x.float() * weight).sum((2, 3)) / weight.sum((2, 3))  # (N, C)


# ------------------------------------------------------------ verb phrases and the MRaCL loss
# Appearance, possession and placement verbs: a tagger calls them verbs, but they do not make an
# expression motion-centric and do not start a verb phrase (ours: the page's LLM prompt is not
# public).
STATIC_VERBS = set("""
    wear have dress cover contain decorate paint print write label mark slice top stuff stack pile
    fold wrap attach locate position picture display color colour shape plant frame include light
    make park fill tie see show seat
""".split())
# Postures: motion by default (MeViS and the page's M-Bench examples use them as action cues).
POSTURE_VERBS = set("stand sit lie lay hold lean rest perch kneel squat crouch hang wait stay "
                    "remain sleep".split())
CONNECTIVE_ADVERBS = set("then also again still meanwhile afterwards finally".split())


def verb_phrase(expression: str, with_subject: bool = False) -> str:
    """The motion-centric verb phrase of an expression, for the verb-phrase augmentation.

    Rule (reconstructed: the page extracts these with an LLM whose prompt is not public): from the
    first verb that is not an appearance/possession/placement verb (STATIC_VERBS: "wearing",
    "has", "parked", ...) and not a noun modifier ("the running dog"), to the end of the
    expression, minus trailing punctuation. Adverbs right before that verb are kept ("slowly
    moving"), except connectives such as "then"; a relative pronoun or auxiliary before it ("that
    is") is dropped. Returns "" when there is no such verb. "man in red shirt riding a bike" ->
    "riding a bike". with_subject=True prefixes the head noun of the main noun phrase, the form
    of the page's figure ("cat stretching its paw in the air"; the figure's LLM also drops "in
    the air"). Words are tagged by common.text.tag_words ((word, start, end, POS, lemma); a lemma
    starting with "~" marks a noun modifier).
    """
    tagged = tag_words(expression)
    k = next((k for k, (_, _, _, pos, lemma) in enumerate(tagged)
              if pos == "VERB" and not lemma.startswith("~") and lemma not in STATIC_VERBS), None)
    if k is None:
        return ""
    while (k > 0 and tagged[k - 1][3] == "ADV"
           and tagged[k - 1][0].lower() not in CONNECTIVE_ADVERBS):
        k -= 1
    last = max(m for m, t in enumerate(tagged) if t[3] != "PUNCT")
    phrase = expression[tagged[k][1]:tagged[last][2]]
    if with_subject:
        head = head_noun(expression[:tagged[k][1]])
        return f"{head} {phrase}" if head else phrase
    return phrase


def pair_masks(ann_ids, image_ids, categories, positives, fn_filter, phrase=None):
    """(N, N) bool masks of the positives and the negatives. positives: (R, 2) index pairs. Self
    pairs are neither; with fn_filter, other samples of the same target or of the same image and
    category are no negatives (reconstructed false-negative filtering). phrase (N,) bool, True
    on a verb phrase's embedding, given for verbonly: the negatives are only an original and a
    phrase of two pairs (the B' x B' block of originals x phrases, its diagonal the positives)."""
    m = len(ann_ids)
    positive = torch.zeros(m, m, dtype=torch.bool)  # (N, N)
    positive[positives[:, 0], positives[:, 1]] = positive[positives[:, 1], positives[:, 0]] = True
    negative = ~positive & ~torch.eye(m, dtype=torch.bool)
    if phrase is not None:
        paired = positive.any(1)  # (N,)
        negative &= (phrase[:, None] != phrase) & paired[:, None] & paired
    if fn_filter:
        ann, img, cat = (torch.tensor(v) for v in (ann_ids, image_ids, categories))
        same = (ann[:, None] == ann) | ((img[:, None] == img) & (cat[:, None] == cat))
        negative &= ~same
    return positive, negative


def angular_contrastive_loss(embeds, positive, negative, *, margin, temperature, phrase=None,
                             alpha=0.5, eps=1e-6):
    """MRaCL (reconstructed): theta = arccos(cos) with cos clamped to [-1 + eps, 1 - eps], since
    arccos has an unbounded gradient at +-1; s = 1 - 2 theta / pi; for every anchor with a
    positive, -log(exp(s_pos' / tau) / (exp(s_pos' / tau) + sum_neg exp(s / tau))) with
    s_pos' = 1 - 2 (theta_pos + m) / pi. embeds (N, D); positive, negative (N, N) bool. The mean
    over the anchors; with phrase (N,) bool, alpha x the originals' mean + (1 - alpha) x the
    phrases' (equal to the plain mean at alpha 0.5: every pair gives one of each)."""
    z = F.normalize(embeds.float(), dim=-1)  # (N, D)
    theta = torch.arccos((z @ z.T).clamp(-1 + eps, 1 - eps))  # (N, N)
    similarity = 1 - 2 * theta / math.pi  # angular similarity (page Fig. 2: Theta in [-1, 1])
    margined = 1 - 2 * (theta + margin) / math.pi  # (N, N): the page's margin m on the angle
    return _contrastive(similarity, margined, positive, negative, temperature, phrase, alpha)


def _contrastive(similarity, positive_logit, positive, negative, temperature, phrase=None,
                 alpha=0.5):
    """-log softmax over [positive, negatives] for each (anchor, positive) pair; the mean, or
    with phrase the alpha-weighted means of the original and the phrase anchors."""
    anchors, partners = positive.nonzero(as_tuple=True)
    if len(anchors) == 0:
        return similarity.sum() * 0
    negatives = (similarity / temperature).masked_fill(~negative, -math.inf)[anchors]  # (A, N)
    logits = torch.cat([(positive_logit[anchors, partners] / temperature)[:, None], negatives], 1)
    losses = -logits.log_softmax(1)[:, 0]  # (A,)
    if phrase is None:
        return losses.mean()
    is_phrase = phrase.to(losses.device)[anchors]  # (A,)
    weight = torch.where(is_phrase, (1 - alpha) / is_phrase.sum().clamp(min=1),
                         alpha / (~is_phrase).sum().clamp(min=1))  # (A,)
    return (weight * losses).sum()


def contrastive_terms(cfg, embeds, positive, negative, phrase=None):
    """The page's Table 3 objectives on the fused embeddings, on the same pairs (verbonly) and
    anchor weights (alpha): mracl (above); infonce (VATEX's MCC: cosine / 0.1); simcse (cosine /
    0.05, in-batch negatives); l2 (squared distance of the normalised positives, no negatives)."""
    if cfg.loss == "mracl":
        return angular_contrastive_loss(embeds, positive, negative, margin=cfg.margin,
                                        temperature=cfg.temperature, phrase=phrase,
                                        alpha=cfg.alpha)
    z = F.normalize(embeds.float(), dim=-1)  # (N, D)
    cosine = z @ z.T  # (N, N)
    if cfg.loss == "l2":
        a, b = positive.nonzero(as_tuple=True)
        return ((z[a] - z[b]) ** 2).sum(-1).mean() if len(a) else z.sum() * 0
    tau = 0.1 if cfg.loss == "infonce" else 0.05
    return _contrastive(cosine, cosine, positive, negative, tau, phrase, cfg.alpha)


def segmentation_loss(cfg, logits, targets, pad_mask):
    """LAVT's weighted cross-entropy over the two classes, padded pixels ignored."""
    target = torch.stack([t["masks"][0] for t in targets]).long()  # (B, H, W)
    target = target.masked_fill(pad_mask, -100)
    weight = torch.tensor([cfg.w_background, cfg.w_target], device=logits.device)
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=-100)


def with_partners(cfg, batch):
    """The texts of one forward pass: the B expressions and, when MRaCL is on, the partners of
    those that have one (the same image, the other text). Returns (image index (N,), texts)."""
    have = [i for i, p in enumerate(batch["partner"]) if p is not None] if cfg.mracl else []
    return list(range(len(batch["partner"]))) + have, batch["expression"] + [
        batch["partner"][i] for i in have]


def contrastive_pairs(cfg, batch, index):
    """The pairs of the contrastive term over the N fused embeddings (index: the sample of each;
    the B samples first, then their partners): each partner the positive of its sample (verbonly:
    only the originals x phrases block). Returns positive, negative (N, N) bool and which of the
    N embeddings are verb phrases (N,) bool."""
    b = len(batch["expression"])

    def pick(key):
        return [batch[key][i] for i in index]
    positives = torch.tensor([[i, k] for k, i in enumerate(index) if k >= b],
                             dtype=torch.long).reshape(-1, 2)  # (R, 2)
    # a verb phrase's embedding: a phrase sample's, or the partner of a sentence sample
    phrase = torch.tensor([p != (k >= b) for k, p in enumerate(pick("is_phrase"))])  # (N,)
    positive, negative = pair_masks(pick("ann_id"), pick("image_id"), pick("category_id"),
                                    positives, cfg.fn_filter, phrase if cfg.verbonly else None)
    return positive, negative, phrase


def compute_losses(cfg, outputs, targets, *, pad_mask, pairs=None):
    """The unweighted terms: LAVT's cross-entropy on the B samples of `targets` (not on the
    partners: the page's figure sends only the original captions to the mask decoder), padded
    pixels (B, H, W) ignored, and with the `pairs` of contrastive_pairs the contrastive term over
    the N fused embeddings."""
    terms = {"ce": segmentation_loss(cfg, outputs["pred_masks"][:len(targets)], targets,
                                     pad_mask)}
    if pairs is not None:
        positive, negative, phrase = (p.to(outputs["embeds"].device) for p in pairs)
        terms["mracl"] = contrastive_terms(cfg, outputs["embeds"], positive, negative, phrase)
    return terms


# ---------------------------------------------------------------------------------- building
class VerbPhraseSamples(torch.utils.data.Dataset):
    """RefCOCO training items, each with its partner: a sentence's verb phrase (None when it has
    none, or when --filter once and its target's category appears more than once in the image),
    and with vp=True one more item per phrase, the phrase as the expression of the same target,
    whose partner is the sentence. "is_phrase" says which of the two an item is. phrases:
    {sent_id: phrase}."""

    def __init__(self, base: RefCOCO, phrases: dict, *, vp: bool, once: bool):
        self.base, self.samples = base, base.samples
        same_category = {}
        for ann in base.annotations.values():
            key = (ann["image_id"], ann["category_id"])
            same_category[key] = same_category.get(key, 0) + 1
        self.phrase = {}
        for i, s in enumerate(base.samples):
            phrase = phrases.get(str(s["sent_id"]), "")
            count = same_category.get((s["image_id"], s["category_id"]), 0)  # Ref-ZOM: 0 if none
            if phrase and not (once and count > 1):
                self.phrase[i] = phrase
        self.extra = sorted(self.phrase) if vp else []  # the augmented samples

    def __len__(self):
        return len(self.base) + len(self.extra)

    def __getitem__(self, index):
        if index < len(self.base):
            item = self.base[index]
            item["partner"], item["is_phrase"] = self.phrase.get(index), False
        else:  # a verb-phrase sample: the same image and target mask
            item = self.base[self.extra[index - len(self.base)]]
            item["partner"], item["expression"] = item["expression"], self.phrase[item["index"]]
            item["is_phrase"] = True
        return item


def load_phrases(cfg, samples) -> dict:
    """{sent_id: motion-centric verb phrase}: from --verb-phrases, else verb_phrase,
    by default in the page figure's form, subject head noun + verb + object ("a black and white
    cat stretching its paw in the air" -> "cat stretching its paw in the air"); trailing location
    and direction phrases are kept (the figure drops "in the air"; "to the left" is motion)."""
    if cfg.verb_phrases:
        with open(cfg.verb_phrases) as f:
            return {str(k): v for k, v in json.load(f).items()}
    return {str(s["sent_id"]): verb_phrase(s["expression"], with_subject=cfg.phrase_subject)
            for s in samples}


def make_dataset(cfg, root, split, *, train, seed=None):
    toy = cfg.data == "toy"
    kwargs = dict(split_by=cfg.split_by, split=split, train=train, short_side=cfg.short_side,
                  max_size=cfg.max_size, flip=False, seed=cfg.seed if seed is None else seed)
    base = RefZOM(root, cfg.image_root, **kwargs) if cfg.data == "refzom" else RefCOCO(
        root, Path(root) / "images" if toy else cfg.image_root,
        dataset="refcoco" if toy else cfg.data, **kwargs)  # LAVT: no flip
    if not train:
        return base
    return VerbPhraseSamples(base, load_phrases(cfg, base.samples), vp=cfg.vp,
                             once=cfg.filter == "once")


def build_model(cfg, *, vocab=None, pretrained=True) -> LAVT:
    """The toy-size model (random init, word tokenizer over `vocab`) for --data toy; otherwise
    LAVT's: Swin-B 22k and BERT-base (random when not pretrained)."""
    if cfg.data == "toy":
        backbone = swin_backbone(swin_base_22k_config(
            image_size=96, embed_dim=cfg.toy_swin_dim, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=4, drop_path_rate=0.0))
        text_encoder = TextEncoder.tiny(word_tokenizer(vocab, cfg.max_tokens),
                                        hidden=cfg.toy_text_dim, max_length=cfg.max_tokens)
    elif pretrained:
        backbone = load_swin_backbone(cfg.weights)
        text_encoder = TextEncoder.from_pretrained(cfg.text_weights, freeze=False,
                                                   max_length=cfg.max_tokens, model_class=BertModel)
    else:  # --count-params: the same modules with random weights, nothing downloaded
        backbone = swin_backbone(swin_base_22k_config())
        text_encoder = TextEncoder(BertModel(BertConfig(), add_pooling_layer=False),
                                   word_tokenizer([]), max_length=cfg.max_tokens, freeze=False)
    return LAVT(backbone=backbone, text_encoder=text_encoder, decoder_dim=cfg.decoder_dim,
                proj_dim=cfg.proj_dim if cfg.mracl else 0)


# ---------------------------------------------------------------------------------- training
def train(cfg, ddp, root, out):
    """LAVT's recipe with the MRaCL terms; returns the trained model (unwrapped)."""
    seed_everything(cfg.seed)  # identical initial weights on every process
    dataset = make_dataset(cfg, root, "train", train=True, seed=cfg.seed + ddp.rank)
    if not cfg.steps:  # a schedule in epochs (Ref-ZOM): train_batches' batches per epoch
        per_epoch = len(dataset) // ddp.world_size // max(1, cfg.batch_size // ddp.world_size)
        cfg = replace(cfg, steps=cfg.epochs * per_epoch)
        if not cfg.steps:
            raise SystemExit(f"--steps 0 trains --epochs {cfg.epochs} of {per_epoch} batches: "
                             f"no step; give --steps or --epochs")
        print(f"{cfg.epochs} epochs of {per_epoch} batches: {cfg.steps} steps")
    vocab = None
    if cfg.data == "toy":
        vocab = build_vocab([s["expression"] for s in dataset.samples]
                            + [dataset.phrase[i] for i in dataset.phrase])
    model = init_weights(cfg.init, build_model(cfg, vocab=vocab)).to(ddp.device)
    optimizer = torch.optim.AdamW(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay),
                                  lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # LAVT: polynomial decay, power 0.9
        optimizer, lambda step: (1 - step / cfg.steps) ** 0.9)
    step = 0
    if cfg.resume:
        step, _ = resume(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                         config=asdict(cfg))
    batches = train_batches(dataset, batch_size=cfg.batch_size, collate=collate_image, ddp=ddp,
                            seed=cfg.seed, workers=cfg.workers, start_step=step)
    model = wrap_ddp(model, ddp)
    with Progress(total=cfg.steps, initial=step, log_path=out / "log.jsonl") as progress:
        while step < cfg.steps:
            batch = next(batches)
            images, batch["targets"] = to_device((batch["images"], batch["targets"]), ddp.device)
            index, texts = with_partners(cfg, batch)
            pad_mask = batch["pad_mask"].to(ddp.device)[index]  # (N, H, W)
            with autocast(ddp.device):  # the B samples, then their partners (not decoded)
                outputs = model(images[index], texts, pad_mask=pad_mask,
                                samples=len(batch["expression"]))
            pairs = contrastive_pairs(cfg, batch, index) if cfg.mracl else None
            terms = compute_losses(cfg, outputs, batch["targets"],
                                   pad_mask=pad_mask[:len(batch["targets"])], pairs=pairs)
            loss = terms["ce"] + cfg.w_mracl * terms.get("mracl", 0)  # L_CE + w * L_MRaCL
            check_finite(loss, terms, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                progress.log(step, reduce_dict({"loss": loss, **terms}),
                             lr=max(scheduler.get_last_lr()))
            if (step % cfg.save_every == 0 or step == cfg.steps) and is_main():
                save_checkpoint(out / "last.pt", model=model, optimizer=optimizer,
                                scheduler=scheduler, step=step, config=asdict(cfg),
                                extra={"vocab": vocab})
    return unwrap(model)


# ------------------------------------------------------------------------------- evaluation
def is_motion_expression(expression: str, include_posture: bool = True) -> bool:
    """True when the expression has a verb that is not an appearance/possession/placement verb.

    Noun modifiers count ("the running dog"). Posture and holding verbs ("standing", "sitting",
    "lying", "holding", ...) count by default: MeViS describes motion with them ("standing on
    hand, then flying away") and the page's M-Bench examples ("holding a selfie stick", "arms
    crossed") treat them as action cues; include_posture=False leaves them out. Adverbs alone
    ("the dog next to the car") do not count.
    """
    for _, _, _, pos, lemma in tag_words(expression):
        lemma = lemma.lstrip("~")
        if pos == "VERB" and lemma not in STATIC_VERBS and (include_posture
                                                            or lemma not in POSTURE_VERBS):
            return True
    return False


def motion_split(samples) -> dict:
    """The page's M-Ref idea: sentence ids of the motion-centric sentences (a verb that is not an
    appearance, possession or placement verb, is_motion_expression; the page does
    not say how it split G-Ref) and of the others."""
    motion = {str(s["sent_id"]) for s in samples if is_motion_expression(s["expression"])}
    return {"motion": motion, "static": {str(s["sent_id"]) for s in samples} - motion}


@torch.no_grad()
def predict_masks(model, images, expression, orig_size):
    """LAVT: the argmax of the two classes at the original size. (1, 3, H, W) -> (H0, W0) bool."""
    H, W = images.shape[-2:]
    padded = F.pad(images, (0, -W % 32, 0, -H % 32))  # (1, 3, Hp, Wp)
    with autocast(images.device):
        logits = model(padded, [expression])["pred_masks"][..., :H, :W].float()  # (1, 2, H, W)
    logits = F.interpolate(logits, size=tuple(orig_size), mode="bilinear", align_corners=True)
    return logits[0].argmax(0).bool()  # (H0, W0)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__)
    if cfg.loss not in ("mracl", "infonce", "simcse", "l2") or cfg.filter not in ("once", "none"):
        raise SystemExit("mracl: --loss must be mracl|infonce|simcse|l2 and --filter once|none")
    out, ddp = run_dir(cfg, "mracl", ABLATIONS), setup_distributed()
    checkpoint = cfg.checkpoint or out / "last.pt"

    def rule(images, expression, orig_size):
        return predict_masks(model, images.to(ddp.device), expression, orig_size)

    with cli_errors("mracl"):
        if cfg.count_params:
            return print(parameter_report(build_model(cfg, pretrained=False), depth=2))
        root = data_root(cfg, "image", make_toy=ensure_toy) if cfg.train or cfg.eval else None
        if cfg.train:
            model, trained = train(cfg, ddp, root, out), cfg
        else:
            model, trained = load_trained(checkpoint, Config, build_model, ddp.device)
        if cfg.predict:
            return predict_files(cfg.predict, cfg.text, lambda f, e, s: rule(f, e, s)[None],
                                 model=model, out=out / "vis" / "predict",
                                 short_side=trained.short_side, max_size=trained.max_size)
        dataset = make_dataset(cfg, root, cfg.eval_split, train=False)
        subsets = motion_split(dataset.samples)
        if cfg.data == "toy":  # on toy, the motion split is the sentences only motion resolves
            motion = motion_sentence_keys(root)["motion"]
            subsets = {"motion": motion, "static": (subsets["motion"] | subsets["static"]) - motion}
        evaluate_image(dataset, lambda item: rule(item["image"][None], item["expression"],
                                                  item["orig_size"]),
                       model=model, out=out, split=cfg.eval_split, checkpoint=checkpoint,
                       subsets=subsets)
    cleanup_distributed()


if __name__ == "__main__":
    main()
