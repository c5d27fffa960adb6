"""Tests for common/text.py: the rule-based static/motion split (DsHmp), main noun phrase (VATEX),
the token masks, and the word-level tokenizer; and for the rules mracl.py builds on its tagger
(verb phrase, motion split), which share this file's cases.

The expected values below are written by hand. For the split they are the spaCy en_core_web_sm
universal POS tags as DsHmp uses them (VERB or ADV -> motion; AUX, ADJ, NOUN, ADP, DET, PRON,
PART, PUNCT -> static). Where spaCy's tag is uncertain, the comment on the case says which
reading was chosen.
"""
import re

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import PreTrainedTokenizerFast

from common.text import (
    batch_static_motion_token_masks,
    build_vocab,
    main_noun_phrase,
    normalize_expression,
    split_static_motion,
    static_motion_token_masks,
    tag_words,
    word_tokenizer,
)
from mracl import is_motion_expression, verb_phrase

# (expression, motion words, main noun phrase, verb phrase, is_motion, is_motion without postures)
CASES = [
    # ---- MeViS-style motion expressions
    ("bird standing on hand, then flying away", ["standing", "then", "flying", "away"],
     "bird", "standing on hand, then flying away", True, True),
    ("the little girl in red moving near the chair and drinking", ["moving", "drinking"],
     "the little girl", "moving near the chair and drinking", True, True),
    # "around" with no object after a verb: particle, read as ADV (spaCy may give RP -> ADP).
    ("elephant turning around", ["turning", "around"], "elephant", "turning around", True, True),
    ("the second cow from the left walking forward", ["walking", "forward"],
     "the second cow", "walking forward", True, True),
    ("monkey jumping from the tree to the ground", ["jumping"],
     "monkey", "jumping from the tree to the ground", True, True),
    ("car moving slowly then stopping", ["moving", "slowly", "then", "stopping"],
     "car", "moving slowly then stopping", True, True),
    ("the dog that runs and jumps", ["runs", "jumps"], "the dog", "runs and jumps", True, True),
    ("two dogs run to the left", ["run"], "two dogs", "run to the left", True, True),
    # A full sentence: the root is the verb, VATEX then takes the chunk of its first child "cat".
    ("cat and dog chase each other", ["chase"], "cat", "chase each other", True, True),
    ("a giraffe that is eating", ["eating"], "a giraffe", "eating", True, True),
    ("bear that turned around and walked away", ["turned", "around", "walked", "away"],
     "bear", "turned around and walked away", True, True),
    ("horse running fast", ["running", "fast"], "horse", "running fast", True, True),
    # "down" is a particle here; "on" takes "the bench" and stays a preposition.
    ("man sitting down on the bench", ["sitting", "down"], "man", "sitting down on the bench", True, False),
    ("person walking up the stairs", ["walking"], "person", "walking up the stairs", True, True),
    ("the lion strolling forward", ["strolling", "forward"], "the lion", "strolling forward", True, True),
    ("the cow that moves first", ["moves", "first"], "the cow", "moves first", True, True),
    ("fish swimming in circles", ["swimming"], "fish", "swimming in circles", True, True),
    ("the cat which is lying on the sofa", ["lying"], "the cat", "lying on the sofa", True, False),
    ("sheep that walked to the front quickly", ["walked", "quickly"],
     "sheep", "walked to the front quickly", True, True),
    ("panda eating bamboo then rolling over", ["eating", "then", "rolling", "over"],
     "panda", "eating bamboo then rolling over", True, True),
    ("the white rabbit hopping away from the others", ["hopping", "away"],
     "the white rabbit", "hopping away from the others", True, True),
    ("parrot flew to the left", ["flew"], "parrot", "flew to the left", True, True),
    ("baby elephant being pushed by its mother", ["pushed"],
     "baby elephant", "pushed by its mother", True, True),
    ("the cat lying down and stretching", ["lying", "down", "stretching"],
     "the cat", "lying down and stretching", True, True),
    ("man throwing a ball to the dog", ["throwing"], "man", "throwing a ball to the dog", True, True),
    ("turtle crawling slowly toward the water", ["crawling", "slowly"],
     "turtle", "crawling slowly toward the water", True, True),
    ("tiger walking back and forth", ["walking", "back", "forth"],
     "tiger", "walking back and forth", True, True),
    ("the dog is running", ["running"], "the dog", "running", True, True),
    ("the puppy on the right that keeps shaking its head", ["keeps", "shaking"],
     "the puppy", "keeps shaking its head", True, True),
    ("a man who rode a horse and fell off", ["rode", "fell", "off"],
     "a man", "rode a horse and fell off", True, True),
    ("two people sitting together on a bench", ["sitting", "together"],
     "two people", "sitting together on a bench", True, False),
    ("large truck backing up", ["backing", "up"], "large truck", "backing up", True, True),
    ("small bird perched on a branch", ["perched"], "small bird", "perched on a branch", True, False),
    ("the dog and its owner walking", ["walking"], "the dog", "walking", True, True),
    # Toy-data phrasings: direction words after a verb, also across "and then".
    ("the red square moving left and then right", ["moving", "left", "then", "right"],
     "the red square", "moving left and then right", True, True),
    ("the blue circle bouncing up and down", ["bouncing", "up", "down"],
     "the blue circle", "bouncing up and down", True, True),
    ("the green triangle stands still", ["stands", "still"], "the green triangle", "stands still", True, False),
    ("the red square on the left", [], "the red square", "", False, False),
    # No noun at all: VATEX falls back to the whole sentence.
    ("standing still then walking", ["standing", "still", "then", "walking"],
     "standing still then walking", "standing still then walking", True, True),
    # A verb used as a noun modifier is motion for DsHmp but starts no verb phrase.
    ("the running horse on the left", ["running"], "the running horse", "", True, True),
    # ---- RefCOCO-style static expressions
    ("left guy in blue", [], "left guy", "", False, False),
    ("the red umbrella", [], "the red umbrella", "", False, False),
    ("man in a white shirt holding a bat", ["holding"], "man", "holding a bat", True, False),
    ("bowl of broccoli near the spoon", [], "bowl", "", False, False),
    ("zebra on the far right", [], "zebra", "", False, False),
    ("the man in a red shirt riding a bike", ["riding"], "the man", "riding a bike", True, True),
    ("red car on the left", [], "red car", "", False, False),
    # spaCy parses "next to" as next/ADV (advmod) + to/ADP.
    ("man next to the car", ["next"], "man", "", False, False),
    # "has" is a main verb here (spaCy VERB), but possession is not motion.
    ("the man who has a hat", ["has"], "the man", "", False, False),
    ("woman wearing a striped dress", ["wearing"], "woman", "", False, False),
    ("the man wearing a hat and riding a horse", ["wearing", "riding"],
     "the man", "riding a horse", True, True),
    ("the tv stand on the left", [], "the tv stand", "", False, False),
    ("pizza slices on the plate", [], "pizza slices", "", False, False),
    # Prenominal past participle read as ADJ (spaCy may give VBN -> VERB); after the noun it is VERB.
    ("the parked car", [], "the parked car", "", False, False),
    ("car parked on the left", ["parked"], "car", "", False, False),
    ("the building behind the tree", [], "the building", "", False, False),
    ("the dining table", [], "the dining table", "", False, False),
    ("a spotted dog", [], "a spotted dog", "", False, False),
    ("the only dog", [], "the only dog", "", False, False),
    ("family of ducks swimming", ["swimming"], "family", "swimming", True, True),
    # Degree adverbs are ADV for spaCy too, so DsHmp puts "very" in the motion set.
    ("the very tall giraffe", ["very"], "the very tall giraffe", "", False, False),
    ("the closest elephant", [], "the closest elephant", "", False, False),
    ("the ceiling light", [], "the ceiling light", "", False, False),
    ("a red sled in the shed", [], "a red sled", "", False, False),
    ("the thing on the king's bed", [], "the thing", "", False, False),
    ("guy in black shirt sitting", ["sitting"], "guy", "sitting", True, False),
    ("the black and white cat stretching its paw in the air", ["stretching"],
     "the black and white cat", "stretching its paw in the air", True, True),
    ("a person snowboarding and holding a selfie stick", ["snowboarding", "holding"],
     "a person", "snowboarding and holding a selfie stick", True, True),
]


