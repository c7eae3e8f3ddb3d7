"""Running matrices and test shards on clusters: Dask and Slurm engines."""
