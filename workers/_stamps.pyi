# Types of the C module built from workers/_stamps.c (see its header for the formats).

#: Bytes of one record in ``records`` (context._STAMP_RECORD packs them).
RECORD_SIZE: int

def unchanged(paths: bytes, records: bytes, threads: int, /) -> bool:
    """Whether every remembered path's lstat still has its stamp."""
