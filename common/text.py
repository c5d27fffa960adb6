"""Text helpers shared by the four methods.

- `word_tokenizer` / `build_vocab`: a word-level tokenizer for the toy models (no download).
- `normalize_expression`: the lower-cased, whitespace-normalised sentence MeViS loaders feed the
  model (dshmp/data/datasets/mevis.py).
- `tag_words` / `split_static_motion` / `verb_adverb_cues` / `static_motion_token_masks`: DsHmp's
  expression decoupling. The official code (dshmp_model.py `proceesing_text_decoupling`) runs spaCy
  `en_core_web_sm` and puts a word in the motion set when its POS is VERB or ADV, and every
  other word in the static set; each RoBERTa subword takes the set of the word that contains it.
  A method with another rule passes its own word sets (`cues=`).
- `main_noun_phrase`: the object phrase of VATEX's CLIP prior prompt "a photo of {}"
  (vatex/utils/noun_phrase.py: the spaCy noun chunk that holds the dependency root).
- `head_noun`: the last noun of the main noun phrase, the subject MRaCL's verb phrases may carry;
  so two methods use the noun-phrase rule, which is why it lives here.

spaCy and its models are not dependencies of this repository, so a small rule-based tagger stands
in for `en_core_web_sm`: word lists plus -ing/-ed/-s/-ly morphology and a few context rules, tuned
on referring expressions (MeViS, RefCOCO/+/g). It returns the universal POS tags spaCy uses for
the distinctions these helpers need (VERB, ADV, AUX, NOUN, ADJ, DET, ADP, PRON, ...) and
approximates spaCy's choice: on 100 expressions it was not tuned on, tagged by spaCy 3.8
en_core_web_sm 3.8.0 (tests/fixtures/spacy_pos_cases.json), 97.7% of the words (633 of 648) fall
on the same side of DsHmp's static/motion split, and 86 of the 100 expressions agree on every
word; most differences are the particles below. Known differences from spaCy, by design:
  - particles after a verb ("standing up", "turning around", "getting off") are ADV (motion);
    spaCy maps the Penn tag RP to ADP, so it may put some of them in the static set.
  - a past participle between a determiner/adjective and a noun ("the parked car") is ADJ,
    one after the noun ("car parked on the left") is VERB; -ing forms are VERB in both places.
  - "left"/"right" are NOUN after a determiner or preposition, ADJ before a noun, ADV right after
    a verb ("turning left"); "next"/"close"/"far" before "to"/"from" are ADV as spaCy tags them.
  - unknown words are NOUN; a verb missing from the lists is still found through its -ing/-ed
    form, but not through a bare or 3rd-person form ("dogs frolic").
"""
import re

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Shape legend: B expressions, L tokens.

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # <pad> = 0 as in DsHmp's dataset mapper


def normalize_expression(text: str) -> str:
    """Lower-case and collapse whitespace: `" ".join(text.lower().split())`
    (DsHmp's MeViS loader)."""
    return " ".join(text.lower().split())


# ------------------------------------------------------------------
# word-level tokenizer (toy models)
def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words are runs of non-space, non-punctuation characters; every punctuation mark is its own
    # token.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_vocab(expressions: list[str]) -> list[str]:
    """Sorted unique lower-cased words (and punctuation marks) of `expressions`, split exactly as
    `word_tokenizer` splits them, so every word of these expressions gets its own id."""
    pre = _word_pre_tokenizer()
    words = {w for text in expressions for w, _ in pre.pre_tokenize_str(text.lower())}
    return sorted(words)


