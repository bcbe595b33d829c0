"""Volumes: ext4 disks that outlive instances (see README.md)."""
