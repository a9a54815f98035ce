"""OpenAI CLIP's byte-level BPE as a Hugging Face tokenizer folder, converted from the merges file.

OpenAI publishes its 49,408-token CLIP vocabulary only as a merges list,
``bpe_simple_vocab_16e6.txt.gz``, which the ``open-clip-torch`` wheel ships as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. Its ``SimpleTokenizer`` builds the vocabulary as:
the 256 byte characters of ``bytes_to_unicode`` (in that table's order), the same 256 with
``</w>``, one token per merge (lines 1 .. 48,894 of the file, the first line is a header),
then ``<|startoftext|>`` (49,406) and ``<|endoftext|>`` (49,407). :func:`write_tokenizer`
writes that vocabulary as ``vocab.json`` + ``merges.txt`` (``#version: 0.2`` header) with the
``tokenizer_config.json`` / ``special_tokens_map.json`` of the published
``openai/clip-vit-base-patch16`` folder, so ``AutoTokenizer.from_pretrained(DIR)`` and
``CLIPTokenizer.from_pretrained(DIR)`` load it offline and tokenize as that folder does.

Where the merges file comes from (:func:`load_merges_text`), first hit wins:

1. ``--bpe PATH``: an ``open-clip-torch`` wheel, or the ``.txt.gz`` / ``.txt`` itself;
2. the copy cached by an earlier call (``~/.cache/gckd_ray/clip_bpe/``);
3. an installed ``open_clip`` package (located without importing it: it imports torchvision);
4. ``pip download --no-deps`` of ``open-clip-torch`` at the version pinned in
   ``constraints.txt`` (PyPI), read with ``zipfile`` and never installed.

Installing ``open-clip-torch`` would pull torchvision, timm and ftfy into the environment for
one 1.3 MB data file, so the project does not depend on it. Whatever the source, the text must
have the sha256 of OpenAI's file (:data:`MERGES_SHA256`), else nothing is written.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gckd_ray.errors import InputError

MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
WHEEL_MEMBER = f"open_clip/{MERGES_NAME}"
PACKAGE = "open-clip-torch"
# sha256 of the decompressed merges text (identical in OpenAI's CLIP repository and open_clip).
MERGES_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
NUM_MERGES = 49152 - 256 - 2  # what SimpleTokenizer keeps: 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49,408
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
DEFAULT_CACHE = Path.home() / ".cache" / "gckd_ray" / "clip_bpe"


class BPESourceError(InputError):
    """The merges file could not be found, read, or is not OpenAI's."""

    kind = "data"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table (GPT-2's), in its own order:
    the printable Latin-1 bytes keep their character, the other 68 map to chr(256 + n)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, chars = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in chars)))


