"""The directed weight perturbation the demo's DWA-shaped script imports as ``perterb``: written for
the demo from DWA's description (not DWA's code). An optimizer over the teacher's weights whose
``first_step`` moves every weight along the teacher's accumulated gradient, the whole step scaled
to length ``rho``, then (``zero_grad=True``) clears those gradients."""
import torch


class Perterb(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho))
        self.base_optimizer = base_optimizer

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
            for group in self.param_groups:
                scale = group["rho"] / (norm + 1e-12)
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad * scale)
        if zero_grad:
            self.zero_grad()
