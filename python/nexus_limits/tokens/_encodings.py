"""OpenAI's BPE encodings, built offline from the rank files shipped in ``data/``.

tiktoken normally downloads its rank files on first use; here nothing is ever
downloaded. Each file is checked against tiktoken's published sha256 when it is
loaded, then turned into a ``tiktoken.Encoding`` once per process.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import threading
from importlib import resources
from typing import Any, Dict, Optional, Tuple

__all__ = ["ENCODINGS", "encoding_for_model", "get_encoding"]

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# From tiktoken_ext/openai_public.py.
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def _harmony_specials() -> Dict[str, int]:
    named = {
        "<|startoftext|>": 199998,
        ENDOFTEXT: 199999,
        ENDOFPROMPT: 200018,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
    }
    reserved = {f"<|reserved_{i}|>": i for i in (200000, 200001, 200004, 200009, 200010, 200011)}
    reserved.update({f"<|reserved_{i}|>": i for i in range(200013, 201088) if i != 200018})
    return {**reserved, **named}


# name -> (rank file, tiktoken's published sha256 of it, pattern, special tokens)
ENCODINGS: Dict[str, Any] = {
    "r50k_base": (
        "r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        _R50K_PAT,
        {ENDOFTEXT: 50256},
    ),
    "p50k_base": (
        "p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
        _R50K_PAT,
        {ENDOFTEXT: 50256},
    ),
    "cl100k_base": (
        "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260, ENDOFPROMPT: 100276},
    ),
    "o200k_base": (
        "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
    "o200k_harmony": (
        "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        _harmony_specials(),
    ),
}

# Exact names first, then prefixes: tiktoken's own table (tiktoken/model.py).
_MODELS = {
    "gpt-5": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4o": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4-mini": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5-turbo": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "gpt-35-turbo": "cl100k_base",
    "davinci-002": "cl100k_base",
    "babbage-002": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-davinci-003": "p50k_base",
    "text-davinci-002": "p50k_base",
    "code-davinci-002": "p50k_base",
    "code-davinci-001": "p50k_base",
    "code-cushman-002": "p50k_base",
    "code-cushman-001": "p50k_base",
    "text-davinci-001": "r50k_base",
    "text-curie-001": "r50k_base",
    "text-babbage-001": "r50k_base",
    "text-ada-001": "r50k_base",
    "davinci": "r50k_base",
    "curie": "r50k_base",
    "babbage": "r50k_base",
    "ada": "r50k_base",
}
_PREFIXES = [
    ("gpt-5", "o200k_base"),
    ("gpt-4.5-", "o200k_base"),
    ("gpt-4.1-", "o200k_base"),
    ("chatgpt-4o-", "o200k_base"),
    ("gpt-4o-", "o200k_base"),
    ("o1-", "o200k_base"),
    ("o3-", "o200k_base"),
    ("o4-mini-", "o200k_base"),
    ("gpt-oss-", "o200k_harmony"),
    ("ft:gpt-4o", "o200k_base"),
    ("ft:gpt-4", "cl100k_base"),
    ("ft:gpt-3.5-turbo", "cl100k_base"),
    ("ft:davinci-002", "cl100k_base"),
    ("ft:babbage-002", "cl100k_base"),
    ("gpt-4-", "cl100k_base"),
    ("gpt-3.5-turbo-", "cl100k_base"),
    ("gpt-35-turbo-", "cl100k_base"),
    ("text-embedding-3-", "cl100k_base"),
]
# Provider prefixes that gateways put in front of model names ("openai/gpt-4o").
_PROVIDER = re.compile(r"^(?:openai|azure|azure_ai|openrouter/openai)/")


def encoding_for_model(model: Optional[str]) -> Optional[str]:
    """The encoding name of an OpenAI model, or None when it is not an OpenAI model we know."""
    if not model:
        return None
    name = _PROVIDER.sub("", model.strip().lower())
    if name in _MODELS:
        return _MODELS[name]
    for prefix, encoding in _PREFIXES:
        if name.startswith(prefix):
            return encoding
    return None


class EncodingFileError(RuntimeError):
    """A shipped rank file is missing or does not match tiktoken's published hash."""


_cache: Dict[str, Any] = {}
_ranks: Dict[str, Dict[bytes, int]] = {}
_lock = threading.Lock()


def _load_ranks(filename: str, sha256: str) -> Dict[bytes, int]:
    if filename in _ranks:
        return _ranks[filename]
    try:
        packed = resources.files(__package__).joinpath("data", filename + ".gz").read_bytes()
        raw = gzip.decompress(packed)
    except (OSError, EOFError) as error:
        raise EncodingFileError(
            f"the rank file {filename} shipped with nexus-limits cannot be read: {error}"
        ) from error
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise EncodingFileError(f"the rank file {filename} is corrupt: sha256 {digest}, expected {sha256}")
    ranks: Dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    _ranks[filename] = ranks
    return ranks


def get_encoding(name: str) -> Any:
    """The ``tiktoken.Encoding`` called ``name``, built once from the shipped files."""
    encoding = _cache.get(name)
    if encoding is not None:
        return encoding
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(sorted(ENCODINGS))}")
    try:
        import tiktoken
    except ImportError as error:  # pragma: no cover - tiktoken is installed with the tokens extra
        raise ImportError("exact OpenAI token counts need tiktoken: pip install 'nexus-limits[tokens]'") from error
    with _lock:
        if name not in _cache:
            filename, sha256, pattern, specials = ENCODINGS[name]
            _cache[name] = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=_load_ranks(filename, sha256), special_tokens=specials
            )
    return _cache[name]


def warm_encodings(names: Tuple[str, ...] = ("o200k_base", "cl100k_base")) -> None:
    """Builds the encodings current models use (about a second each, once per process),
    so that no request pays for it; the LLM middleware calls it from a worker thread.
    Without tiktoken installed it does nothing."""
    try:
        for name in names:
            get_encoding(name)
    except ImportError:  # pragma: no cover - tiktoken is installed with the tokens extra
        pass
