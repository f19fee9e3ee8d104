#!/usr/bin/env python3
"""Write a small copy of a CUB-200-2011-layout dataset for the GPU check (scripts/gpu-check.sh).

Why: the device tool carries at most 64 MiB (binaries and weights included), and the 100-class
CUB subset in ../shared is 66 MB. This keeps every class (so the protocol halves, classes 1-50
train / 51-100 test, are unchanged), the first PER_CLASS images of each, resized so the
shorter side is SIDE px (EfficientNet-Lite0's eval view resizes to 256 and centre-crops 224,
so 256 loses nothing the eval view sees), and writes the official layout (classes.txt,
images.txt, image_class_labels.txt, images/) into an uncompressed tar (the JPEGs are
compressed already).

    python3 scripts/cub-mini.py SRC_ROOT OUT.tar [--per-class 20] [--side 256]
"""
import argparse
import io
import os
import sys
import tarfile
from collections import defaultdict

from PIL import Image


def read_pairs(path):
    with open(path) as f:
        return [line.split(maxsplit=1) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="CUB root (classes.txt, images.txt, image_class_labels.txt, images/)")
    ap.add_argument("out", help="tar file to write")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args()
    for name in ("classes.txt", "images.txt", "image_class_labels.txt"):
        if not os.path.isfile(os.path.join(a.src, name)):
            sys.exit(f"error: {a.src} lacks {name}: not the CUB-200-2011 layout")
    images = {i: p.strip() for i, p in read_pairs(os.path.join(a.src, "images.txt"))}
    labels = {i: c.strip() for i, c in read_pairs(os.path.join(a.src, "image_class_labels.txt"))}
    by_class = defaultdict(list)
    for i in sorted(images, key=int):
        by_class[labels[i]].append(i)
    keep = [i for c in sorted(by_class, key=int) for i in by_class[c][: a.per_class]]

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo("CUB_200_2011/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        with open(os.path.join(a.src, "classes.txt"), "rb") as f:
            add("classes.txt", f.read())
        add("images.txt", "".join(f"{i} {images[i]}\n" for i in keep).encode())
        add("image_class_labels.txt", "".join(f"{i} {labels[i]}\n" for i in keep).encode())
        for i in keep:
            im = Image.open(os.path.join(a.src, "images", images[i])).convert("RGB")
            w, h = im.size
            s = a.side / min(w, h)
            if s < 1:
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=a.quality)
            add("images/" + images[i], buf.getvalue())
    os.replace(tmp, a.out)
    print(f"{a.out}: {len(keep)} images of {len(by_class)} classes, "
          f"{os.path.getsize(a.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
