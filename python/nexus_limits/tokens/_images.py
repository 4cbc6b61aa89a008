"""Image sizes from data URLs (PNG, GIF, JPEG, WebP headers), and the providers' rules
that turn a size into tokens."""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Optional, Tuple

__all__ = ["anthropic_image_tokens", "image_size", "openai_image_tokens"]

# What an image of unknown size is taken to cost (documented in the README):
# OpenAI, detail high/auto: a 1024x1024 image -> 768x768 -> 4 tiles -> 765 tokens.
OPENAI_DEFAULT_IMAGE = 765
# Anthropic: the largest image it keeps unresized (about 1.15 megapixels) / 750.
ANTHROPIC_DEFAULT_IMAGE = 1600


def image_size(url: str) -> Optional[Tuple[int, int]]:
    """(width, height) of a ``data:image/...;base64,`` URL, or None when unknown."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        return None
    head = url.split(",", 1)[1][:65536]
    head = head[: len(head) // 4 * 4]
    try:
        data = base64.b64decode(head)
    except (binascii.Error, ValueError):
        return None
    return size_of_bytes(data)


def size_of_bytes(data: bytes) -> Optional[Tuple[int, int]]:
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except (struct.error, IndexError):
        return None
    return None


def openai_image_tokens(size: Optional[Tuple[int, int]], detail: str = "auto") -> Tuple[int, bool]:
    """OpenAI's tile rule: ``low`` costs 85; otherwise fit in 2048x2048, scale the short
    side down to 768, then 170 per 512-px tile plus 85. Returns (tokens, exact)."""
    if detail == "low":
        return 85, True
    if size is None:
        return OPENAI_DEFAULT_IMAGE, False
    w, h = float(size[0]), float(size[1])
    if w <= 0 or h <= 0:
        return OPENAI_DEFAULT_IMAGE, False
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 170 * tiles + 85, True


def anthropic_image_tokens(size: Optional[Tuple[int, int]]) -> int:
    """Anthropic's rule: about width x height / 750, after fitting the long edge in 1568 px."""
    if size is None or size[0] <= 0 or size[1] <= 0:
        return ANTHROPIC_DEFAULT_IMAGE
    w, h = float(size[0]), float(size[1])
    if max(w, h) > 1568:
        scale = 1568 / max(w, h)
        w, h = w * scale, h * scale
    return max(1, math.ceil(w * h / 750))
