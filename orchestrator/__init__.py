"""Multi-node runs in containers.

Outside the cluster, `python -m orchestrator` (launcher, images, supervisor; `across` for a run
over several machines, `testbed` to emulate them on one) is the only part that talks to Docker.
Inside it, `orchestrator.coordinator` hosts the rendezvous store (behind `orchestrator.gate`
across machines) and follows the run, and `orchestrator.node` starts one torchrun node per worker
container.
"""
