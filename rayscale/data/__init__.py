"""Rows from a source to each worker's steps: the readers (sources.py), which rows a split holds and in what order
(splits.py), the driver's Ray Datasets (datasets.py, the layer's only Ray code), the same feed without Ray
(local_feed.py), the worker's step assembly (assembly.py) and collate (collate.py, its only torch code), and the
online feed's files (online.py). Every Ray Data read task imports this package: nothing here imports torch at
import time."""
