"""CLIP's byte-level BPE tokenizer, written for clipmlr; produces the same ids as openai/CLIP's `tokenize`.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` beside this module is OpenAI's, byte-identical (sha256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a); this copy comes from the `open-clip-torch`
wheel. Vocabulary: 256 byte symbols, the same with "</w>" (end of word), one symbol per merge (48,894 merges),
then <|startoftext|> = 49406 and <|endoftext|> = 49407.
"""
import functools
import gzip
import html
import os

import ftfy
import regex
import torch

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 48894
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# words, contractions, single letters/digits, runs of other symbols (the pattern of OpenAI's tokenizer)
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode():
    """A reversible map from the 256 byte values to printable unicode characters (no whitespace/control)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    # printable bytes map to themselves, the others to 256, 257, ...; the vocabulary keeps this order
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return chars


def clean(text):
    """ftfy repair, HTML unescape (twice, for double-escaped text), collapse whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    def __init__(self, path=VOCAB_PATH):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1:N_MERGES + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}

    def bpe(self, word):
        """Merges the symbols of one word, lowest-ranked pair first; returns space-separated symbols."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = " ".join(parts)
        return self.cache[word]

    def encode(self, text):
        """Text -> BPE ids, without the start/end tokens."""
        ids = []
        for word in WORD_PATTERN.findall(clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return text.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    return Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """A string or list of strings -> (B, context_length) int64 ids: [SOT] text [EOT] then zeros.

    Raises ValueError for a text longer than the context unless `truncate`, which keeps the first
    context_length tokens and makes the last one EOT.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    sot, eot = tok.encoder[SOT], tok.encoder[EOT]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text is {len(ids)} tokens long, over the context length of "
                                 f"{context_length}: {text[:80]!r}; shorten it or pass truncate=True")
            ids = ids[:context_length]
            ids[-1] = eot
        result[row, :len(ids)] = torch.tensor(ids)
    return result
