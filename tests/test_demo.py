"""The demo application without a mesh: its pure parts, then the real programs
(``python -m shoal.demo.<name>``) on loopback, driven with grpcio, curl, urllib and raw
sockets; the vote-bot against real web; web and the bot through a forward proxy given
by the environment (as ``shoal run`` will give them one); and the local launcher."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import IO

import grpc
import pytest

from shoal.demo.catalog import DOUGHNUT, EMOJI, VOTE_METHODS, vote_method
from shoal.demo.common import PROXY_VARIABLES
from shoal.demo.poll import DoughnutFailure, Poll, UnknownEmoji
from shoal.demo.proto import emoji_pb2, emoji_pb2_grpc, voting_pb2, voting_pb2_grpc
from shoal.demo.vote_bot import base_url, choose

from .demo_proxy import ForwardProxy

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 10.0
GRPC_TIMEOUT_SECONDS = 5.0


# ---- helpers -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """Ours without proxy settings (so only a test's own proxy applies) plus `extra`."""
    drop = {*PROXY_VARIABLES, "no_proxy", "NO_PROXY", "no_grpc_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(tmp: Path, module: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{module}-{time.monotonic_ns()}.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen([sys.executable, "-m", f"shoal.demo.{module}", *args],
                                 cwd=REPO, env=env or child_env(), stdin=subprocess.DEVNULL,
                                 stdout=sink, stderr=subprocess.STDOUT)
    return Proc(module, popen, log)


def wait_port(proc: Proc, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited early:\n{proc.output()}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{proc.name} did not listen on {port}:\n{proc.output()}")


def stop(proc: Proc) -> int:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
    try:
        return proc.popen.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()
        raise AssertionError(f"{proc.name} ignored SIGTERM:\n{proc.output()}") from None


def http_get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) for any HTTP answer; no proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def curl(url: str) -> tuple[int, bytes]:
    out = subprocess.run(["curl", "-sS", "--noproxy", "*", "-m", "10", "-o", "-",
                          "-w", "\n%{http_code}", url],
                         capture_output=True, timeout=HTTP_TIMEOUT_SECONDS + 5, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes, read until the server closes (every case here ends with a close)."""
    with socket.create_connection(("127.0.0.1", port), HTTP_TIMEOUT_SECONDS) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


@dataclass
class Demo:
    emoji_port: int
    voting_port: int
    web_port: int

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("demo")
    ports = Demo(free_port(), free_port(), free_port())
    procs = [start(tmp, "emoji", "--port", str(ports.emoji_port)),
             start(tmp, "voting", "--port", str(ports.voting_port))]
    procs.append(start(tmp, "web", "--port", str(ports.web_port),
                       env=child_env(EMOJISVC_HOST=f"127.0.0.1:{ports.emoji_port}",
                                     VOTINGSVC_HOST=f"127.0.0.1:{ports.voting_port}")))
    try:
        for proc, port in zip(procs, (ports.emoji_port, ports.voting_port, ports.web_port),
                              strict=True):
            wait_port(proc, port)
        yield ports
    finally:
        statuses = {proc.name: stop(proc) for proc in reversed(procs)}
    assert statuses == {"web": 0, "voting": 0, "emoji": 0}, statuses
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


# ---- pure parts ----------------------------------------------------------------------

def test_catalog_has_one_vote_rpc_per_emoji_in_voting_proto() -> None:
    service = voting_pb2.DESCRIPTOR.services_by_name["VotingService"]
    rpcs = {method.name for method in service.methods}
    assert rpcs == {*VOTE_METHODS.values(), "Results"}
    assert service.full_name == "emojivoto.v1.VotingService"
    assert emoji_pb2.DESCRIPTOR.services_by_name["EmojiService"].full_name == \
        "emojivoto.v1.EmojiService"
    assert DOUGHNUT in VOTE_METHODS and len(EMOJI) >= 30
    assert len({e.shortcode for e in EMOJI}) == len(EMOJI)


@pytest.mark.parametrize(("shortcode", "method"), [
    (":doughnut:", "VoteDoughnut"), (":point_up_2:", "VotePointUp2"),
    (":jack_o_lantern:", "VoteJackOLantern"), (":100:", "Vote100"),
    (":stuck_out_tongue_winking_eye:", "VoteStuckOutTongueWinkingEye"),
])
def test_vote_method_names_follow_emojivoto(shortcode: str, method: str) -> None:
    assert vote_method(shortcode) == method


def test_poll_counts_sorts_and_fails_the_doughnut() -> None:
    poll = Poll()
    assert poll.vote(":joy:") == 1
    poll.vote(":poop:")
    poll.vote(":poop:")
    poll.vote(":beer:")
    assert poll.results() == [(":poop:", 2), (":beer:", 1), (":joy:", 1)]
    with pytest.raises(DoughnutFailure, match="ERROR"):
        poll.vote(DOUGHNUT)
    with pytest.raises(UnknownEmoji):
        poll.vote(":not_an_emoji:")
    assert DOUGHNUT not in dict(poll.results())


def test_bot_choice_is_about_fifteen_percent_doughnut() -> None:
    codes = [e.shortcode for e in EMOJI]
    rng = random.Random(1)
    picks = [choose(rng, codes, 0.15) for _ in range(20_000)]
    share = picks.count(DOUGHNUT) / len(picks)
    assert 0.14 < share < 0.16, share
    assert set(picks) == set(codes)  # every other emoji gets votes too
    assert DOUGHNUT not in {choose(rng, codes, 0.0) for _ in range(2_000)}
    assert choose(rng, [DOUGHNUT], 0.0) == DOUGHNUT  # nothing else to pick


def test_bot_base_url() -> None:
    assert base_url("web.emojivoto:8080") == "http://web.emojivoto:8080"
    assert base_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"


# ---- the services, with real clients -------------------------------------------------

def test_emoji_list_all_and_find_by_shortcode(demo: Demo) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{demo.emoji_port}") as channel:
        stub = emoji_pb2_grpc.EmojiServiceStub(channel)
        reply = stub.ListAll(emoji_pb2.ListAllEmojiRequest(), timeout=GRPC_TIMEOUT_SECONDS)
        listed = [(e.shortcode, e.unicode) for e in reply.list]
        assert listed == [(e.shortcode, e.unicode) for e in EMOJI]
        assert (DOUGHNUT, "🍩") in listed
        found = stub.FindByShortcode(emoji_pb2.FindByShortcodeRequest(Shortcode=":rocket:"),
                                     timeout=GRPC_TIMEOUT_SECONDS)
        assert (found.Emoji.shortcode, found.Emoji.unicode) == (":rocket:", "🚀")
        missing = stub.FindByShortcode(emoji_pb2.FindByShortcodeRequest(Shortcode=":nope:"),
                                       timeout=GRPC_TIMEOUT_SECONDS)
        assert not missing.HasField("Emoji")


def test_voting_counts_and_fails_the_doughnut_with_unknown(demo: Demo) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{demo.voting_port}") as channel:
        stub = voting_pb2_grpc.VotingServiceStub(channel)
        for _ in range(3):
            stub.VoteTaco(voting_pb2.VoteRequest(), timeout=GRPC_TIMEOUT_SECONDS)
        with pytest.raises(grpc.RpcError) as failure:
            stub.VoteDoughnut(voting_pb2.VoteRequest(), timeout=GRPC_TIMEOUT_SECONDS)
        assert failure.value.code() == grpc.StatusCode.UNKNOWN
        assert failure.value.details() == "ERROR"
        results = stub.Results(voting_pb2.ResultsRequest(), timeout=GRPC_TIMEOUT_SECONDS)
        tallies = {r.Shortcode: r.Votes for r in results.results}
        assert tallies[":taco:"] == 3
        assert DOUGHNUT not in tallies
        votes = [r.Votes for r in results.results]
        assert votes == sorted(votes, reverse=True)


def test_web_vote_then_leaderboard_shows_it(demo: Demo) -> None:
    status, body = curl(f"{demo.web}/api/vote?choice=:rocket:")
    assert status == 200, body
    assert json.loads(body) == {"shortcode": ":rocket:", "unicode": "🚀"}
    curl(f"{demo.web}/api/vote?choice=%3Arocket%3A")  # URL-encoded, as the page sends it
    status, _, body = http_get(f"{demo.web}/api/leaderboard")
    assert status == 200
    board = json.loads(body)
    assert {"shortcode": ":rocket:", "unicode": "🚀", "votes": 2} in board


def test_web_doughnut_is_500_with_a_json_error(demo: Demo) -> None:
    status, content_type, body = http_get(f"{demo.web}/api/vote?choice=:doughnut:")
    assert status == 500
    assert content_type.startswith("application/json")
    error = json.loads(body)["error"]
    assert "VoteDoughnut" in error and "UNKNOWN" in error


@pytest.mark.parametrize("query", ["", "?choice=", "?choice=:nope:", "?choice=joy"])
def test_web_missing_or_unknown_choice_is_400(demo: Demo, query: str) -> None:
    status, content_type, body = http_get(f"{demo.web}/api/vote{query}")
    assert status == 400, body
    assert content_type.startswith("application/json")
    assert json.loads(body)["error"]


def test_web_list_and_page(demo: Demo) -> None:
    status, content_type, body = http_get(f"{demo.web}/api/list")
    assert status == 200 and content_type.startswith("application/json")
    assert [item["shortcode"] for item in json.loads(body)] == [e.shortcode for e in EMOJI]

    status, content_type, page = http_get(f"{demo.web}/")
    assert status == 200 and content_type.startswith("text/html")
    assert b'<script type="text/javascript" src="/js">' in page and b'id="main"' in page
    status, content_type, script = http_get(f"{demo.web}/js")
    assert status == 200 and content_type.startswith("text/javascript")
    assert b"emoji-grid" in script and b'"/api/list"' in script and b"/api/vote?choice=" in script
    status, _, page = http_get(f"{demo.web}/leaderboard")
    assert status == 200 and b'src="/js"' in page
    status, _, body = http_get(f"{demo.web}/no/such/page")
    assert status == 404 and json.loads(body)["error"]


def test_web_serves_concurrent_requests(demo: Demo) -> None:
    urls = [f"{demo.web}/api/list", f"{demo.web}/api/leaderboard",
            f"{demo.web}/api/vote?choice=:beer:"] * 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = [status for status, _, _ in pool.map(http_get, urls)]
    assert statuses == [200] * len(urls)


def test_web_answers_bad_http_with_4xx_and_survives(demo: Demo) -> None:
    assert raw_exchange(demo.web_port, b"NONSENSE\r\n\r\n").startswith(
        b"HTTP/1.1 400 Bad Request\r\n")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
    assert raw_exchange(demo.web_port, huge).startswith(b"HTTP/1.1 431 ")
    # two pipelined requests on one connection: both answered, in order
    both = raw_exchange(demo.web_port, b"GET /api/list HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"HEAD /js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert both.count(b"HTTP/1.1 200 OK") == 2
    assert both.index(b"application/json") < both.index(b"text/javascript")
    assert both.endswith(b"\r\n\r\n")  # HEAD: no body
    assert http_get(f"{demo.web}/api/list")[0] == 200


def test_bot_runs_n_rounds_against_real_web(demo: Demo, tmp_path: Path) -> None:
    proc = start(tmp_path, "vote_bot", "--count", "60", "--rate", "200", "--seed", "3",
                 env=child_env(WEB_HOST=f"127.0.0.1:{demo.web_port}"))
    assert proc.popen.wait(30) == 0, proc.output()
    tally = json.loads(proc.output().strip().splitlines()[-1])["vote_bot"]
    assert tally["rounds"] == 60 and tally["lists_ok"] == 60 and tally["errors"] == 0
    assert sum(tally["votes"].values()) == 60
    # every doughnut vote, and only those, failed with web's 500
    assert tally["votes"].get("500", 0) == tally["doughnut_votes"]
    assert 2 <= tally["doughnut_votes"] <= 20, tally  # 15% of 60 is 9


def test_bad_flags_and_busy_ports_are_clear_errors(demo: Demo, tmp_path: Path) -> None:
    bot = start(tmp_path, "vote_bot", "--rate", "0")
    assert bot.popen.wait(20) == 2
    assert "usage:" in bot.output() and "--rate" in bot.output()
    web = start(tmp_path, "web", "--emoji-addr", "nonsense")
    assert web.popen.wait(20) == 2 and "HOST:PORT" in web.output()
    busy = start(tmp_path, "emoji", "--port", str(demo.web_port))  # web holds it
    assert busy.popen.wait(20) == 1
    for proc in (bot, web, busy):
        assert "Traceback" not in proc.output(), proc.output()
    assert "cannot listen" in busy.output()


# ---- through a forward proxy, as the mesh will run them ------------------------------

def test_web_and_bot_use_the_proxy_from_the_environment(demo: Demo, tmp_path: Path) -> None:
    """web's grpcio honours grpc_proxy (CONNECT with the unresolved service name) and the
    bot's urllib honours http_proxy (absolute-form requests): names that only the proxy
    can resolve work end to end."""
    web_port = free_port()
    proxy = ForwardProxy({
        "emoji.emojivoto:8080": ("127.0.0.1", demo.emoji_port),
        "voting.emojivoto:8080": ("127.0.0.1", demo.voting_port),
        "web.emojivoto:8080": ("127.0.0.1", web_port),
    })
    web = start(tmp_path, "web", "--port", str(web_port),
                env=child_env(grpc_proxy=proxy.url, EMOJISVC_HOST="emoji.emojivoto:8080",
                              VOTINGSVC_HOST="voting.emojivoto:8080"))
    try:
        wait_port(web, web_port)
        bot = start(tmp_path, "vote_bot", "--count", "8", "--rate", "100", "--seed", "5",
                    env=child_env(http_proxy=proxy.url, WEB_HOST="web.emojivoto:8080"))
        assert bot.popen.wait(30) == 0, bot.output()
        tally = json.loads(bot.output().strip().splitlines()[-1])["vote_bot"]
        assert tally["lists_ok"] == 8 and tally["errors"] == 0, bot.output()
        assert tally["votes"].get("200", 0) == 8 - tally["doughnut_votes"]
    finally:
        assert stop(web) == 0
        proxy.close()
    seen = set(proxy.seen)
    assert ("CONNECT", "emoji.emojivoto:8080") in seen
    assert ("CONNECT", "voting.emojivoto:8080") in seen
    assert ("GET", "http://web.emojivoto:8080/api/list") in seen
    assert any(target.startswith("http://web.emojivoto:8080/api/vote?choice=")
               for method, target in seen if method == "GET")


# ---- the local launcher --------------------------------------------------------------

def _pump(stream: IO[bytes], lines: Queue[str]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace"))
    lines.put("")


def test_local_launcher_starts_everything_and_stops_cleanly() -> None:
    web_port = free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shoal.demo.local", "--web-port", str(web_port),
         "--bot-rate", "20"], cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: Queue[str] = Queue()
    threading.Thread(target=_pump, args=(launcher.stdout, lines), daemon=True).start()
    seen: list[str] = []

    def read_until(fragment: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            seen.append(line)
            if fragment in line:
                return
            if line == "":
                break
        raise AssertionError(f"no {fragment!r} in launcher output:\n{''.join(seen)}")

    try:
        read_until(f"emojivoto (unmeshed) at http://127.0.0.1:{web_port}", 40)
        pids = {line.split()[1]: int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
                for line in seen if line.split()[:1] == ["started"]}
        assert set(pids) == {"emoji", "voting-1", "voting-2", "web", "vote-bot"}
        assert http_get(f"http://127.0.0.1:{web_port}/api/list")[0] == 200
        deadline = time.monotonic() + 15
        board: list[object] = []
        while not board and time.monotonic() < deadline:  # the bot's votes arrive
            board = json.loads(http_get(f"http://127.0.0.1:{web_port}/api/leaderboard")[2])
            time.sleep(0.1)
        assert board, "the vote-bot's votes never reached the leaderboard"
    finally:
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            status = launcher.wait(STOP_TIMEOUT_SECONDS * 3)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise
    read_until("stopped emoji", 5)
    output = "".join(seen)
    assert status == 0, output
    for name in pids:
        assert f"stopped {name} (status 0)" in output, output
    assert not [name for name, pid in pids.items() if _alive(pid)]
    assert "Traceback" not in output, output


def test_local_launcher_refuses_a_busy_web_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "shoal.demo.local", "--web-port",
                              str(port), "--no-bot"], cwd=REPO, env=child_env(),
                             capture_output=True, timeout=30)
    assert out.returncode == 1
    assert b"web cannot listen" in out.stderr and b"--web-port" in out.stderr
    assert b"Traceback" not in out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_script_is_valid_javascript() -> None:
    out = subprocess.run(["node", "--check", str(REPO / "demo" / "static" / "app.js")],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
