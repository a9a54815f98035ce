"""Caption tokenizers: a small word-level vocabulary built from the captions, or CLIP's BPE.

Both produce the same layout, which the text tower relies on::

    [bos] tok ... tok [eos] [pad] ... [pad]      attention_mask 1 up to and including eos

A caption longer than ``length`` keeps its first ``length - 2`` tokens and still ends in eos
(the text tower pools at the first eos), and is counted so callers can report truncation.

Special ids of :class:`WordTokenizer`: ``<pad>=0 <bos>=1 <unk>=2 <eos>=3``. The eos id is
deliberately not 2: Hugging Face's ``CLIPTextTransformer`` treats a config with
``eos_token_id == 2`` as a legacy OpenAI checkpoint and pools at ``argmax(input_ids)`` (the
largest token id), which would be an arbitrary word here. With eos 3 it pools at the first eos.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

WORD_VOCAB_FILE = "word_vocab.json"
# GCKD's lexical bridge for a CLIP BPE tokenizer: {target-only word: source word}, applied as a
# whole-word rewrite before BPE (a word vocabulary keeps its aliases in word_vocab.json).
WORD_ALIASES_FILE = "word_aliases.json"
_WORD_FORMAT = "gckd_ray.word_tokenizer"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_CLIP_FILES = ("tokenizer.json", "vocab.json")
# Every file of a Hugging Face CLIP folder that its tokenizer reads (never the weights).
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                        "special_tokens_map.json", "added_tokens.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the code uses of a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, texts: Sequence[str], length: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns input_ids (N, length) int64, attention_mask (N, length) int64, #truncated."""
        ...

    def save(self, directory: str | Path) -> None:
        ...