def word_tokenizer(vocab: list[str], max_length: int = 40) -> PreTrainedTokenizerFast:
    """A word-level `PreTrainedTokenizerFast` for the toy models.

    Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, then `vocab` in the given order (duplicates and
    special tokens in `vocab` are skipped). Text is lower-cased and split on whitespace and
    punctuation; unknown words map to `<unk>`; every sequence is wrapped as `<s> ... </s>`.
    Offsets (`return_offsets_mapping=True`) index the original string; specials and padding get
    (0, 0). Padding is on the right with id 0; `model_max_length` is `max_length`, so
    `padding="max_length", truncation=True` gives (B, max_length) ids like DsHmp's 40-token input.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to hold <s> and </s>, got {max_length}")
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocab:
        if not word or word != word.lower() or any(c.isspace() for c in word):
            raise ValueError(f"vocab entries must be non-empty lower-case words without spaces, "
                             f"got {word!r}")
        ids.setdefault(word, len(ids))
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _word_pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",  # RoBERTa's pair layout
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        padding_side="right",
    )


# ------------------------------------------------------------------ lexicon
def _words(text: str) -> frozenset:
    return frozenset(text.split())


# Regular verbs: every form is generated by `_inflect`. Irregular past forms are in _IRREGULAR.
_VERBS = _words("""
    walk run move turn jump fly eat drink stand sit ride push pull chase follow climb swim play hold
    carry look fall lie lay bend shake stop start go come leave enter exit approach cross crawl roll
    spin rotate swing slide skate ski surf snowboard skateboard drive park stay remain wait rest
    sleep
    wake graze feed bite chew lick sniff smell peck kick hit throw catch pick put place drop lift
    raise grab touch rub scratch hug kiss fight wrestle attack bark race gallop trot hop leap dive
    splash float paddle row pedal steer tow drag pat wave nod clap dance sing talk speak smile laugh
    watch see stare face point reach stretch lean kneel squat crouch bow rise sink flap wag wiggle
    shift reverse overtake pass circle surround lead guide join meet gather separate scatter
    disappear appear emerge hide escape flee struggle try begin keep continue change make take give
    get use wear have cut wash clean groom preen perch land hover glide soar bounce shoot serve bat
    pitch toss swat open cover fill pour stir cook read write draw paint work build dig step march
    stroll wander limp pace sprint jog dash rush hurry speed slow pause halt sway tilt flip twist
    shiver tremble scramble creep stalk pounce charge butt ram nuzzle suckle nurse mount dismount
    board load unload bring fetch collect accelerate brake hang tie hand show dress decorate print
    label mark slice top stuff stack pile fold wrap attach locate position picture display color
    colour shape plant frame contain include block collide crash bump knock return arrive depart
    head swap switch trail lag herd huddle spread flutter stumble trip slip skip lower hunt search
    explore pose bathe forage cuddle snuggle chat beat sweep shovel mow spray sail travel
""")

_IRREGULAR = {  # lemma -> past tense and past participle forms
    "run": "ran", "fly": "flew flown", "stand": "stood", "sit": "sat", "ride": "rode ridden",
    "eat": "ate eaten", "drink": "drank drunk", "hold": "held", "fall": "fell fallen",
    "lie": "lay lain", "lay": "laid", "go": "went gone", "come": "came", "leave": "left",
    "swim": "swam swum", "bend": "bent", "shake": "shook shaken", "hit": "hit",
    "throw": "threw thrown", "catch": "caught", "put": "put", "bite": "bit bitten",
    "take": "took taken", "give": "gave given", "get": "got gotten", "make": "made",
    "see": "saw seen", "lead": "led", "feed": "fed", "meet": "met",
    "rise": "rose risen", "sink": "sank sunk", "swing": "swung", "spin": "spun", "slide": "slid",
    "sing": "sang sung", "speak": "spoke spoken", "shoot": "shot", "cut": "cut",
    "wear": "wore worn",
    "hide": "hid hidden", "flee": "fled", "speed": "sped", "creep": "crept", "leap": "leapt",
    "kneel": "knelt", "sleep": "slept", "keep": "kept", "begin": "began begun",
    "drive": "drove driven", "draw": "drew drawn", "write": "wrote written", "dig": "dug",
    "bring": "brought", "fight": "fought",
    "hang": "hung", "beat": "beaten", "have": "had", "build": "built", "sweep": "swept",
    "spread": "spread", "read": "read", "wake": "woke woken", "light": "lit", "mow": "mown",
}
_VERBS = _VERBS | _IRREGULAR.keys()

# -ing forms that the spelling rules in `_inflect` get wrong.
_ING_EXCEPTIONS = {"begin": "beginning", "travel": "traveling", "lie": "lying", "tie": "tying"}
# Regular lemmas with no bare verb use in referring expressions ("slow car", "lower left").
_NO_BASE = _words("slow lower")


# -s forms that are usually plural nouns after another noun ("pizza slices", "bus stops").
_COMPOUND_S3 = _words("""
    slice bat stop park plant stack pile mark label print top picture frame color shape place
    display light sign board drink stand cut ride lift swing slide step race show cover pass
    head hand face row pitch ski skate surf land feed point wave block