def _words(expression):
    # Test-side word split (spaCy splits "king's" into "king" + "'s").
    return re.findall(r"'s|\w+|[^\w\s]", expression)


@pytest.mark.parametrize("expression,motion,noun_phrase,phrase,moving,moving_no_posture", CASES,
                         ids=[c[0] for c in CASES])
def test_expression_analysis(expression, motion, noun_phrase, phrase, moving, moving_no_posture):
    static_words, motion_words = split_static_motion(expression)
    assert motion_words == motion
    assert static_words == [w for w in _words(expression) if w not in motion]
    assert main_noun_phrase(expression) == noun_phrase
    assert verb_phrase(expression) == phrase
    assert is_motion_expression(expression) is moving
    assert is_motion_expression(expression, include_posture=False) is moving_no_posture


def test_case_table_is_large_and_mixed():
    assert len(CASES) >= 40
    assert sum(c[4] for c in CASES) >= 20 and sum(not c[4] for c in CASES) >= 15


def test_verb_phrase_with_subject_matches_mracl_figure_form():
    # MRaCL's figure: "A black and white cat stretching its paw in the air" -> "Cat stretching its paw"
    # (head noun + verb phrase); our rule keeps the trailing location.
    assert verb_phrase("A black and white cat stretching its paw in the air", with_subject=True) == \
        "cat stretching its paw in the air"
    assert verb_phrase("man in red shirt riding a bike", with_subject=True) == "man riding a bike"
    assert verb_phrase("man in red shirt riding a bike") == "riding a bike"
    assert verb_phrase("the red umbrella", with_subject=True) == ""
    assert verb_phrase("car slowly moving forward.") == "slowly moving forward"  # keeps manner adverb, drops "."


