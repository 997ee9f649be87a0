"""train.compile: each micro-batch's forward and loss through torch.compile; the rest of the step as it was.

What is compiled is `step.forward_and_loss`, one function, so the loss fuses with the model's last layer. The
backward runs the compiled graph's backward; accumulation, the loss normaliser, clipping, the non-finite skip
and the optimizer step are train_step's, unchanged. The module is not wrapped, so its state_dict (model.pt,
checkpoints) keeps its own keys, and validation runs it eagerly.

Micro-batches are not all one size: the partial last step, a rank's one zero-weight padding row, the halving of
batch.micro_batch_size auto, sequences padded to each micro-batch's longest. torch.compile's automatic dynamic
shapes (dynamic=None) compile the first size as it is and, the first time a dimension changes, once more with
that dimension symbolic; sizes 0 and 1 get graphs of their own (PyTorch specialises them). A run then compiles
a handful of graphs whatever its length, each counted in the log (`compiles`), and Dynamo's limit per function
(torch._dynamo.config.recompile_limit) caps anything worse: past it the function runs eagerly, with a warning.

Under DDP the model call inside the function is DDP's forward, which Dynamo does not trace: it runs eagerly, so
no_sync keeps working, and the module's own forward under it is compiled by Dynamo's DDPOptimizer, split at
DDP's gradient buckets so that a bucket's all-reduce starts while the rest of the backward runs.
"""

from __future__ import annotations

import torch

from rayscale.engine import tasks
from rayscale.engine.components import Component
from rayscale.engine.step import ForwardLoss, forward_and_loss

# Inductor's settings for the code it generates. On CPU its vectorised tanh calls Sleef's, which took 4-5x a
# plain exp here; in its exp form, 2 / (1 + exp(-2x)) - 1, the tanh GELU of GPT-style models took 0.50 ms forward
# and 0.77 ms backward against 1.56 and 1.53, and the benchmark transformer's compiled step went from 1.02-1.06x
# eager to 1.11-1.17x (docs/performance.md). The exp form is within 1.8e-7 of tanh over [-10, 10] (Sleef's: 6e-8),
# an absolute error: it rounds |x| < 4.5e-8 to 0, which is why PyTorch leaves it off by default (pytorch#148241:
# tanh fed to atan2). On a GPU it changes nothing (the setting is inductor's C++ backend's).
INDUCTOR_SETTINGS = {"cpp.use_decompose_tanh": True}
# ... and for a graph on the CPU, its wrapper (the code that calls the kernels and the matrix products in turn)
# in C++ instead of Python: the benchmark transformer's compiled step took 1-2 ms less of 44-46 ms (1.17x eager
# against 1.09-1.15x, side by side in one process; docs/performance.md), and its first steps compiled in half the
# time (one C++ module to build, not a Python one that loads another). A GPU graph keeps inductor's default.
CPU_SETTINGS = {**INDUCTOR_SETTINGS, "cpp_wrapper": True}


def on_cpu(example_inputs) -> bool:
    return all(not isinstance(value, torch.Tensor) or value.device.type == "cpu" for value in example_inputs)


def compiler(backend: str):
    """The torch.compile backend function that compiles a graph for `backend`."""
    compile_graph = torch._dynamo.lookup_backend(backend)
    if backend != "inductor":
        return compile_graph

    # The registered inductor backend hands its keywords to compile_fx, which applies config_patches to the
    # forward graph and to the backward one (compiled later, at the first backward).
    def compile_for_its_device(graph: torch.fx.GraphModule, example_inputs):
        settings = CPU_SETTINGS if on_cpu(example_inputs) else INDUCTOR_SETTINGS
        return compile_graph(graph, example_inputs, config_patches=settings)

    return compile_for_its_device


def backend_of(setting: bool | str) -> str | None:
    """train.compile's value as a torch.compile backend (None: eager)."""
    if setting is False:
        return None
    return "inductor" if setting is True else setting


class Compilation(Component):
    """The step's forward-and-loss function, compiled or eager, and how many graphs it has compiled."""

    logs = ("compiles",)

    def __init__(self, setting: bool | str):
        self.backend = backend_of(setting)
        self.graphs = 0  # compiled on this rank since the run (or this attempt) started
        if self.backend is None:
            self.forward_loss: ForwardLoss = forward_and_loss
            return
        # Compiled code is cached per function, and the limit counts every graph a process compiled for it: a
        # process that trained before (a notebook, the tests) would spend this run's limit on that run's shapes.
        torch.compiler.reset()
        torch.compiler.assume_constant_result(tasks.takes_attention_mask)  # marks the function itself
        compile_graph = compiler(self.backend)

        def counted(graph: torch.fx.GraphModule, example_inputs):
            self.graphs += 1
            return compile_graph(graph, example_inputs)

        self.forward_loss = torch.compile(forward_and_loss, backend=counted, dynamic=None)

    def describe(self) -> str:
        return f"forward and loss compiled ({self.backend}; the first steps of each new shape compile)"

    def log_fields(self, run, sums, steps):
        return {"compiles": self.graphs} if self.backend is not None else {}
