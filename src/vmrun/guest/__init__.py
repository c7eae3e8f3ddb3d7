"""vmrun's own guest: the Debian kernel, busybox, the initramfs and the agent."""