def parse_merges(text: str) -> list[str]:
    """The merges SimpleTokenizer uses: lines 1 .. NUM_MERGES (line 0 is a header)."""
    merges = text.split("\n")[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or not all(len(m.split(" ")) == 2 for m in merges):
        raise BPESourceError(f"merges text holds {len(merges)} well-formed merges, expected "
                             f"{NUM_MERGES}")
    return merges


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """token -> id exactly as OpenAI's SimpleTokenizer numbers them (49,408 entries)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise BPESourceError(f"vocabulary has {len(vocab)} distinct tokens, expected "
                             f"{VOCAB_SIZE}")
    return vocab


def _special(content: str) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "__type": "AddedToken"}


# As published with openai/clip-vit-base-patch16 (name_or_path aside).
TOKENIZER_CONFIG = {
    "unk_token": _special(EOS), "bos_token": _special(BOS), "eos_token": _special(EOS),
    "pad_token": EOS, "add_prefix_space": False, "errors": "replace", "do_lower_case": True,
    "model_max_length": 77, "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
}
SPECIAL_TOKENS_MAP = {
    "bos_token": {k: v for k, v in _special(BOS).items() if k != "__type"},
    "eos_token": {k: v for k, v in _special(EOS).items() if k != "__type"},
    "unk_token": {k: v for k, v in _special(EOS).items() if k != "__type"},
    "pad_token": EOS,
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


def write_tokenizer(directory: str | Path, merges_text: str) -> list[str]:
    """Write the CLIP tokenizer files into ``directory`` (created if missing).

    Args:
        directory: output folder.
        merges_text: the decompressed ``bpe_simple_vocab_16e6.txt`` (checked by sha256).
    Returns:
        The names of the files written (:data:`TOKENIZER_FILES`).
    """
    check_merges(merges_text)
    merges = parse_merges(merges_text)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False),
                                          encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                          encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    return list(TOKENIZER_FILES)


def check_merges(text: str, origin: str = "merges text") -> str:
    """``text`` if it is OpenAI's merges file, else BPESourceError naming ``origin``."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != MERGES_SHA256:
        raise BPESourceError(f"{origin}: not OpenAI's CLIP merges file (sha256 {digest[:12]}..., "
                             f"expected {MERGES_SHA256[:12]}...)")
    return text


def read_merges_file(path: str | Path) -> str:
    """The merges text from an open-clip-torch wheel (``.whl``), a ``.txt.gz`` or a ``.txt``."""
    path = Path(path)
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                raw = gzip.decompress(wheel.read(WHEEL_MEMBER))
        elif path.suffix == ".gz":
            raw = gzip.decompress(path.read_bytes())
        else:
            raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise BPESourceError(f"{path}: not found") from None
    except KeyError:
        raise BPESourceError(f"{path}: the wheel holds no {WHEEL_MEMBER}") from None
    except (OSError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as err:
        raise BPESourceError(f"{path}: unreadable ({err})") from None
    return check_merges(text, str(path))


def pinned_version(constraints: Path = CONSTRAINTS) -> str:
    """The ``open-clip-torch`` version pinned in constraints.txt (the one place pins live)."""
    try:
        text = constraints.read_text()
    except OSError as err:
        raise BPESourceError(f"{constraints}: unreadable ({err}); pass --bpe PATH") from None
    match = re.search(rf"^{re.escape(PACKAGE)}==(\S+)", text, flags=re.MULTILINE)
    if not match:
        raise BPESourceError(f"{constraints}: no {PACKAGE}==VERSION pin; pass --bpe PATH")
    return match.group(1)


def _installed_open_clip() -> Path | None:
    """The merges file of an installed open_clip, found without importing the package."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / MERGES_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(into: Path) -> Path:
    """``pip download --no-deps open-clip-torch==<pinned>`` into ``into``; the wheel's path."""
    requirement = f"{PACKAGE}=={pinned_version()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("open_clip_torch-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise BPESourceError(f"pip download {requirement} failed ({reason}); pass --bpe PATH "
                             "(an open-clip-torch wheel or bpe_simple_vocab_16e6.txt.gz)")
    return wheels[0]


def load_merges_text(path: str | Path | None = None, cache: str | Path | None = None,
                     log=print) -> str:
    """OpenAI's merges text, from ``path`` or else the sources in the module docstring.

    Args:
        path: a wheel, ``.txt.gz`` or ``.txt``; None searches cache, installed package, PyPI.
        cache: folder keeping the file between calls (default ~/.cache/gckd_ray/clip_bpe).
        log: called with one line when the file is downloaded.
    Returns:
        The decompressed text (sha256-checked).
    """
    if path:
        return read_merges_file(path)
    cache = Path(cache) if cache else DEFAULT_CACHE
    cached = cache / MERGES_NAME
    if cached.is_file():
        try:
            return read_merges_file(cached)
        except BPESourceError:
            pass  # a damaged cache copy is replaced below
    installed = _installed_open_clip()
    if installed is not None:
        return read_merges_file(installed)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"downloading {PACKAGE}=={pinned_version()} (no dependencies) for CLIP's BPE "
            f"merges file")
        wheel = _download_wheel(Path(tmp))
        text = read_merges_file(wheel)
        part = Path(tmp) / MERGES_NAME
        part.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
        os.replace(part, cached)
    return text
