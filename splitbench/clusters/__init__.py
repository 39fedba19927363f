"""Clusters: hardware catalog, process launcher, router, scheduling policies, simulator."""
