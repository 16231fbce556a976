"""Instructions per request through one Shoal proxy, counted by valgrind's callgrind: a
figure neighbours on a shared machine cannot disturb (wrk's req/s moved by tens of per
cent here while other work ran; this moves by well under one).

The proxy (outbound, a port-mapped upstream to nginx through a static endpoint, no bus)
runs under callgrind twice, serving N1 and then N2 requests on one keep-alive
connection, and is stopped with SIGTERM; the difference of the two totals over N2 - N1
is the cost of one request, start-up and shutdown cancelled out. ``--baseline TREE``
measures another source tree the same way (``git archive <commit> | tar -x -C TREE``).

    python -m bench.instructions [--requests 200,2200] [--baseline TREE] [-- PROXY FLAGS]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.peers import SHOAL_NAMESPACE, UPSTREAM_SERVICE, start_upstream
from bench.procs import PeerUnavailable, ProcessGroup, wait_http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
# Python under callgrind starts some 50 times slower: a minute to answer its first request.
READY_TIMEOUT_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 300.0
REQUEST_TIMEOUT_SECONDS = 60.0
MAX_REQUESTS = 100_000
PATH = "/api/vote?choice=x"
_TOTAL = re.compile(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS")


def _count(procs: ProcessGroup, tree: Path, upstream: int, requests: int,
           flags: list[str], workdir: Path) -> int:
    local, admin = procs.free_port(), procs.free_port()
    out = workdir / f"callgrind.{tree.name}.{requests}"
    authority = f"{UPSTREAM_SERVICE}.{SHOAL_NAMESPACE}"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
            "-m", "shoal.proxy", "--no-bus", "--namespace", SHOAL_NAMESPACE,
            "--workload", "client", "--pod", "client-1",
            "--outbound-port", str(procs.free_port()), "--inbound-port", "0",
            "--admin-port", str(admin), "--upstream", f"{local}={authority}:{upstream}",
            "--static-endpoint", f"{authority}=127.0.0.1:{upstream}", *flags]
    managed = procs.start(f"proxy-{tree.name}-{requests}", argv,
                          env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    wait_http_ok([managed], local, READY_TIMEOUT_SECONDS)
    conn = http.client.HTTPConnection("127.0.0.1", local, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        for _ in range(requests):
            conn.request("GET", PATH)
            conn.getresponse().read()
    finally:
        conn.close()
    managed.popen.send_signal(signal.SIGTERM)
    managed.popen.wait(STOP_TIMEOUT_SECONDS)
    done = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True,
                          check=False, timeout=STOP_TIMEOUT_SECONDS)
    found = _TOTAL.search(done.stdout)
    if found is None:
        raise PeerUnavailable(f"no total in callgrind's output for {out}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="200,2200", help="N1,N2 (default 200,2200)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another source tree measured the same way")
    parser.add_argument("flags", nargs="*", help="extra proxy flags (after --)")
    args = parser.parse_args(argv)
    try:
        first, second = (int(n) for n in args.requests.split(","))
    except ValueError:
        parser.error(f"--requests wants N1,N2, not {args.requests!r}")
    if not 0 <= first < second <= MAX_REQUESTS:
        parser.error(f"--requests: 0 <= N1 < N2 <= {MAX_REQUESTS}")
    for program in ("valgrind", "callgrind_annotate", "nginx"):
        if shutil.which(program) is None and shutil.which(program, path="/usr/sbin") is None:
            print(f"cannot run: {program} is not installed", file=sys.stderr)
            return 1
    trees = [REPO_ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    with tempfile.TemporaryDirectory(prefix="shoal-instructions-") as tmp:
        workdir = Path(tmp)
        try:
            with ProcessGroup(workdir) as procs:
                upstream = start_upstream(procs, workdir, None, READY_TIMEOUT_SECONDS)
                per_request = {}
                for tree in trees:
                    low = _count(procs, tree, upstream, first, args.flags, workdir)
                    high = _count(procs, tree, upstream, second, args.flags, workdir)
                    per_request[tree] = (high - low) / (second - first)
                    print(f"{tree}: {per_request[tree]:,.0f} instructions/request",
                          flush=True)
        except PeerUnavailable as error:
            print(f"cannot run: {error}", file=sys.stderr)
            return 1
    if args.baseline is not None:
        ours, theirs = per_request[REPO_ROOT], per_request[trees[1]]
        print(f"this tree vs baseline: {ours - theirs:+,.0f} instructions/request "
              f"({ours / theirs - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
