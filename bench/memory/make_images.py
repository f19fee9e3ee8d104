#!/usr/bin/env python3
"""The two images of issue 12's memory reproduction, written without any imaging library:

  big16.png  8000 × 5000 (40 MP) 16-bit RGBA PNG, a few hundred KB (decodes to 320 MB)
  canvas.gif an ~40-byte GIF with an 8000 × 5000 logical screen (decodes to a 160 MB canvas)
  big16-b.png the same PNG with another colour (a second, distinct upload)

usage: make_images.py OUT_DIR
"""
import struct
import sys
import zlib
from pathlib import Path


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(path: Path, w: int, h: int, rgba16: tuple) -> None:
    row = b"\x00" + struct.pack(">4H", *rgba16) * w  # filter 0 + pixels
    comp = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(h):  # row by row: the generator never holds the 320 MB image
        idat += comp.compress(row)
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)  # 16-bit RGBA
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))


def gif_canvas(path: Path, w: int, h: int) -> None:
    # Logical screen w×h with a 2-colour table, one 1×1 frame (LZW: clear, 0, end).
    data = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\xff\x00\x00\x00\x00\xff"
    data += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b"\x3b"
    path.write_bytes(data)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    png16(out / "big16.png", 8000, 5000, (40000, 12000, 3000, 65535))
    png16(out / "big16-b.png", 8000, 5000, (3000, 40000, 12000, 65535))
    gif_canvas(out / "canvas.gif", 8000, 5000)
    for p in sorted(out.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")
