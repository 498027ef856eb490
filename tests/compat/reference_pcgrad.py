"""A plain reimplementation of Pytorch-PCGrad's ``PCGrad(optimizer)`` wrapper (its algorithm, as that
library runs it), the reference of tests/compat/test_pcgrad_wrapper.py and benchmarks/e2e_pcgrad.py."""

import copy
import random

import torch

__all__ = ["ReferencePCGrad"]


class ReferencePCGrad:
    """Pytorch-PCGrad's wrapper as that library writes it (per-element "shared" mask from the
    parameters each objective reaches; Python's random.shuffle of one list per objective)."""

    def __init__(self, optimizer, reduction="mean"):
        self._optim, self._reduction = optimizer, reduction

    def step(self):
        self._optim.step()

    def pc_backward(self, objectives):
        grads, has_grads, shapes = [], [], []
        for obj in objectives:
            self._optim.zero_grad(set_to_none=True)
            obj.backward(retain_graph=True)
            flat, has, shape = [], [], []
            for group in self._optim.param_groups:
                for p in group["params"]:
                    shape.append(p.shape)
                    if p.grad is None:
                        flat.append(torch.zeros_like(p).flatten())
                        has.append(torch.zeros_like(p).flatten())
                    else:
                        flat.append(p.grad.clone().flatten())
                        has.append(torch.ones_like(p).flatten())
            grads.append(torch.cat(flat))
            has_grads.append(torch.cat(has))
            shapes.append(shape)
        shared = torch.stack(has_grads).prod(0).bool()
        pc_grad = copy.deepcopy(grads)
        for g_i in pc_grad:
            random.shuffle(grads)
            for g_j in grads:
                g_i_g_j = torch.dot(g_i, g_j)
                if g_i_g_j < 0:
                    g_i -= g_i_g_j * g_j / (g_j.norm() ** 2)
        merged = torch.zeros_like(grads[0])
        stacked = torch.stack(pc_grad)
        merged[shared] = stacked[:, shared].mean(0) if self._reduction == "mean" else stacked[:, shared].sum(0)
        merged[~shared] = stacked[:, ~shared].sum(0)
        idx = 0
        for group in self._optim.param_groups:
            for p in group["params"]:
                p.grad = merged[idx : idx + p.numel()].view_as(p).clone()
                idx += p.numel()
