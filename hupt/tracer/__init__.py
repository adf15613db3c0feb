"""Everything in hupt that talks to the kernel: one module per mechanism.

abi (numbers and layouts), libc (raw syscalls), bpf and seccomp (filters),
notify (the notify fd), spawn and subreaper (starting generations), pidfd,
procfs, sockdiag (socket tables), ptrace (the python-ptrace adapter), inject
(the tracee state machine), accepting (stop/start accepting, exec in place,
filter injection) and attach.
"""
