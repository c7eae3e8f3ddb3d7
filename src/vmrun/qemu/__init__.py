"""QEMU: the architecture table, argv, accelerators, firmware, processes and QMP."""
