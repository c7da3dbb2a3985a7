"""The Soft-RoCE lane: the rdma transport against a real verbs device, on a machine without one.

This machine can neither load kernel modules nor run KVM, but QEMU's software emulation (TCG)
boots Debian's 6.1 kernel, whose `rdma_rxe` module turns a dummy network device into a RoCE v2
device (`rxe0`) with a real /dev/infiniband/uverbs0. `image` builds (and caches outside the
repository) a minimal Debian guest for that; `lane` copies the current tree into it, boots it
and runs the rdma tests inside. Emulation makes every timing meaningless: this lane checks
behaviour only (`invoke test-rdma`).
"""
