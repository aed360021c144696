"""`vmafs boot`: a backup booted in throwaway overlays (qemuconf.py: the pure command line)."""
