"""colbertzero: SLURM-native training of multi-vector (ColBERT) retrieval models, the ColBERT-Zero way."""

__version__ = "0.1.0"
