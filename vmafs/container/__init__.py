"""How an archive's VMA stream is stored: plain, seekable zstd, legacy streams; outputs."""