""")

_DET = _words("the a an this these those some any each every all both another no either neither")
_PRON = _words("""
    it its he she his her him they them their theirs we us our i me my you your who whom whose which
    what itself himself herself themselves someone something somebody anyone anything nothing
    everything everyone
""")
_REL_PRON = _words("who whom whose which that")
_POSSESSIVE = _words("his her its their our my your")
_ADP = _words("""
    in on at of to from with without by near behind beside besides between among under over above
    below beneath across through along around into onto toward towards against inside outside past
    after before during like via within upon amid for except beyond than about throughout underneath
    alongside opposite despite per versus amongst atop unlike
""")
_CCONJ = _words("and or but nor &")
_SCONJ = _words("while because if although though until whereas unless")
_AUX = _words("is are was were be been being am 's 're 'm can could will would shall should may "
              "might must")
_HAVE = _words("have has had having 've 'd")
_DO = _words("do does did")
_NUM = _words("one two three four five six seven eight nine ten eleven twelve hundred")
_ADJ = _words("""
    red blue green yellow black white brown gray grey pink purple orange golden silver dark bright
    pale tan beige light big small large little tiny huge tall short long fat thin young old middle
    center
    centre bottom front rear upper leftmost rightmost closest nearest farthest furthest other second
    third fourth fifth sixth same whole entire empty full open only single baby adult
    striped spotted colored coloured haired eyed legged sleeved shaped headed sided toned patterned
    checkered dotted sized skinned tailed horned necked faced bearded hooded collared winged naked
    wooden plastic metal glass leather
""")
# Adverbs that are never prepositions.
_ADV = _words("""
    away then again still together forth forward forwards backward backwards apart ahead aside
    sideways
    upward upwards downward downwards also too very quite rather just almost nearly even ever soon
    later once twice always never here now already alone really so more most somewhat slightly
    where how when why meanwhile afterwards finally suddenly constantly continuously
""")
# Prepositions that are adverbs (particles) when nothing nominal follows them: "sitting down".
_PARTICLES = _words("up down off out over around along across through in on by past inside outside "
                    "behind")
# Adjectives that are adverbs after a verb or before "to"/"from": "running fast", "next to the car".
_ADJ_OR_ADV = _words("""
    fast slow straight first last closer nearer further farther faster slower higher lower close far
    next
""")
_INTENSIFIERS = _words("very really quite so too rather slightly most more")

_ING_NOUNS = _words("""
    ceiling thing king ring wing string spring swing sling sting something nothing anything
    everything morning evening awning railing icing frosting topping stuffing pudding wedding
    earring sibling dumpling lightning duckling seedling sapling darling bedding siding during
    clothing stocking herring
""")
# Nouns that are also -ing forms of verbs; nouns after a determiner, adjective or preposition.
_AMBIG_ING = _words("building painting drawing filling opening crossing landing covering")
# -ing words that form compound nouns with the noun that follows ("dining table", "parking lot").
_COMPOUND_ING = _words("""
    dining parking cutting living sleeping frying baking washing ironing changing waiting rocking
    swimming walking fishing skating surfing skiing boarding shopping riding racing
""")
_ED_NON_VERB = _words("""
    red bed sled shed bred shred hundred naked wicked sacred rugged ragged jagged crooked beloved
    kindred
""")
_LY_NON_ADV = _words("""
    family belly jelly lily fly butterfly dragonfly firefly ally bully rally tally holly ugly silly
    friendly lovely lonely curly elderly hilly chilly woolly wooly frilly jolly costly lowly oily
    wiggly sparkly bubbly burly surly sly ply july italy apply reply supply rely assembly anomaly
    homely cuddly prickly wrinkly grizzly gangly scaly smelly dolly molly polly trolly gully
    daily only early
