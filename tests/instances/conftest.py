from tests.boot.conftest import busybox_ext4, busybox_tree, system_files

__all__ = ["busybox_ext4", "busybox_tree", "system_files"]
