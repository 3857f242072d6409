"""Multi-node runs in containers.

Outside the cluster, `python -m orchestrator` (launcher, images, supervisor) is the only part that
talks to Docker. Inside it, `orchestrator.coordinator` hosts the rendezvous store and follows the
run, and `orchestrator.node` starts one torchrun node per worker container.
"""
