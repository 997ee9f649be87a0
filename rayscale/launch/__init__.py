"""The Ray layer: connecting to a cluster, checking the run fits it, building the TorchTrainer, the worker
function and its context, controller callbacks, the parameter-server actors. With data/datasets.py and tune/, the
only code that imports Ray."""
