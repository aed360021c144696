"""Pure codecs: VMA, the trailing index, the zstd seek table, NBD, names. No I/O."""