def test_split_keeps_case_and_handles_punctuation():
    static_words, motion_words = split_static_motion("The Dog, Then JUMPING!")
    assert motion_words == ["Then", "JUMPING"]
    assert static_words == ["The", "Dog", ",", "!"]
    assert split_static_motion("") == ([], [])
    assert main_noun_phrase("") == ""


def test_tag_words_spans_index_the_expression():
    expression = "A man's  t-shirt, then   running"
    tagged = tag_words(expression)
    assert [w for w, *_ in tagged] == ["A", "man", "'s", "t", "-", "shirt", ",", "then", "running"]
    for word, start, end, _, _ in tagged:
        assert expression[start:end] == word
    assert [t[3] for t in tagged][-2:] == ["ADV", "VERB"]
    assert tagged[-1][4] == "run"  # lemma


def test_normalize_expression():
    assert normalize_expression("  The  Bird\tFlying\nAway ") == "the bird flying away"


# ------------------------------------------------------------------ token masks
def _token_chars(expression, start, end):
    return {k for k in range(start, end) if not expression[k].isspace()}


def _char_coverage(expression, offsets, mask):
    # Non-space characters covered by the masked tokens.
    chars = set()
    for (start, end), on in zip(offsets.tolist(), mask.tolist()):
        if on:
            chars |= _token_chars(expression, start, end)
    return chars


def _word_chars(expression, words):
    # Character positions of `words`, located left to right in `expression`.
    chars, pos = set(), 0
    for word in words:
        start = expression.index(word, pos)
        chars |= set(range(start, start + len(word)))
        pos = start + len(word)
    return chars


BPE_SENTENCES = [
    "bird standing on hand, then flying away",
    "the man in a red shirt riding a bike",
    "elephant turning around",
    "car moving slowly then stopping",
]


