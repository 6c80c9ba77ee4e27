"""A single-process AdaGC that follows the official Megatron patch's semantics literally.

Written from the description of lishuai-97/AdaGC ``megatron-gpt2.patch`` (docs/internals/algorithms.md):
Python control flow per tensor, full (unsharded) fp32 gradients, a dict of gammas keyed by name, the step counter incremented first, the global clip during warmup, the running minimum, and the
EMA of the clipped per-tensor norm. It is the oracle; the package's vectorised version must agree.
"""

from __future__ import annotations

import math

import torch


class AdaGCReference:
    def __init__(self, *, mode="adagc", clip_ratio=1.04, beta=0.99, warmup_steps=100, max_grad_norm=1.0, eps=1e-6):
        self.mode, self.ratio, self.beta = mode, clip_ratio, beta
        self.start, self.max_norm, self.eps = warmup_steps, max_grad_norm, eps
        self.steps = 0
        self.gamma: dict[str, float] = {}

    def __call__(self, grads: dict[str, torch.Tensor]) -> float:
        """Clip ``grads`` (full tensors) in place; return the pre-clip global norm."""
        self.steps += 1
        total = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads.values()))
        if self.mode == "adagc-global":
            return self._global(grads, total)
        if self.steps <= self.start:
            coef = self.max_norm / (total + self.eps)
            if coef < 1:
                for g in grads.values():
                    g.mul_(coef)
            for name, g in grads.items():
                n = float(g.double().norm())
                self.gamma[name] = n if name not in self.gamma else min(self.gamma[name], n)
            return total
        for name, g in grads.items():
            n = float(g.double().norm())
            limit = self.ratio * self.gamma[name]
            if n > limit:
                g.mul_(limit / (n + self.eps))
                n = limit
            self.gamma[name] = self.beta * self.gamma[name] + (1 - self.beta) * n
        return total

    def _global(self, grads, total):
        if self.steps <= self.start:
            coef = self.max_norm / (total + self.eps)
            if coef < 1:
                for g in grads.values():
                    g.mul_(coef)
            value = min(total, self.max_norm)
            self.gamma["__global__"] = value if "__global__" not in self.gamma else min(self.gamma["__global__"], value)
            return total
        gamma = self.gamma["__global__"]
        n = total
        if total > self.ratio * gamma:
            coef = self.ratio * gamma / (total + self.eps)
            for g in grads.values():
                g.mul_(coef)
            n = self.ratio * gamma
        self.gamma["__global__"] = self.beta * gamma + (1 - self.beta) * n
        return total
