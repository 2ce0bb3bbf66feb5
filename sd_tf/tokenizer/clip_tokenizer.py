"""CLIP's byte-level BPE tokenizer, which turns Stable Diffusion prompts into token ids.

It gives the same ids as OpenAI CLIP's tokenizer. A prompt is
1. cleaned: mojibake fixed by ftfy, HTML entities unescaped (twice), whitespace
   collapsed, lower-cased;
2. split into words, numbers (one digit each) and punctuation runs by CLIP's regex;
3. turned into bytes, each shown as one printable character, so that every word
   is a string over a 256-character alphabet;
4. merged by byte-pair encoding: the word starts as single characters, the last
   one marked with `</w>`, and the adjacent pair earliest in the merge list is
   joined, again and again, until no listed pair is left. Each piece is a token.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_SIZE = 49408
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
START_TOKEN_ID = 49406
END_TOKEN_ID = 49407
MAX_LENGTH = 77
WORD_END = "</w>"

SHIPPED_MERGES_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# The shipped file lists more merges than CLIP uses: CLIP keeps those that fill
# the vocabulary after the 256 byte characters, the same with `</w>`, and the
# two special tokens.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
MERGES_HEADER = "#version: 0.2"

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise a prompt as CLIP does: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character: printable Latin-1 bytes to themselves, the others,
    in order, to chr(256), chr(257), ...

    The order of the dict (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + k) for k, byte in enumerate(others)})
    return mapping


def read_shipped_merges() -> list[tuple[str, str]]:
    """The merges CLIP uses, in rank order, from the shipped gz file (its first line is a header)."""
    with gzip.open(SHIPPED_MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id map: byte characters, the same with `</w>`, one token per merge, start and end tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(char + WORD_END for char in chars), *("".join(pair) for pair in merges), START_TOKEN, END_TOKEN]
    return {token: token_id for token_id, token in enumerate(tokens)}


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Join every occurrence of `pair` in `symbols`, scanning left to right without overlaps."""
    merged = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} if there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class CLIPTokenizer:
    """CLIP BPE tokenizer: prompts to fixed-length rows of token ids for the text encoder.

    Attributes: `start_token_id`, `end_token_id`, `pad_token_id` (padding after the end token),
    `max_length` (row length) and `vocab_size`.
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        pad_token: str = END_TOKEN,
        max_length: int = MAX_LENGTH,
    ):
        """Use `vocab` (token -> id) and `merges` (in rank order), or, if both are None, CLIP's shipped ones."""
        if (vocab is None) != (merges is None):
            raise ValueError("Give both vocab and merges, or neither.")
        if merges is None:
            merges = read_shipped_merges()
            vocab = vocab_from_merges(merges)
        self._encoder = dict(vocab)
        self._decoder = {token_id: token for token, token_id in self._encoder.items()}
        self._merges = [tuple(pair) for pair in merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {char: byte for byte, char in self._byte_encoder.items()}
        self._cache: dict[str, tuple[str, ...]] = {}
        self.start_token_id = self._encoder[START_TOKEN]
        self.end_token_id = self._encoder[END_TOKEN]
        self.pad_token_id = self._encoder[pad_token]
        self.max_length = max_length
        self.vocab_size = len(self._encoder)
        # Added tokens (textual inversion): cleaned text -> id, and the text as given.
        self._added: dict[str, int] = {}
        self._added_content: dict[int, str] = {}
        self._added_split = None

    def add_token(self, token: str, token_id: int | None = None) -> int:
        """Make `token` one indivisible token (e.g. a textual-inversion placeholder); returns its id.

        The new id is the next free one (`vocab_size` before the call). encode() finds the token
        anywhere in the cleaned (lower-cased) text before splitting words, as transformers does for
        added tokens; save_pretrained() writes it as an added token, which transformers' CLIPTokenizer
        and from_pretrained() load. A token that is already in the vocabulary is refused.
        """
        key = clean_text(token)
        if not key or " " in key:
            raise ValueError(f"an added token must be one non-empty word, not {token!r}")
        if key in self._encoder:
            raise ValueError(f"{token!r} is already a token of the vocabulary; pick another (e.g. <{key}>)")
        token_id = max(self._decoder) + 1 if token_id is None else int(token_id)
        if token_id in self._decoder:
            raise ValueError(f"token id {token_id} is taken by {self._decoder[token_id]!r}")
        self._encoder[key] = token_id
        self._decoder[token_id] = key
        self._added[key] = token_id
        self._added_content[token_id] = token
        self._added_split = regex.compile(
            "(" + "|".join(regex.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")"
        )
        self.vocab_size = len(self._encoder)
        return token_id

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added tokens as given to add_token() -> their ids."""
        return {content: token_id for token_id, content in self._added_content.items()}

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """Load a transformers/diffusers `tokenizer/` folder.

        Reads vocab.json and merges.txt, else tokenizer.json, if present (else uses the shipped
        vocabulary), the pad token
        from special_tokens_map.json or else tokenizer_config.json, and `model_max_length` from
        tokenizer_config.json.
        """
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if vocab_file.exists() != merges_file.exists():
            raise FileNotFoundError(f"{folder} has only one of vocab.json and merges.txt.")
        vocab = merges = None
        if vocab_file.exists():
            vocab = _read_json(vocab_file)
            lines = merges_file.read_text(encoding="utf-8").split("\n")
            if lines[0].startswith("#version"):
                lines = lines[1:]
            merges = [tuple(line.split()) for line in lines if line.strip()]
        elif (folder / "tokenizer.json").exists():  # transformers >= 5 saves only the fast tokenizer file
            model = _read_json(folder / "tokenizer.json")["model"]
            vocab = model["vocab"]
            merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split()) for pair in model["merges"]]

        config = _read_json(folder / "tokenizer_config.json")
        pad_token = _read_json(folder / "special_tokens_map.json").get("pad_token") or config.get("pad_token")
        if isinstance(pad_token, dict):
            pad_token = pad_token["content"]
        tokenizer = cls(
            vocab,
            merges,
            pad_token=pad_token or END_TOKEN,
            max_length=int(config.get("model_max_length", MAX_LENGTH)),
        )
        # Added tokens beyond the vocabulary: tokenizer_config.json's added_tokens_decoder, else
        # added_tokens.json, else tokenizer.json's added_tokens.
        added = {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
        added = added or {int(i): content for content, i in _read_json(folder / "added_tokens.json").items()}
        if not added and (folder / "tokenizer.json").exists():
            added = {int(entry["id"]): entry["content"] for entry in _read_json(folder / "tokenizer.json").get("added_tokens", [])}
        for token_id, content in sorted(added.items()):
            if content not in tokenizer._encoder and clean_text(content) not in tokenizer._encoder:
                tokenizer.add_token(content, token_id)
        return tokenizer

    def save_pretrained(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json as transformers does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "vocab.json", {t: i for t, i in self._encoder.items() if t not in self._added})
        merges_lines = [MERGES_HEADER, *(" ".join(pair) for pair in self._merges)]
        (folder / "merges.txt").write_text("\n".join(merges_lines) + "\n", encoding="utf-8", newline="\n")
        special_tokens = {
            "bos_token": START_TOKEN,
            "eos_token": END_TOKEN,
            "unk_token": END_TOKEN,
            "pad_token": self._decoder[self.pad_token_id],
        }
        _write_json(folder / "special_tokens_map.json", special_tokens)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special_tokens}
        if self._added_content:
            config["added_tokens_decoder"] = {
                str(token_id): {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                                "single_word": False, "special": False}
                for token_id, content in sorted(self._added_content.items())
            }
            _write_json(folder / "added_tokens.json", self.added_tokens)
        _write_json(folder / "tokenizer_config.json", config)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Split a byte-encoded word into vocabulary tokens by applying the merges."""
        if word not in self._cache:
            symbols = [*word[:-1], word[-1] + WORD_END]
            while len(symbols) > 1:
                best = min(zip(symbols, symbols[1:]), key=lambda pair: self._ranks.get(pair, math.inf))
                if best not in self._ranks:
                    break
                symbols = _merge_pair(symbols, best)
            self._cache[word] = tuple(symbols)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start and end tokens."""
        ids = []
        text = clean_text(text)
        segments = self._added_split.split(text) if self._added_split else [text]
        for segment in segments:
            if segment in self._added:
                ids.append(self._added[segment])
                continue
            for piece in _SPLIT.findall(segment):
                if piece in (START_TOKEN, END_TOKEN):
                    ids.append(self._encoder[piece])
                    continue
                word = "".join(self._byte_encoder[byte] for byte in piece.encode("utf-8"))
                ids.extend(self._encoder[token] for token in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping start and end tokens; each `</w>` becomes a space, as in OpenAI's decoder."""
        specials = (self.start_token_id, self.end_token_id)
        pieces, run = [], []  # added tokens are text; runs of other tokens are byte-encoded
        for token_id in (int(i) for i in ids if i not in specials):
            if token_id in self._added_content:
                pieces += [self._decode_bytes(run), self._added_content[token_id] + " "]
                run = []
            else:
                run.append(self._decoder[token_id])
        return "".join(pieces + [self._decode_bytes(run)])

    def _decode_bytes(self, tokens: list[str]) -> str:
        data = bytes(self._byte_decoder[char] for char in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(WORD_END, " ")

    def __call__(
        self, texts: str | Sequence[str], max_length: int | None = None, pad_token_id: int | None = None
    ) -> np.ndarray:
        """Int32 ids of shape (len(texts), max_length); each row is start token, ids, end token, padding.

        A text too long for the row is cut so that the row still ends with the end token, with a
        warning that shows the dropped part.
        """
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else max_length
        pad_token_id = self.pad_token_id if pad_token_id is None else pad_token_id
        rows = np.full((len(texts), max_length), pad_token_id, dtype=np.int32)
        room = max_length - 2
        for row, text in zip(rows, texts):
            ids = self.encode(text)
            if len(ids) > room:
                warnings.warn(
                    f"The following part of the prompt was truncated because CLIP can only handle "
                    f"sequences up to {max_length} tokens: {self.decode(ids[room:])!r}",
                    stacklevel=2,
                )
                ids = ids[:room]
            row[: len(ids) + 2] = [self.start_token_id, *ids, self.end_token_id]
        return rows
