"""Tools around runs: `rayscale suggest` (suggest.py), `rayscale find-batch-size` (batch_size_finder.py), plots."""