@pytest.fixture(scope="module", params=[True, False], ids=["trim_offsets", "raw_offsets"])
def bpe_tokenizer(request):
    # A RoBERTa-like byte-level BPE trained offline on a few sentences; the tiny vocabulary splits
    # verbs into several subwords. Without offset trimming, a token's span includes the space
    # before the word (RoBERTa's "Ġ").
    trim = request.param
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=trim)
    bpe.train_from_iterator(BPE_SENTENCES, vocab_size=280, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=trim)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_token_masks_with_byte_level_bpe(bpe_tokenizer):
    expressions = BPE_SENTENCES[:1] + BPE_SENTENCES[3:]
    enc = bpe_tokenizer(expressions, return_offsets_mapping=True, padding="max_length", max_length=40,
                        return_tensors="pt")
    offsets = enc["offset_mapping"]  # (B, L, 2)
    static, motion = batch_static_motion_token_masks(expressions, offsets)
    assert static.shape == motion.shape == (2, 40) and static.dtype == motion.dtype == torch.bool
    assert not (static & motion).any()
    for b, expression in enumerate(expressions):
        ids = enc["input_ids"][b]
        tokens = bpe_tokenizer.convert_ids_to_tokens(ids)
        special = torch.tensor([t in ("<s>", "</s>", "<pad>") for t in tokens])
        assert special.sum() == 40 - len(bpe_tokenizer.tokenize(expression))
        assert not static[b][special].any() and not motion[b][special].any()
        motion_words = next(c[1] for c in CASES if c[0] == expression)  # written by hand above
        # Every character of a motion word is covered by motion tokens and by nothing else.
        assert _char_coverage(expression, offsets[b], motion[b]) == _word_chars(expression, motion_words)
        non_space = {k for k, c in enumerate(expression) if not c.isspace()}
        assert _char_coverage(expression, offsets[b], static[b]) == non_space - _word_chars(expression, motion_words)
        # The unbatched form agrees.
        single = static_motion_token_masks(expression, offsets[b])
        assert torch.equal(single[0], static[b]) and torch.equal(single[1], motion[b])
    # The test must exercise subwords: "standing" is several BPE tokens, all of them motion.
    start = BPE_SENTENCES[0].index("standing")
    inside = set(range(start, start + len("standing")))
    token_chars = [_token_chars(BPE_SENTENCES[0], s, e) for s, e in offsets[0].tolist()]
    pieces = [k for k, chars in enumerate(token_chars) if chars and chars <= inside]
    assert len(pieces) >= 2 and motion[0, pieces].all()


def test_token_masks_hand_offsets():
    expression = "man walking away"
    #            <s>     man     " walking" (untrimmed)  "walk" "ing"  straddles     " "       </s>   pad
    offsets = [(0, 0), (0, 3), (3, 11), (4, 8), (8, 11), (2, 5), (11, 12), (0, 0), (0, 0)]
    static, motion = static_motion_token_masks(expression, offsets)
    assert static.tolist() == [False, True, False, False, False, False, False, False, False]
    assert motion.tolist() == [False, False, True, True, True, False, False, False, False]
    offsets = torch.tensor([[(0, 3), (12, 16)]])  # (1, 2, 2)
    static, motion = batch_static_motion_token_masks([expression], offsets)
    assert static.tolist() == [[True, False]] and motion.tolist() == [[False, True]]


def test_token_masks_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(L, 2\)"):
        static_motion_token_masks("a dog", torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="B=2"):
        batch_static_motion_token_masks(["a dog", "a cat"], torch.zeros(3, 4, 2, dtype=torch.long))


# ------------------------------------------------------------------ word tokenizer
def test_build_vocab_sorted_unique_lowercase_and_order_free():
    texts = ["Bird standing on hand, then flying away", "the BIRD on the hand"]
    vocab = build_vocab(texts)
    assert vocab == sorted(set(vocab))
    assert vocab == [",", "away", "bird", "flying", "hand", "on", "standing", "the", "then"]
    assert build_vocab(texts[::-1]) == vocab


