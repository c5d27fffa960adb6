"""Extract motion-centric verb phrases with a local instruct language model, for mracl.py \
--verb-phrases.

MRaCL extracts the phrases with an LLM whose name and prompt are not public; the prompt below asks
for the form its figure shows ("a black and white cat stretching its paw in the air" -> "cat
stretching its paw"). The model is any causal language model saved in a local folder (transformers'
`save_pretrained` layout, e.g. a downloaded instruct model); it is run greedily, one prompt per
sentence, in batches. Writes {sent_id: phrase} ("" when the model answers NONE) to --out as it goes,
and skips the sentences already there, so an interrupted run continues where it stopped.

Run:  python data/extract_verb_phrases.py --model LOCAL_DIR --data-root data/refer \
          --dataset refcocog \
          --split-by umd --split train --out data/refer/refcocog/verb_phrases.json
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for common/
from common.datasets import RefCOCO

PROMPT = """Extract the motion-centric verb phrase from a referring expression: \
the head noun of the \
object and what it is doing, without appearance or location words. If the expression describes no \
action or motion, answer NONE.
Expression: a black and white cat stretching its paw in the air
Verb phrase: cat stretching its paw
Expression: man in red shirt riding a bike
Verb phrase: man riding a bike
Expression: the red umbrella on the left
Verb phrase: NONE
Expression: {expression}
Verb phrase:"""


def answer(text: str) -> str:
    """The phrase in a model's continuation: its first line, stripped; "" for NONE or nothing."""
    line = text.strip().split("\n")[0].strip().strip(".").strip()
    return "" if not line or line.upper().startswith("NONE") else line


def _save(phrases: dict, out: Path) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(phrases, indent=0))
    os.replace(tmp, out)  # atomic: an interruption never leaves half a file


@torch.no_grad()
def extract(sentences: dict, model_dir, out: Path, *, batch_size=8,
            max_new_tokens=24, limit=None) -> dict:
    """sentences {sent_id: expression} -> {sent_id: phrase}, saved to `out` after every batch."""
    phrases = json.loads(out.read_text()) if out.is_file() else {}
    todo = [k for k in sentences if k not in phrases][:limit]
    if not todo:
        return phrases
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for start in tqdm(range(0, len(todo), batch_size), desc="verb phrases", unit="batch"):
        keys = todo[start:start + batch_size]
        enc = tokenizer([PROMPT.format(expression=sentences[k]) for k in keys], return_tensors="pt",
                        padding=True).to(device)
        enc.pop("token_type_ids", None)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
        phrases.update({k: answer(t) for k, t in zip(keys, texts)})
        _save(phrases, out)
    return phrases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a local folder with the model and its tokenizer")
    parser.add_argument("--data-root", required=True, help="the refer annotations (data/README.md)")
    parser.add_argument("--dataset", default="refcocog")
    parser.add_argument("--split-by", default="umd")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="at most this many new sentences")
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model must be a local folder (save_pretrained layout), got "
                         f"{args.model}")
    root = Path(args.data_root)
    reader = RefCOCO(root, root, dataset=args.dataset, split_by=args.split_by,
                     split=args.split, train=False)
    sentences = {str(s["sent_id"]): s["expression"] for s in reader.samples}
    phrases = extract(sentences, args.model, Path(args.out), batch_size=args.batch_size,
                      limit=args.limit)
    print(f"{sum(1 for k in sentences if k in phrases)} of {len(sentences)} sentences done "
          f"({sum(1 for k in sentences if phrases.get(k))} with a phrase) -> {args.out}")


if __name__ == "__main__":
    main()