def pack(token_lists: Sequence[Sequence[int]], length: int, *, bos_id: int, eos_id: int,
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lay out token lists (without specials) as ``[bos] tokens [eos] pad...``.

    Args:
        token_lists: N lists of token ids, no special tokens.
        length: sequence length L (>= 2).
    Returns:
        input_ids (N, L) int64, attention_mask (N, L) int64, number of truncated captions.
    """
    if length < 2:
        raise ValueError(f"text length must be >= 2 (bos + eos), got {length}")
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(token_lists), length), dtype=torch.int64)
    truncated = 0
    for row, tokens in enumerate(token_lists):
        if len(tokens) > length - 2:
            tokens = tokens[:length - 2]
            truncated += 1
        seq = [bos_id, *tokens, eos_id]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[row, :len(seq)] = 1
    return ids, mask, truncated


def split_words(text: str) -> list[str]:
    """Lowercase, then words/numbers and single punctuation marks: "A red-coat." ->
    ["a", "red", "-", "coat", "."]."""
    return _TOKEN_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer with a deterministic vocabulary built from captions.

    ``aliases`` (word -> vocabulary word) encode a word as another word's id: the lexical
    bridge (`gckd_ray.data.vocab_bridge`) that gives target-only synonyms a trained embedding.
    """

    SPECIALS = ("<pad>", "<bos>", "<unk>", "<eos>")
    pad_id, bos_id, unk_id, eos_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], aliases: Mapping[str, str] | None = None):
        """``words``: the non-special vocabulary in id order (ids start after the specials)."""
        self.words = list(words)
        clash = set(self.words) & set(self.SPECIALS)
        if clash or len(set(self.words)) != len(self.words):
            raise ValueError(f"word list has duplicates or special tokens: {sorted(clash)}")
        self._index = {w: i + len(self.SPECIALS) for i, w in enumerate(self.words)}
        self.aliases = dict(aliases or {})
        dangling = sorted(t for t in self.aliases.values()
                          if t not in self._index or t in self.aliases)
        if dangling:
            raise ValueError(f"aliases must point at vocabulary words that are not aliases "
                             f"themselves: {dangling}")
        for word, target in self.aliases.items():
            self._index[word] = self._index[target]

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1,
              aliases: Mapping[str, str] | None = None) -> "WordTokenizer":
        """Vocabulary of words seen at least ``min_count`` times, ordered by (-count, word)."""
        counts = Counter(w for caption in captions for w in split_words(caption))
        kept = [w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS]
        return cls(sorted(kept, key=lambda w: (-counts[w], w)), aliases)

    def token_ids(self, text: str) -> list[int]:
        return [self._index.get(w, self.unk_id) for w in split_words(text)]

    def encode(self, texts: Sequence[str], length: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """texts (N) -> input_ids (N, length), attention_mask (N, length), #truncated."""
        return pack([self.token_ids(t) for t in texts], length,
                    bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format": _WORD_FORMAT, "version": 1, "specials": list(self.SPECIALS),
                   "words": self.words, "aliases": self.aliases}
        (directory / WORD_VOCAB_FILE).write_text(json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "WordTokenizer":
        path = Path(directory) / WORD_VOCAB_FILE
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: word vocabulary not found") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != _WORD_FORMAT:
            raise ValueError(f"{path}: not a {_WORD_FORMAT} file")
        if payload.get("specials") != list(cls.SPECIALS):
            raise ValueError(f"{path}: special tokens {payload.get('specials')} differ from "
                             f"{list(cls.SPECIALS)}")
        words = payload.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}: 'words' must be a list of strings")
        aliases = payload.get("aliases", {})
        if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise ValueError(f"{path}: 'aliases' must map strings to strings")
        try:
            return cls(words, aliases)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


class CLIPBPETokenizer:
    """CLIP's byte-level BPE (``transformers.CLIPTokenizer``) from a local folder.

    The folder is a Hugging Face CLIP checkpoint or tokenizer folder; nothing is downloaded.
    Specials come from the tokenizer: OpenAI CLIP pads with ``<|endoftext|>`` (= eos), which is
    fine since the text tower pools at the *first* eos.
    """

    def __init__(self, directory: str | Path, aliases: Mapping[str, str] | None = None):
        from transformers import CLIPTokenizer  # heavy import, only when CLIP BPE is used

        self.directory = Path(directory)
        self.hf = CLIPTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        self.bos_id = int(self.hf.bos_token_id)
        self.eos_id = int(self.hf.eos_token_id)
        pad = self.hf.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)
        self.vocab_size = len(self.hf)
        aliases_file = self.directory / WORD_ALIASES_FILE
        if aliases is None and aliases_file.is_file():
            aliases = json.loads(aliases_file.read_text())
        self.aliases = {w.lower(): a for w, a in (aliases or {}).items()}
        self._alias_re = (re.compile(r"\b(" + "|".join(
            re.escape(w) for w in sorted(self.aliases, key=lambda w: (-len(w), w))) + r")\b",
            re.IGNORECASE) if self.aliases else None)

    def rewrite(self, text: str) -> str:
        """``text`` with every aliased whole word replaced by its alias (case-insensitive)."""
        if self._alias_re is None:
            return text
        return self._alias_re.sub(lambda m: self.aliases[m.group(0).lower()], text)

    def encode(self, texts: Sequence[str], length: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """texts (N) -> input_ids (N, length), attention_mask (N, length), #truncated."""
        if not texts:
            return pack([], length, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)
        # No truncation here: the full length is needed to count truncated captions.
        tokens = self.hf([self.rewrite(t) for t in texts], add_special_tokens=False,
                         truncation=False, verbose=False)["input_ids"]
        return pack(tokens, length, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        write_word_aliases(directory, self.aliases)


def write_word_aliases(directory: str | Path, aliases: Mapping[str, str]) -> None:
    """Save a CLIP tokenizer folder's lexical-bridge aliases (none: no file)."""
    if aliases:
        Path(directory, WORD_ALIASES_FILE).write_text(
            json.dumps(dict(aliases), indent=0, sort_keys=True) + "\n")


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the files of the tokenizer in ``source`` into ``destination`` and return their
    names: ``word_vocab.json``, or the `CLIP_TOKENIZER_FILES` a Hugging Face CLIP folder has and
    its ``word_aliases.json`` if any (never its weights or model config).

    Raises:
        FileNotFoundError: ``source`` holds no tokenizer.
    """
    import shutil

    source, destination = Path(source), Path(destination)
    if (source / WORD_VOCAB_FILE).is_file():
        names = [WORD_VOCAB_FILE]
    else:
        names = [n for n in (*CLIP_TOKENIZER_FILES, WORD_ALIASES_FILE) if (source / n).is_file()]
        if not any(n in names for n in _CLIP_FILES):
            raise FileNotFoundError(f"{source}: no tokenizer files (expected {WORD_VOCAB_FILE}, "
                                    f"or CLIP tokenizer files {' / '.join(_CLIP_FILES)})")
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, destination / name)
    return names


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in ``directory``: ``word_vocab.json`` -> WordTokenizer, CLIP
    tokenizer files (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) -> CLIPBPETokenizer."""
    directory = Path(directory)
    if (directory / WORD_VOCAB_FILE).is_file():
        return WordTokenizer.load(directory)
    if any((directory / name).is_file() for name in _CLIP_FILES):
        return CLIPBPETokenizer(directory)
    raise FileNotFoundError(f"{directory}: no tokenizer found (expected {WORD_VOCAB_FILE}, or "
                            f"CLIP tokenizer files {' / '.join(_CLIP_FILES)})")
