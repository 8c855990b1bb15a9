"""The classification input pipeline (import path of train, evaluate, study and the tests).

Sources live in toppax.data.sources, the host-side crops in toppax.data.transforms and the grain
pipelines (sampler, worker processes, prefetch) in toppax.data.loader; docs/data.md describes
them and their speed.
"""
__all__ = ["Batches", "CachedSource", "DatasetNotFoundError", "DigitsSource", "FolderSource",
           "IMAGE_EXTENSIONS", "TfdsSource", "TrainPlan", "center_crop", "epoch_permutation",
           "eval_batches", "eval_plan", "make_source", "preprocess_train", "random_resized_crop",
           "sample_crop", "train_batches", "train_indices"]

from toppax.data.loader import (Batches, TrainPlan, epoch_permutation, eval_batches,  # noqa: F401
                                eval_plan, train_batches, train_indices)
from toppax.data.sources import (IMAGE_EXTENSIONS, CachedSource, DatasetNotFoundError,  # noqa: F401
                                 DigitsSource, FolderSource, TfdsSource, make_source)
from toppax.data.transforms import (center_crop, preprocess_train,  # noqa: F401
                                    random_resized_crop, sample_crop)
