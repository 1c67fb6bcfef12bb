"""Pre-tokenized training data: beton format, pretokenize, the digits cache and the FFCV loader."""
from .datasets import ensure_dataset, resolve_cache_dir
from .format import BetonError, read_summary, verify_beton
from .loader import TrainLoader, build_train_loader
from .locking import OutputLockedError
from .pretokenize import Coordinator, PretokenizeOptions, pretokenize
from .sources import DigitsSource, EmptySourceError, ImageFolderSource

__all__ = ["BetonError", "Coordinator", "DigitsSource", "EmptySourceError", "ImageFolderSource",
           "OutputLockedError", "PretokenizeOptions", "TrainLoader", "build_train_loader", "ensure_dataset",
           "pretokenize", "read_summary", "resolve_cache_dir", "verify_beton"]
