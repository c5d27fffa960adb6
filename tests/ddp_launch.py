"""Start two CPU processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) for the DDP tests; torchrun's own agent process would add a third torch import."""
import os
import socket
import subprocess
import sys

# gloo failures that say nothing about the code under test, seen on loaded 2-core machines: a
# port taken between choosing it and binding it, and an abort of rank 0 while the process exits
# after its work is done (torch's TCPStore/gloo teardown). The launch is tried once more on a new port.
RENDEZVOUS_ERRORS = ("Address already in use", "DistNetworkError", "Connection reset", "Connection refused",
                     "Connection closed by peer", "terminate called without an active exception")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(argv, *, env=None, cwd=None, timeout=240, attempts=2):
    """Run `python argv...` as ranks 0 and 1; returns their outputs, or fails with both outputs."""
    for attempt in range(attempts):
        common = {**os.environ, **(env or {}), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, *map(str, argv)], env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                outputs.append(p.communicate()[0] + f"\n[killed after {timeout} s]")
        codes = [p.returncode for p in procs]
        if codes == [0, 0]:
            return outputs
        retry = attempt + 1 < attempts and any(e in o for o in outputs for e in RENDEZVOUS_ERRORS)
        if not retry:
            report = "\n".join(f"--- rank {r} (exit {c}) ---\n{o[-2500:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
            raise AssertionError(f"DDP ranks exited with {codes}\n{report}")
