"""colbertzero: SLURM-native training of multi-vector (ColBERT) retrieval models, the ColBERT-Zero way.

The Python API is the CLI's own objects (docs/python-api.md)::

    import colbertzero
    run = colbertzero.launch("recipes/colbert-zero.yaml", run_dir="/scratch/me/cz", executor="slurm")
    run.status(); run.wait(); run.report(); run.exports
    run = colbertzero.resume("/scratch/me/cz")
"""

__version__ = "0.1.0"
__all__ = ["Run", "launch", "resume"]


def __getattr__(name: str):
    # Imported on first use, not with the package: a training rank imports colbertzero.train.* and must not load the
    # launcher (submitit, sbatch generation) along with it.
    if name in __all__:
        from .launcher import api

        return getattr(api, name)
    raise AttributeError(f"module 'colbertzero' has no attribute {name!r}")
