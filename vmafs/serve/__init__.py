"""Front ends over the serving session: the NBD export (`vmafs serve`), and the process
shell it shares with the mount."""
