"""The driver's side of a run that needs no Ray: every check before a cluster is touched (prepare.py) and the
run directory's outputs after training (outputs.py)."""
