"""The FUSE view of an archive and its daemon."""
