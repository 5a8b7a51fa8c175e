"""The student MTT unrolls, imported as ``reparam_module`` as MTT's ``distill.py`` imports its own
(written for the demo, not MTT's code): a module's parameters as one flat vector, and a forward
that runs the module with views of a given flat vector, so that a whole training trajectory of
the student is one differentiable graph of its flat parameters."""
import math

import torch
from torch import nn


class ReparamModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self._names = [name for name, _ in module.named_parameters()]
        self._shapes = [p.shape for p in module.parameters()]
        self.flat_param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))

    def forward(self, *inputs, flat_param=None):
        flat_param = self.flat_param if flat_param is None else flat_param
        params, start = {}, 0
        for name, shape in zip(self._names, self._shapes):
            n = math.prod(shape)
            params[name] = flat_param[start:start + n].view(shape)
            start += n
        return torch.func.functional_call(self.module, params, inputs)
