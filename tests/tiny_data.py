"""A tiny local image–caption folder made by the test (the ``imagefolder`` layout: images + metadata.jsonl).

Image i is a flat colour that encodes i, and its caption names i, so a test can check that every latent
travels with its own caption."""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0)]


def colour_of(i: int) -> tuple[int, int, int]:
    return COLOURS[i % len(COLOURS)]


def make_image_caption_folder(path: Path, n: int = 6, size: tuple[int, int] = (48, 40)) -> Path:
    """``n`` flat-colour PNGs (width × height ``size``, not square: the loader crops) with captions."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", size, colour_of(i)).save(path / f"img{i:03d}.png")
        rows.append({"file_name": f"img{i:03d}.png", "text": f"a picture number {i}"})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_webdataset_shards(path: Path, n: int = 6, per_shard: int = 3) -> list[Path]:
    """The same pairs as ``make_image_caption_folder`` as webdataset .tar shards (key.png + key.txt)."""
    import io
    import tarfile

    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, per_shard):
        shard = path / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(shard, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                Image.new("RGB", (48, 40), colour_of(i)).save(buf, format="png")
                for ext, data in (("png", buf.getvalue()), ("txt", f"a picture number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards
