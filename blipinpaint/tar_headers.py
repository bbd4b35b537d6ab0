"""A tar shard's member headers read without `tarfile`, for the common case only.

Listing a WebDataset source is reading its shards' headers: `tarfile` spends about 25 µs on
each (its header object, fields decoded one by one), which is most of a listing's time at
10^6 inputs. `plain_members` reads a plain archive (ustar or GNU headers of regular files
and folders, as img2dataset and Python's `tarfile` write them) in a few µs a member. It
gives up (None) on anything else: a pax or GNU long-name header, another member type, a
bad checksum, an archive that ends early or without its end blocks. `sources.scan_shard`
then reads the shard again with `tarfile`, which says exactly what is wrong.
"""

from __future__ import annotations

BLOCK = 512
ZERO = bytes(BLOCK)
CHUNK = 1 << 20
USTAR, GNU = b"ustar\x0000", b"ustar  \x00"


def _number(field: bytes) -> int | None:
    """An octal header number (None for base-256 or junk: not plain)."""
    if field[:1] in (b"\x80", b"\xff"):
        return None
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def plain_members(f, total: int | None, wanted) -> list[tuple[str, int, int, bytes | None]] | None:
    """(name, data offset, size, data or None) of each regular file of the tar stream `f` of
    `total` bytes, read start to end in chunks of `CHUNK`; the data of the members for which
    `wanted(name, size)` is true, None for the others. None: not a plain archive."""
    out = []
    buf, start, i = b"", 0, 0  # `buf` holds the stream's bytes from `start`; the next header is at `i`

    def fill(n: int) -> bool:
        nonlocal buf, start, i
        while len(buf) - i < n:
            chunk = f.read(CHUNK)
            if not chunk:
                return False
            buf, start, i = buf[i:] + chunk, start + i, 0
        return True

    while True:
        if not fill(BLOCK):
            return None
        header = buf[i:i + BLOCK]
        if header == ZERO:  # the end: tarfile's check that both end blocks are there
            end = start + i
            return out if end and (total is None or total >= end + 2 * BLOCK) else None
        magic, kind = header[257:265], header[156:157]
        recorded, size = _number(header[148:156]), _number(header[124:136])
        if magic not in (USTAR, GNU) or recorded is None or size is None or kind not in (b"0", b"\x00", b"5") \
                or recorded != 256 + sum(header[:148]) + sum(header[156:]):
            return None
        name = header[:100].split(b"\x00", 1)[0]
        prefix = header[345:500].split(b"\x00", 1)[0] if magic == USTAR else b""
        name = prefix + b"/" + name if prefix else name
        text = name.decode("utf-8", "backslashreplace")  # as `sources._text` spells a name
        regular = kind != b"5" and not name.endswith(b"/")
        if not regular and size:  # tarfile reads no data of a folder: not plain
            return None
        offset, padded = start + i + BLOCK, BLOCK + -(-size // BLOCK) * BLOCK
        if regular and wanted(text, size):
            if not fill(BLOCK + size):
                return None
            out.append((text, offset, size, buf[i + BLOCK:i + BLOCK + size]))
        elif regular:
            out.append((text, offset, size, None))
        if len(buf) - i >= padded:
            i += padded
            continue
        skip = padded - (len(buf) - i)  # past the end of what is read: read on and drop it
        start, buf, i = start + len(buf), b"", 0
        while skip:
            chunk = f.read(min(skip, CHUNK))
            if not chunk:
                return None
            skip -= len(chunk)
            start += len(chunk)
