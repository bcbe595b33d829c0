"""Instance fixtures: the shared system dir, a busybox root image, the QEMU backend."""

from tests.support.guest import accel_cache_dir, busybox_ext4, busybox_tree, hypervisor, system_files

__all__ = ["accel_cache_dir", "busybox_ext4", "busybox_tree", "hypervisor", "system_files"]
