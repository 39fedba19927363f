"""A policy wrapped so a test sees every decision the simulator asks of it (the policies are compiled classes,
whose methods cannot be replaced on an instance): choose() calls the policy, then `after(decision)`."""
from __future__ import annotations


class Watched:
    def __init__(self, policy, after):
        self.policy, self.after = policy, after

    def choose(self, request, instances):
        d = self.policy.choose(request, instances)
        self.after(d)
        return d

    def __getattr__(self, name):   # name, borrow_count ...: the policy's own
        return getattr(self.policy, name)