""")
_IRREG_PLURAL = _words("men women people children geese mice sheep deer fish feet teeth cattle "
                       "police")

_VOWELS = "aeiou"


def _double_final(lemma: str) -> bool:
    # One-syllable consonant-vowel-consonant lemmas double the last letter: run -> running, stop ->
    # stopped.
    groups = re.findall(r"[aeiou]+", lemma)
    return (len(groups) == 1 and len(lemma) >= 3 and lemma[-1] not in _VOWELS + "wxy"
            and lemma[-2] in _VOWELS and lemma[-3] not in _VOWELS)


def _inflect(lemma: str) -> dict:
    """Forms of a lemma: {form: kind} with kind in base / s3 / ing / past."""
    if lemma.endswith(("s", "sh", "ch", "x", "z")) or lemma in ("go", "do"):
        s3 = lemma + "es"
    elif lemma.endswith("y") and lemma[-2] not in _VOWELS:
        s3 = lemma[:-1] + "ies"
    else:
        s3 = lemma + "s"
    if lemma in _ING_EXCEPTIONS:
        ing = _ING_EXCEPTIONS[lemma]
    elif lemma.endswith("e") and not lemma.endswith(("ee", "ye", "oe")):
        ing = lemma[:-1] + "ing"
    elif _double_final(lemma):
        ing = lemma + lemma[-1] + "ing"
    else:
        ing = lemma + "ing"
    if lemma.endswith("e"):
        past = [lemma + "d"]
    elif lemma.endswith("y") and lemma[-2] not in _VOWELS:
        past = [lemma[:-1] + "ied"]
    elif _double_final(lemma):
        past = [lemma + lemma[-1] + "ed"]
    else:
        past = [lemma + "ed"]
    if lemma in _IRREGULAR:
        past = _IRREGULAR[lemma].split()
    forms = {s3: "s3", ing: "ing", **{p: "past" for p in past}}
    if lemma not in _NO_BASE:
        forms.setdefault(lemma, "base")
    return forms


_VERB_FORMS = {}  # form -> (lemma, kind)
for _lemma in sorted(_VERBS):
    for _form, _kind in _inflect(_lemma).items():
        _VERB_FORMS.setdefault(_form, (_lemma, _kind))
# Irregular past forms that are also common nouns or adjectives: verbs only right after a subject.
_AMBIG_PAST = _words("saw bit shot cut hit set left lay put fell found read lit spread beat")


def _guess_lemma(word: str, kind: str) -> str:
    # Lemma of a verb form missing from the lexicon, good enough to look it up in a verb list.
    stem = word[:-3] if kind == "ing" else word[:-2]
    if stem and stem + "e" in _VERBS:
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and stem[:-1] in _VERBS:
        return stem[:-1]
    if kind == "past" and word.endswith("ied"):
        return word[:-3] + "y"
    return stem


def _verb_form(word: str):
    """(lemma, kind) when `word` looks like a verb form, else None."""
    if word in _VERB_FORMS:
        return _VERB_FORMS[word]
    if word.endswith("ing") and len(word) >= 5 and word not in _ING_NOUNS:
        stem = word[:-3]
        if any(c in _VOWELS + "y" for c in stem):
            return _guess_lemma(word, "ing"), "ing"
    if (word.endswith("ed") and len(word) >= 4 and word not in _ED_NON_VERB and word not in _ADJ
            and not word.endswith("eed")):
        stem = word[:-2]
        if len(stem) >= 2 and any(c in _VOWELS + "y" for c in stem):
            return _guess_lemma(word, "past"), "past"
    return None


def _is_plural_noun(word: str) -> bool:
    return word in _IRREG_PLURAL or (
        word.endswith("s") and not word.endswith(("ss", "us", "is", "'s")) and len(word) > 3)


def _lexical_class(word: str) -> str:
    """Context-free guess, used to look one word ahead: NOMINAL, VERB or the tag of a function
    word."""
    if not re.match(r"'?[^\W_]", word):
        return "PUNCT"
    if word == "that":
        return "PRON"
    for tag, words in (("DET", _DET), ("ADP", _ADP), ("CCONJ", _CCONJ), ("SCONJ", _SCONJ),
                       ("AUX", _AUX), ("PRON", _PRON)):
        if word in words:
            return tag
    if word in _ADV or (word.endswith("ly") and word not in _LY_NON_ADV
                        and word not in _VERB_FORMS):
        return "ADV"
    form = _verb_form(word)
    if form is not None and form[1] == "ing" and word not in _AMBIG_ING | _COMPOUND_ING:
        return "VERB"
    # nouns, adjectives, numbers, and base/-s/-ed forms that may be nouns or adjectives
    return "NOMINAL"


# ------------------------------------------------------------------ tagging
_WORD_RE = re.compile(r"[^\W_]+(?=n't)|n't|'[^\W\d_]+|[^\W_]+|[^\w\s]|_")


def _split_words(expression: str) -> list[tuple[str, int, int]]:
    # spaCy-like word split: "man's" -> man 's, "t-shirt" -> t - shirt, "don't" -> do n't.
    return [(m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(expression)]


def _prev(tags: list[str], k: int = 1) -> str:
    return tags[-k] if len(tags) >= k else "START"


def _after_verb(tags: list[str]) -> bool:
    # The word follows a verb, possibly through adverbs and conjunctions ("turning slowly
    # around", "moving left and then right", "jumping up and down").
    for t in reversed(tags):
        if t == "VERB":
            return True
        if t not in ("ADV", "CCONJ"):
            return False
    return False


def _coordinated_verb(tags: list[str]) -> bool:
    # "runs and jumps": a CCONJ right before us, with a verb earlier in the expression.
    return _prev(tags) == "CCONJ" and "VERB" in tags


def _tag_closed_class(w: str, lex: str, tags: list[str], prev_word: str, nxt: str,
                      nxt_word: str):
    """(pos, lemma) of a function word, a direction word or a word of a closed list, by its
    neighbours; None for every other word (_tag_open_word decides those)."""
    prev = _prev(tags)
    if lex == "PUNCT":
        return "PUNCT", w
    if w == "that":
        return ("PRON" if prev in ("NOUN", "PUNCT", "VERB", "ADJ", "NUM") or nxt != "NOMINAL"
                else "DET"), w
    if w == "to":
        nxt_form = _verb_form(nxt_word)
        return ("PART" if nxt_form is not None and nxt_form[1] == "base" else "ADP"), w
    if w == "'s":
        return ("AUX" if prev_word in ("it", "he", "she", "that", "there", "who", "what")
                else "PART"), w
    if w in ("not", "n't"):
        return "PART", w
    if w == "there":
        return ("PRON" if nxt == "AUX" else "ADV"), w
    if w in _AUX:
        return "AUX", "be" if w in _words("is are was were be been being am 's 're 'm") else w
    if w in _HAVE:
        nxt_form = _verb_form(nxt_word)
        aux = nxt_word == "been" or (nxt_form is not None and nxt_form[1] == "past")
        return ("AUX" if aux else "VERB"), "have"
    if w in _DO:
        nxt_form = _verb_form(nxt_word)
        aux = nxt_word in ("not", "n't") or (nxt_form is not None and nxt_form[1] == "base")
        return ("AUX" if aux else "VERB"), "do"
    if w in ("left", "right"):
        if w == "left" and prev_word in _REL_PRON | _HAVE:
            return "VERB", "leave"  # "the car that left", "has left"
        if prev in ("DET", "ADP", "ADJ", "PRON") or prev_word == "far":
            return "NOUN", w  # "on the left", "far right"
        if nxt == "NOMINAL" or nxt_word in ("most", "-"):
            return "ADJ", w  # "left guy", "right most zebra"
        return ("ADV" if _after_verb(tags) else "NOUN"), w  # "turning left"
    if w in _ADJ_OR_ADV:
        if nxt_word in ("to", "from", "away") and w in _words("close closer next far nearer"):
            return "ADV", w  # "next to the car", "far from"
        if _after_verb(tags) and nxt != "NOMINAL":
            return "ADV", w  # "running fast", "walking straight"
        if w == "far" and prev not in ("DET", "ADJ"):
            return ("ADV" if nxt != "NOMINAL" else "ADJ"), w
        return "ADJ", w
    if w == "back":
        return ("ADV" if _after_verb(tags) or prev == "START" and nxt != "NOMINAL" else "NOUN"), w
    if w == "only":
        return ("ADJ" if prev == "DET" else "ADV"), w
    if w in _DET:
        return "DET", w
    if w in _PRON:
        return "PRON", w
    if w in _PARTICLES:
        # A preposition takes a noun phrase; after a verb with nothing nominal next it is a
        # particle.
        takes_object = nxt in ("NOMINAL", "DET", "PRON") or nxt_word.isdigit()
        return ("ADV" if _after_verb(tags) and not takes_object else "ADP"), w
    for words, tag in ((_ADP, "ADP"), (_CCONJ, "CCONJ"), (_SCONJ, "SCONJ")):
        if w in words:
            return tag, w
    if w in _NUM or w.isdigit():
        return "NUM", w
    if lex == "ADV":
        return "ADV", w
    if w in _ADJ or (w.endswith("est") and len(w) > 5 and w not in _words("forest interest")):
        return "ADJ", w
    return None


def _tag_open_word(w: str, tags: list[str], prev_word: str, nxt: str, nxt_word: str):
    """(pos, lemma) of a word no closed-class rule took: a verb form (-ing, past, -s, base) is a
    VERB, NOUN or ADJ by its neighbours; any other word is a NOUN."""
    form = _verb_form(w)
    if form is None:
        return "NOUN", w
    verb_lemma, kind = form
    prev = _prev(tags)
    subject_before = prev in ("NOUN", "PRON", "ADV") or prev_word in _REL_PRON
    determined = prev in ("DET", "ADJ", "NUM", "ADP") or prev_word in _POSSESSIVE
    nominal_before = determined or prev in ("START", "PUNCT")
    tag = "NOUN"
    if kind == "ing":
        if w in _AMBIG_ING and nominal_before:
            tag = "NOUN"  # "the building"
        elif w in _COMPOUND_ING and nxt == "NOMINAL" and nominal_before:
            tag = "NOUN"  # "dining table"
        else:
            tag = "VERB"
    elif kind == "past":
        if determined or (w in _AMBIG_PAST and not (
                subject_before or prev == "AUX" or _coordinated_verb(tags))):
            tag = "ADJ" if nxt == "NOMINAL" else "NOUN"  # "the parked car", "a rose"
        elif prev in ("START", "PUNCT") and nxt == "NOMINAL":
            tag = "ADJ"  # "parked car on the left"
        else:
            tag = "VERB"
    elif kind == "s3":
        if determined:
            tag = "NOUN"  # "the stands", "two drinks"
        elif (prev in ("NOUN", "START") and verb_lemma in _COMPOUND_S3
              and nxt in ("ADP", "PUNCT", "END", "CCONJ", "AUX")):
            tag = "NOUN"  # "pizza slices on the plate", not "the cat stands still"
        else:
            tag = "VERB"
    else:  # base form
        adverb_before = prev == "ADV" and prev_word not in _INTENSIFIERS
        plural_pron = prev_word in _words("they we i you")
        prev_noun_plural = prev == "NOUN" and _is_plural_noun(prev_word)
        if (prev_word in _REL_PRON or plural_pron or prev in ("PART", "AUX") or adverb_before
                or prev_noun_plural or _coordinated_verb(tags) or _plural_subject(tags)):
            tag = "VERB"
    if tag != "VERB":
        return tag, w
    if (kind == "ing" and nominal_before and prev != "PUNCT" and nxt == "NOMINAL"
            and nxt_word not in _words("left right")):
        return "VERB", "~" + verb_lemma  # noun modifier: "the running dog", "walking man"
    return "VERB", verb_lemma


def tag_words(expression: str) -> list[tuple[str, int, int, str, str]]:
    """Rule-based universal POS tags for the words of `expression`.

    Returns one (word, start, end, pos, lemma) per word, where expression[start:end] == word,
    pos is a spaCy universal tag (VERB, ADV, AUX, NOUN, ADJ, DET, ADP, PRON, PART, NUM, CCONJ,
    SCONJ, PUNCT) and lemma is the verb lemma for VERB/AUX words and the lower-cased word otherwise.
    A VERB used as a noun modifier ("the running dog") has pos "VERB" and lemma prefixed with "~".
    Left to right, each word is tagged from the tags before it and the words around it: first by
    the closed-class rules (_tag_closed_class), else as an open-class word (_tag_open_word).
    """
    spans = _split_words(expression)
    low = [w.lower() for w, _, _ in spans]
    lex = [_lexical_class(w) for w in low]
    tags, lemmas = [], []
    for i, w in enumerate(low):
        nxt = lex[i + 1] if i + 1 < len(low) else "END"
        nxt_word = low[i + 1] if i + 1 < len(low) else ""
        prev_word = low[i - 1] if i > 0 else ""
        tag, lemma = (_tag_closed_class(w, lex[i], tags, prev_word, nxt, nxt_word)
                      or _tag_open_word(w, tags, prev_word, nxt, nxt_word))
        tags.append(tag)
        lemmas.append(lemma)
    return [(w, s, e, t, lm) for (w, s, e), t, lm in zip(spans, tags, lemmas)]


def _plural_subject(tags: list[str]) -> bool:
    # "cat and dog chase": two nouns joined by a conjunction act as a plural subject.
    return len(tags) >= 3 and tags[-1] == "NOUN" and tags[-2] == "CCONJ" and tags[-3] == "NOUN"


# ------------------------------------------------------------------
# DsHmp: static / motion decoupling
def _is_motion_pos(pos: str) -> bool:
    return pos in ("VERB", "ADV")  # DsHmp: spaCy POS VERB or ADV -> motion, everything else static


def split_static_motion(expression: str) -> tuple[list[str], list[str]]:
    """DsHmp's expression decoupling at word level: (static_words, motion_words), in order.

    Motion words are those tagged VERB or ADV (verbs in any form, adverbs such as "slowly",
    "then", "away", particles after a verb); static words are all others, punctuation included.
    Words keep the case of `expression`.
    """
    static, motion = [], []
    for word, _, _, pos, _ in tag_words(expression):
        (motion if _is_motion_pos(pos) else static).append(word)
    return static, motion


def verb_adverb_cues(expression: str) -> list[tuple[int, int, str]]:
    """(start, end, "static" | "motion") of every word of `expression`: the words tagged VERB or ADV
    are motion cues, every other word is a static cue (DsHmp's rule, `split_static_motion`)."""
    return [(s, e, "motion" if _is_motion_pos(pos) else "static")
            for _, s, e, pos, _ in tag_words(expression)]


def static_motion_token_masks(expression: str, offsets: torch.Tensor, cues=verb_adverb_cues
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Static and motion masks over the tokens of `expression` (DsHmp's static_map / motion_map).

    offsets: (L, 2) character spans from a fast tokenizer called on `expression` with
    `return_offsets_mapping=True` (tensor, array or nested list). `cues(expression)` gives each
    word's span and set ("static", "motion", or None for neither; default: `verb_adverb_cues`). A
    token is in the set of the word whose span contains the token's span after leading/trailing
    spaces are trimmed (byte-level BPE without offset trimming counts the space before a word in
    the token). Specials and padding (empty spans) are in neither set, as in the official code; so
    are tokens that straddle two words (the official code finds no spaCy word containing them).
    Returns two (L,) bool tensors on the device of `offsets` (CPU for lists).
    """
    offsets = torch.as_tensor(offsets)  # (L, 2)
    if offsets.ndim != 2 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must have shape (L, 2), got {tuple(offsets.shape)}")
    words = cues(expression)
    static = torch.zeros(offsets.shape[0], dtype=torch.bool)  # (L,)
    motion = torch.zeros(offsets.shape[0], dtype=torch.bool)  # (L,)
    for i, (start, end) in enumerate(offsets.tolist()):
        piece = expression[start:end]
        start, end = start + len(piece) - len(piece.lstrip()), \
            end - (len(piece) - len(piece.rstrip()))
        if end <= start:
            continue
        for word_start, word_end, kind in words:
            if word_start <= start and end <= word_end:
                if kind is not None:
                    (motion if kind == "motion" else static)[i] = True
                break
    return static.to(offsets.device), motion.to(offsets.device)


def batch_static_motion_token_masks(
    expressions: list[str], offsets: torch.Tensor, cues=verb_adverb_cues
) -> tuple[torch.Tensor, torch.Tensor]:
    """`static_motion_token_masks` for a batch: offsets (B, L, 2) -> two (B, L) bool tensors."""
    offsets = torch.as_tensor(offsets)  # (B, L, 2)
    if offsets.ndim != 3 or offsets.shape[-1] != 2 or offsets.shape[0] != len(expressions):
        raise ValueError(f"offsets must have shape (B={len(expressions)}, L, 2), got "
                         f"{tuple(offsets.shape)}")
    masks = [static_motion_token_masks(text, off, cues) for text, off in zip(expressions, offsets)]
    static = torch.stack([m[0] for m in masks])  # (B, L)
    motion = torch.stack([m[1] for m in masks])  # (B, L)
    return static, motion


# ------------------------------------------------------------------ VATEX: main noun phrase
_NP_TAGS = ("DET", "ADJ", "NOUN", "NUM")


def _noun_phrase_at(tagged: list, i: int) -> tuple[int, int]:
    """Token range [i, j) of the noun chunk starting at i (j == i when none starts there)."""
    j, seen_content = i, False
    while j < len(tagged):
        word, _, _, pos, lemma = tagged[j]
        nxt_pos = tagged[j + 1][3] if j + 1 < len(tagged) else "END"
        if pos == "DET" and not seen_content:
            pass
        elif pos in ("ADJ", "NOUN", "NUM"):
            seen_content = True
        elif pos == "VERB" and lemma.startswith("~") or pos == "PART" and word.lower() == "'s":
            seen_content = True  # "the running dog", "man's hat"
        elif pos == "ADV" and word.lower() in _INTENSIFIERS and nxt_pos in ("ADJ", "NOUN"):
            pass  # "the very big dog"
        elif pos == "PUNCT" and word == "-" and j > i and nxt_pos in ("ADJ", "NOUN", "VERB"):
            pass  # "t-shirt", "long-haired"
        elif pos == "CCONJ" and j > i and tagged[j - 1][3] == "ADJ" and nxt_pos == "ADJ":
            pass  # "black and white cat"
        else:
            break
        j += 1
    while j > i and tagged[j - 1][3] not in ("NOUN", "NUM", "ADJ"):
        j -= 1  # a chunk ends on its head
    return i, j


def main_noun_phrase(expression: str) -> str:
    """The object phrase for VATEX's CLIP prompt 'a photo of {}'.

    The official code takes the spaCy noun chunk that holds the dependency root; in a referring
    expression that is the leading noun phrase: determiners, adjectives and nouns up to the first
    preposition, relative pronoun, verb, conjunction or punctuation ("the man in a red shirt riding
    a bike" -> "the man", "a giraffe that is eating" -> "a giraffe"). When the expression does not
    start with one, the first noun phrase anywhere; when there is none, the whole expression
    (stripped), as the official fallback. The text is returned as written in `expression`. On the
    100 expressions of tests/fixtures/spacy_pos_cases.json it returns what VATEX's rule returns on
    spaCy 3.8 en_core_web_sm's parse for 93 (most others are spaCy parses that swallow the whole
    sentence, "a parrot sitting quietly on a perch").
    """
    tagged = tag_words(expression)
    first = next((k for k, t in enumerate(tagged) if t[3] != "PUNCT"), len(tagged))
    if first < len(tagged) and tagged[first][3] == "PRON" \
            and tagged[first][0].lower() not in _POSSESSIVE:
        # a pronoun subject is its own noun chunk: "someone is waiting for ..."
        return tagged[first][0]
    starts = [first] + [k for k in range(first + 1, len(tagged))
                        if tagged[k - 1][3] not in _NP_TAGS]
    for i in starts:
        i, j = _noun_phrase_at(tagged, i)
        if any(t[3] in ("NOUN", "NUM") for t in tagged[i:j]) or (i == first and j > i):
            return expression[tagged[i][1]:tagged[j - 1][2]]
    return expression.strip()


def head_noun(expression: str) -> str:
    """The last noun of the main noun phrase: "a black and white cat" -> "cat"; "" when none."""
    nouns = [w for w, _, _, pos, _ in tag_words(main_noun_phrase(expression))
             if pos in ("NOUN", "NUM")]
    return nouns[-1] if nouns else ""
