"""How the backbone's CPU threads wait for work: set before torch loads its OpenMP runtime, so
every script imports this module before anything that imports torch.

By default an OpenMP thread that runs out of work spins for a while before it sleeps. On a
machine where other programs (or our own decoding workers) want the cores, the spinning
threads take the time those need, and one descheduled thread holds up every parallel region
of the network. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) ran the feature pass of a default
run 4x faster on a shared 2-core machine (bench/feature_threads.py, docs/benchmarks.md). A
value the user set is kept.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