def test_word_tokenizer_ids_offsets_padding_unknown():
    vocab = ["bird", "flying", "away", "then", ","]
    tok = word_tokenizer(vocab, max_length=10)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == 10
    texts = ["Bird, then FLYING away", "penguin flying"]
    enc = tok(texts, padding="max_length", truncation=True, return_offsets_mapping=True, return_tensors="pt")
    # ids: <s>=1, bird=4, flying=5, away=6, then=7, ","=8, unknown=3, pad=0
    assert enc["input_ids"].tolist() == [[1, 4, 8, 7, 5, 6, 2, 0, 0, 0], [1, 3, 5, 2, 0, 0, 0, 0, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 4 + [0] * 6]
    assert enc["offset_mapping"][0].tolist() == [[0, 0], [0, 4], [4, 5], [6, 10], [11, 17], [18, 22]] + [[0, 0]] * 4
    assert enc["offset_mapping"][1, 1].tolist() == [0, 7]  # the unknown word keeps its span
    long = tok(["bird " * 20], truncation=True)["input_ids"][0]
    assert len(long) == 10 and long[0] == 1 and long[-1] == 2


def test_word_tokenizer_vocab_order_duplicates_and_errors():
    tok = word_tokenizer(["dog", "<s>", "cat", "dog"], max_length=8)
    assert tok.convert_tokens_to_ids(["dog", "cat", "<s>"]) == [4, 5, 1]
    assert len(tok) == 6
    with pytest.raises(ValueError, match="lower-case"):
        word_tokenizer(["Dog"])
    with pytest.raises(ValueError, match="max_length"):
        word_tokenizer(["dog"], max_length=1)


def test_token_masks_with_word_tokenizer():
    expressions = ["Bird standing on hand, then flying away", "the red umbrella"]
    tok = word_tokenizer(build_vocab(expressions), max_length=12)
    enc = tok(expressions, padding="max_length", truncation=True, return_offsets_mapping=True, return_tensors="pt")
    static, motion = batch_static_motion_token_masks(expressions, enc["offset_mapping"])
    # <s> Bird standing on hand , then flying away </s> <pad> <pad>
    assert motion[0].tolist() == [False, False, True, False, False, False, True, True, True, False, False, False]
    assert static[0].tolist() == [False, True, False, True, True, True, False, False, False, False, False, False]
    assert not motion[1].any()
    assert static[1].tolist() == [False, True, True, True] + [False] * 8


# ---------------------------------------------------------------- agreement with spaCy itself
def test_motion_split_agrees_with_spacy_on_expressions_it_was_not_tuned_on():
    """tests/fixtures/spacy_pos_cases.json: spaCy 3.8 en_core_web_sm's tags on 100 expressions
    (see its "about"). The figure the module docstring states is what this measures."""
    import json
    from pathlib import Path
    data = json.loads((Path(__file__).parent / "fixtures" / "spacy_pos_cases.json").read_text())
    words = agree = exact = 0
    for case in data["cases"]:
        ours = tag_words(case["expression"])
        every = True
        for text, start, pos in case["tokens"]:
            if pos in ("PUNCT", "SPACE"):
                continue
            mine = [p for _, s, e, p, _ in ours if s < start + len(text) and e > start]  # the overlapping words
            same = (pos in ("VERB", "ADV")) == any(p in ("VERB", "ADV") for p in mine)
            words, agree, every = words + 1, agree + same, every and same
        exact += every
    assert (words, len(data["cases"])) == (648, 100)
    assert agree >= 633 and exact >= 86, (agree, exact)


def test_closed_class_words_are_not_nouns():
    tags = dict((w, p) for w, _, _, p, _ in tag_words("waiting for the ball except one beyond the fence than about"))
    assert tags["for"] == tags["except"] == tags["beyond"] == tags["than"] == tags["about"] == "ADP"
    assert main_noun_phrase("someone is waiting for the ball") == "someone"  # spaCy's chunk of the root's first child


def test_main_noun_phrase_agrees_with_vatex_rule_on_spacy_parses():
    """The fixture's vatex_noun_phrase: VATEX's extract_noun_phrase run on spaCy 3.8 parses of 100
    expressions this rule was not tuned on. The module states the agreement this measures."""
    import json
    from pathlib import Path
    data = json.loads((Path(__file__).parent / "fixtures" / "spacy_pos_cases.json").read_text())
    agree = sum(main_noun_phrase(c["expression"]) == c["vatex_noun_phrase"] for c in data["cases"])
    assert agree >= 93, agree



def test_verb_phrase_agrees_with_a_spacy_dependency_rule():
    """tests/fixtures/spacy_verb_phrases.json: the phrase a dependency-parse rule finds with spaCy 3.8
    (en_core_web_sm 3.8.0) on the 100 labelled expressions (the rule is in the file's "about"). The
    rule-based verb_phrase gives the same phrase for 94 and agrees on whether there is one for 97."""
    import json
    from pathlib import Path
    cases = json.loads((Path(__file__).parent / "fixtures" / "spacy_verb_phrases.json").read_text())["cases"]
    assert len(cases) == 100
    ours = [" ".join(verb_phrase(c["expression"]).lower().split()) for c in cases]
    theirs = [" ".join(c["spacy_verb_phrase"].lower().split()) for c in cases]
    assert sum(a == b for a, b in zip(ours, theirs)) >= 94
    assert sum(bool(a) == bool(b) for a, b in zip(ours, theirs)) >= 97
