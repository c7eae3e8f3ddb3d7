"""Images built from distribution packages: `--packages` roots and `vmrun image build` disks."""
