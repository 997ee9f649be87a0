"""train.strategy: how the workers' gradients become one update. `ddp` all-reduces them and every worker steps
its own copy (ddp.py); `parameter_server` pushes them to server processes that hold the weights and the
optimizer (parameter_server.py, the servers' arithmetic in ps_shards.py; the servers themselves are Ray actors,
launch/ps_actors.py). Both are components, so they also add their keys to the log line."""
