"""vmafs: back up QEMU VMs into Proxmox-compatible VMA archives and mount them."""

__version__ = "0.1.0"
