"""Peak memory and CPU time of reading and decoding inputs that are small on disk but large in memory.

    .venv/bin/python bench/input_limits.py [--out bench/results/input_limits.json]

Each case runs in a fresh subprocess and reports the growth of its peak resident memory
(`VmHWM`, Linux) over what it held just before the call, and the call's CPU time (`ru_maxrss`
would not do: a child starts with its parent's peak):
- `png bomb`: a 0.34 MB PNG of 9400x9400 RGBA pixels (under Pillow's decompression-bomb
  limit), through the decoder at the tiny (64) and paper (512) working sizes;
- `large jpeg`: a 6000x4500 JPEG (a collage of the shipped photographs at their own
  resolution), through the decoder at 64 and 512;
- `parquet`: `read_files` with data.max_file_mb=4 on a row group holding a 40 MB cell, once
  in pyarrow's default layout (the cells in one dictionary page) and once finely paged (a
  page a cell, as parquet-mr and others write), each with 60 cells of 1 MB.
Run it on two commits to compare them; it uses only the public stage functions.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np
def peak_mb():  # this process image's own peak: ru_maxrss would start at the parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
case, path, arg = sys.argv[1:4]
if case == "decode":
    from blipinpaint.io import ImageDecoder
    data = open(path, "rb").read()
    batch = {"id": np.array(["x"], dtype=object), "bytes": np.array([data], dtype=object)}
    decoder = ImageDecoder(int(arg))
    call = lambda: decoder(batch)["error"][0]
else:
    from blipinpaint.source_reads import read_files
    from blipinpaint.sources import items_to_batch, list_inputs
    batch = items_to_batch(list_inputs(path, kind="parquet_images"))
    call = lambda: sorted({e.split(":")[0] for e in read_files(batch, max_mb=float(arg))["error"]})
before, cpu = peak_mb(), time.process_time()
outcome = call()
print(json.dumps({"peak_growth_mb": round(peak_mb() - before, 1), "cpu_s": round(time.process_time() - cpu, 2),
                  "outcome": outcome}))
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGBA PNG of transparent black: every row compresses to the same few bytes."""
    row = b"\x00" + bytes(4 * width)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def collage_jpeg(width: int, height: int) -> bytes:
    """A JPEG of the shipped photographs tiled at their own resolution (real detail at every scale)."""
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "blipinpaint" / "samples").glob("*.jpg"))]
    x = y = k = 0
    while y < height:
        tile = photos[k % len(photos)]
        canvas.paste(tile, (x, y))
        x += tile.width
        k += 1
        if x >= width:
            x, y = 0, y + max(p.height for p in photos)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def parquet_with_a_large_cell(path: Path, paged: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    cells = [rng.bytes(1 << 20) for _ in range(60)] + [rng.bytes(40 << 20)]
    layout = {"use_dictionary": False, "write_batch_size": 1, "data_page_size": 1} if paged else {}
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), path, **layout)


def run(case: str, path: Path, arg: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(path), arg], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bomb.png").write_bytes(png_bomb(9400, 9400))
        (tmp / "large.jpg").write_bytes(collage_jpeg(6000, 4500))
        parquet_with_a_large_cell(tmp / "default.parquet", paged=False)
        parquet_with_a_large_cell(tmp / "paged.parquet", paged=True)
        cases = [("png bomb, 64", "decode", "bomb.png", "64"), ("png bomb, 512", "decode", "bomb.png", "512"),
                 ("large jpeg, 64", "decode", "large.jpg", "64"), ("large jpeg, 512", "decode", "large.jpg", "512"),
                 ("parquet, default layout", "read", "default.parquet", "4"),
                 ("parquet, a page a cell", "read", "paged.parquet", "4")]
        for name, case, file, arg in cases:
            mb = round((tmp / file).stat().st_size / 2**20, 2)
            result = {"case": name, "file_mb": mb, **run(case, tmp / file, arg)}
            print(json.dumps(result))
            results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
