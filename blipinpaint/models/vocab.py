"""Tokenizer files written offline for the random-init presets.

Real checkpoints ship their tokenizers; the offline presets need tokenizers of the same
kinds (BLIP: BERT WordPiece with a `[DEC]` decoder-start token; CLIP: byte-level BPE) so
that they load through the same `from_pretrained` code. The vocabularies are small but
made of real words, so a random-init captioner still emits readable token strings.
"""

from __future__ import annotations

import json
from pathlib import Path

# Caption-like words: what BLIP's decoder picks from in the offline presets.
CAPTION_WORDS = """
a an the of on in with and at by near under over next to its two three some
man woman person people child boy girl dog cat bird horse cow sheep bear elephant
car bus train truck boat plane bicycle motorcycle street road sign stop light
table chair bed couch room kitchen window door wall floor house building city
tree grass field sky cloud water beach ocean river mountain snow park garden
plate food pizza cake cup coffee bowl fruit banana apple sandwich
sitting standing walking riding holding eating looking flying lying parked
large small white black red blue green yellow brown old young tall
photo picture view front back top side background rocket space astronaut flower
""".split()

BLIP_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def write_wordpiece_vocab(directory: Path) -> Path:
    """Write a BERT `vocab.txt` (special tokens first, `[PAD]` = 0 as in BLIP)."""
    words = list(dict.fromkeys(CAPTION_WORDS))  # keep order, drop repeats
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [f"##{c}" for c in letters]  # lets WordPiece spell any lowercase word
    path = Path(directory) / "vocab.txt"
    path.write_text("\n".join(BLIP_SPECIAL_TOKENS + letters + pieces + words) + "\n")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_bpe(directory: Path) -> tuple[Path, Path]:
    """Write a byte-level BPE `vocab.json` + `merges.txt` in CLIP's layout.

    256 byte symbols, their end-of-word forms, merges that build a few caption words,
    then `<|startoftext|>` and `<|endoftext|>` last, as in CLIP's own vocabulary.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in dict.fromkeys(CAPTION_WORDS[:60]):
        # Merge left to right: "c a", "ca t</w>" -> "cat</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    directory = Path(directory)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path
