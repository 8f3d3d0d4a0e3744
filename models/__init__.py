"""The SEAMLeSS network: Siamese encoder, local correlation, per-level aligners, the pyramid, archives."""
from models.aligner import Aligner
from models.archive import load_archive, load_weights, read_archive, save_archive
from models.correlation import correlation_offsets, local_correlation
from models.encoder import Encoder, encoder_channels
from models.pyramid import Pyramid, PyramidOutput

__all__ = ["Aligner", "Encoder", "Pyramid", "PyramidOutput", "correlation_offsets", "encoder_channels",
           "load_archive", "load_weights", "local_correlation", "read_archive", "save_archive"]
