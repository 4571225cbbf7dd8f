#!/usr/bin/env python3
"""token-broker's benchmark: the broker against this machine's own limit, in one run.

Measures, with the load generator `wrk`:
  1. the broker's cache-hit path, bare axum servers sent the same request and answering it
     with the same bytes as constants (the machine's limit), and callers going straight to the identity provider's token
     endpoint, at the same concurrency levels; the three are interleaved (in an order that
     rotates from one round to the next) and each cell is measured BENCH_ROUNDS times (at
     least 3), so the report gives medians and ranges rather than one lucky run,
  2. cold start (process start to first answer on `/`), broker versus bare, and to first token,
  3. the broker's peak resident memory and the release binary's size,
  4. single flight (1,000 concurrent requests on a cold key) and refresh-ahead (short-lived
     tokens under load), counting from the broker's own audit records how many callers
     started a fetch (`miss`) and how many waited for one (`joined`),
  5. the broker and the no-router bare server again with the servers pinned to one core and
     `wrk` to the other (`taskset`), where each server's CPU time per request is read from
     /proc without the load generator competing for its core,
  6. the same two servers run under callgrind (valgrind), which counts the instructions each
     executes: user-space work per request, free of the machine's noise,
  7. the cache-hit path with OpenTelemetry on (a second broker exporting to a local OTLP sink),
     in the same interleaved rounds as 1,
and writes the results to BENCHMARKS.md, saying which targets are met and which are missed.
Targets are graded against the strictest limit: the bare server with no router, served the
way the broker is served. Every target is run once unrecorded first (a warm-up).
Every server binds port 0 and reports the port it got; every process started here is
stopped by its PID. Run it with scripts/bench.
"""

import base64
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
WRK_SCRIPT = ROOT / "bench" / "wrk-report.lua"
DURATION = os.environ.get("BENCH_DURATION", "5s")
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64,256").split(",")]
ROUNDS = max(3, int(os.environ.get("BENCH_ROUNDS", "3")))
SECRET = "bench secret :%+/= " + base64.urlsafe_b64encode(os.urandom(12)).decode()
# The headers the Functions host adds to every request it forwards to a custom handler.
HOST_HEADERS = {
    "X-Azure-Functions-InvocationId": "3f2b8c1e-0000-4000-8000-000000000001",
    "X-Azure-Functions-HostVersion": "4.1037.0",
}
# Targets: the cache-hit path against the bare server with no router (the strictest limit) at
# every concurrency level (medians).
THROUGHPUT_TARGET = 0.90
P99_TARGET = 1.5
# Concurrency of the pinned runs (one wrk thread on its own core).
PINNED_CONCURRENCY = [16, 256]
# Concurrency and length of the measured runs under callgrind (each after a 3 s warm-up).
COUNTED_CONCURRENCY = [16, 256]
COUNTED_DURATION = os.environ.get("BENCH_COUNTED_DURATION", "8s")
# BENCH_ONLY=instructions measures only the instruction counts and prints them (for profiling
# work on the hot path); BENCHMARKS.md is written only by a full run.
ONLY = os.environ.get("BENCH_ONLY", "")

processes = []


def log(message):
    print(f"== {message}", flush=True)


def raise_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def cpu_seconds(pid):
    """User and system CPU time the process has used so far (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(args, env=None, stdout=subprocess.DEVNULL, stdin=None):
    process = subprocess.Popen(
        args, env=env, stdout=stdout, stderr=subprocess.DEVNULL, stdin=stdin,
        preexec_fn=raise_file_limit,
    )
    processes.append(process)
    return process


def stop(process):
    """SIGTERM to this process (by its PID), then SIGKILL if it does not end in 10 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def read_json_line(process, what, predicate=lambda record: True, timeout=30.0, drain=True):
    """The first JSON line on the process's stdout that satisfies `predicate`, within
    `timeout`; fails naming `what` (and what was read) otherwise."""
    found, seen = [], []

    def reader():
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            seen.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if predicate(record):
                found.append(record)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise RuntimeError(f"{what} did not report its port within {timeout:.0f} s; it wrote: {seen[-20:]}")
    if drain:
        # Keep draining, so that a full pipe never blocks the process.
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    return found[0]


def answers(port, path="/"):
    """Whether 127.0.0.1:port answers an HTTP request (any status), as the host's probe."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return s.recv(16).startswith(b"HTTP/1.1")
    except OSError:
        return False


def wait_until_answers(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(port):
            return
        time.sleep(0.001)
    raise RuntimeError(f"nothing answered on port {port} within {timeout:.0f} s")


def http_json(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wrk(url, concurrency, duration=DURATION, headers=None, method="GET", body="", core=None):
    threads = 1 if core is not None else max(1, min(concurrency, os.cpu_count() or 1))
    args = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", duration, "--latency",
            "-s", str(WRK_SCRIPT)]
    if core is not None:
        args = ["taskset", "-c", str(core)] + args
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    env = dict(os.environ, WRK_METHOD=method, WRK_BODY=body)
    output = subprocess.run(args + [url], capture_output=True, check=True, env=env,
                            preexec_fn=raise_file_limit).stdout.decode()
    report = json.loads(output.strip().splitlines()[-1])
    seconds = report["duration_us"] / 1e6
    failed = report["status_errors"] + report["socket_errors"]
    return {
        "rps": report["requests"] / seconds,
        "p50": report["p50"] / 1000,
        "p99": report["p99"] / 1000,
        "p999": report["p999"] / 1000,
        "max": report["max"] / 1000,
        "ok": report["requests"] - failed,
        "total": report["requests"],
    }


def settle(processes, quiet=0.02, within=30.0):
    """Waits until `processes` together use less than `quiet` CPU seconds per 0.25 s (at most
    `within` seconds): the identity provider goes on answering a run's queued requests for
    seconds after `wrk` stops, and whatever ran next would share the machine with it."""
    deadline = time.monotonic() + within
    before = sum(cpu_seconds(process.pid) for process in processes)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(cpu_seconds(process.pid) for process in processes)
        if now - before < quiet:
            return
        before = now


def vm_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine():
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return f"{os.cpu_count()} cores ({model}), {int(memory) // 1024 // 1024} GiB, Linux {platform.release()}"


def install_tools():
    """What the benchmark needs beyond the demo's tools, installed the way scripts/test does."""
    missing = [package for package, tool in (("wrk", "wrk"), ("valgrind", "callgrind_control"))
               if not shutil.which(tool)]
    if missing:
        log(f"installing {', '.join(missing)} (the load generator and the instruction counter)")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True)
    if not (ROOT / "tests/idp/node_modules/oidc-provider").exists():
        subprocess.run(["npm", "ci", "--prefix", str(ROOT / "tests/idp"), "--no-audit", "--no-fund"], check=True)


def concurrent_cold_requests(url, count, headers):
    """`count` requests released together by a barrier; returns how many answered 200."""
    barrier = threading.Barrier(count)
    ok = []

    def one():
        request = urllib.request.Request(url, headers=headers)
        barrier.wait()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                ok.append(response.status == 200)
        except OSError:
            ok.append(False)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(ok)


def main():
    state = Path(tempfile.mkdtemp(prefix="token-broker-bench-"))
    install_tools()
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--bins", "--quiet", "--locked"], cwd=ROOT, check=True)

    log("starting the identity provider and the Azure doubles (each on a port it reports)")
    idp_config = state / "idp.json"
    idp_config.write_text(json.dumps({
        "port": 0, "resource": "api://demo", "scopes": "read write",
        "clients": [
            {"client_id": "bench", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic", "ttl": 3600},
            {"client_id": "bench-short", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic", "ttl": 4},
        ],
    }))
    idp = start(["node", str(ROOT / "tests/idp/server.mjs"), str(idp_config)], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    ready = read_json_line(idp, "the identity provider", lambda r: "token_endpoint" in r)
    env = dict(os.environ, BENCH_SECRET=SECRET)
    doubles = start([str(RELEASE / "token-broker-doubles"), "--dir", str(state), "--secret", "bench-secret=env:BENCH_SECRET"],
                    env=env, stdout=subprocess.PIPE)
    azure = read_json_line(doubles, "the Azure doubles", lambda r: "KEY_VAULT_URI" in r)
    config = state / "broker.toml"
    # The doubles' vault is https://localhost:<port>, which is not under the challenge's
    # vault.azure.net: the one place challenge verification has to be off.
    config.write_text(f"""
[key_vault]
uri = "${{KEY_VAULT_URI}}"
verify_challenge_resource = false

[connections.bench]
token_url = "{ready['token_endpoint']}"
client_id = "bench"
client_secret = {{ key_vault_secret = "bench-secret" }}
scopes = ["read"]

[connections.cold]
token_url = "{ready['token_endpoint']}"
client_id = "bench"
client_secret = {{ key_vault_secret = "bench-secret" }}
scopes = ["write"]

[connections.short]
token_url = "{ready['token_endpoint']}"
client_id = "bench-short"
client_secret = {{ key_vault_secret = "bench-secret" }}
scopes = ["read"]
""")
    rust_log = os.environ.get("BENCH_RUST_LOG", "info")
    if rust_log not in ("trace", "debug", "info"):
        rust_log += ",token_broker::startup=info"  # the line that names the port
    broker_env = dict(os.environ, **azure, TOKEN_BROKER_CONFIG=str(config), RUST_LOG=rust_log,
                      FUNCTIONS_CUSTOMHANDLER_PORT="0")
    broker_env.pop("BENCH_SECRET", None)

    def start_broker(log_file=None, wrapper=(), timeout=30.0, extra_env=None):
        """Starts the broker on port 0 (under `wrapper`, if any, with `extra_env` added); returns
        it and the port its "listening" line names."""
        env = dict(broker_env, **(extra_env or {}))
        process = start(list(wrapper) + [str(RELEASE / "token-broker")], env=env, stdout=subprocess.PIPE)
        record = read_json_line(process, "the broker", lambda r: r.get("message") == "token-broker listening",
                                timeout=timeout, drain=log_file is None)
        if log_file is not None:
            # Audit records from here on, for the refresh-ahead count.
            def copy():
                with open(log_file, "ab") as out:
                    for raw in process.stdout:
                        out.write(raw)
                        out.flush()
            threading.Thread(target=copy, daemon=True).start()
        return process, record["port"]

    def start_bare(size, stack="router", wrapper=(), timeout=30.0):
        env = dict(os.environ, FUNCTIONS_CUSTOMHANDLER_PORT="0", BARE_BODY_BYTES=str(size), BARE_STACK=stack)
        process = start(list(wrapper) + [str(RELEASE / "bare-server")], env=env, stdout=subprocess.PIPE)
        return process, read_json_line(process, "bare-server", lambda r: "port" in r, timeout=timeout)["port"]

    def counted(name, round_number):
        """Instructions per request of one server (`broker` or `lean`) under callgrind, at each
        of COUNTED_CONCURRENCY: after a warm-up, the counters are zeroed, `wrk` runs, and the
        counters are dumped; the dump's total over the requests `wrk` saw answered."""
        out = state / f"callgrind.{name}.{round_number}"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        if name == "broker":
            process, port = start_broker(wrapper=wrapper, timeout=180.0)
        else:
            process, port = start_bare(body_size, "service", wrapper=wrapper, timeout=180.0)
        url = f"http://127.0.0.1:{port}/api/token/bench"
        wait_until_answers(port, timeout=180.0)
        wrk(url, 16, duration="3s", headers=HOST_HEADERS)  # warm-up: first token, connections, caches
        results = {}
        try:
            for c in COUNTED_CONCURRENCY:
                control(process, "-z")
                result = wrk(url, c, duration=COUNTED_DURATION, headers=HOST_HEADERS)
                before = set(state.glob(f"{out.name}*"))
                control(process, "-d")
                dump = new_file(before, f"{out.name}*")
                totals = next(int(line.split()[1]) for line in dump.read_text().splitlines()
                              if line.startswith(("totals:", "summary:")))
                if result["ok"] != result["total"]:
                    raise RuntimeError(f"{name} failed {result['total'] - result['ok']} requests under callgrind")
                results[c] = totals / result["total"]
                print(f"   counted round {round_number + 1} c={c} {name}: {results[c]:,.0f} instructions per "
                      f"request ({result['total']} requests)", flush=True)
        finally:
            stop(process)
        return results

    def control(process, command):
        """`callgrind_control <command>` for `process`, which must say it did it: the tool exits
        0 even when it found no callgrind run, and a zeroing that did not happen would count the
        start and the warm-up too."""
        done = subprocess.run(["callgrind_control", command, str(process.pid)], capture_output=True,
                              timeout=60, check=False)
        if done.returncode != 0 or b"OK" not in done.stdout:
            raise RuntimeError(f"callgrind_control {command} failed: {done.stdout!r} {done.stderr!r}")

    def new_file(before, pattern, within=30.0):
        """The one file matching `pattern` in the state directory that was not in `before`,
        waited for (a dump is written after the control command returns)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            new = set(state.glob(pattern)) - before
            if len(new) == 1:
                dump = new.pop()
                text = dump.read_text(errors="replace")
                # Complete once its totals are written (they come last).
                if "\ntotals:" in text or "\nsummary:" in text:
                    return dump
            time.sleep(0.1)
        raise RuntimeError(f"no callgrind dump ({pattern}) appeared within {within:.0f} s")

    def instructions():
        """Instructions per request of both servers over ROUNDS rounds; on a failure of the
        counting itself, the reason (the report says the target was not measured) rather than a
        lost run."""
        log(f"instructions per request under callgrind: {ROUNDS} rounds of {COUNTED_DURATION} per cell")
        counts = {(name, c): [] for name in ("broker", "lean") for c in COUNTED_CONCURRENCY}
        try:
            for round_number in range(ROUNDS):
                names = ("broker", "lean") if round_number % 2 == 0 else ("lean", "broker")
                for name in names:
                    for c, value in counted(name, round_number).items():
                        counts[(name, c)].append(value)
        except (RuntimeError, subprocess.SubprocessError, OSError, StopIteration) as error:
            print(f"   instruction counting failed: {error}", flush=True)
            return {"failed": str(error)}
        return counts

    broker_log = state / "broker.log"
    broker, broker_port = start_broker(broker_log)
    wait_until_answers(broker_port)
    token_url = f"http://127.0.0.1:{broker_port}/api/token/bench"
    with urllib.request.urlopen(urllib.request.Request(token_url, headers=HOST_HEADERS)) as response:
        body_size = len(response.read())
    if ONLY == "instructions":
        stop(broker)
        counts = instructions()
        if "failed" in counts:
            raise SystemExit(1)
        print(f"   callgrind dumps kept in {state} (callgrind_annotate reads them)", flush=True)
        for c in COUNTED_CONCURRENCY:
            b, l = counts[("broker", c)], counts[("lean", c)]
            print(f"   c={c}: broker {spread(b, 0)}, no-router bare {spread(l, 0)}, "
                  f"ratio {statistics.median(l) / statistics.median(b):.3f}", flush=True)
        return
    bare, bare_port = start_bare(body_size)
    wait_until_answers(bare_port)
    lean, lean_port = start_bare(body_size, "service")
    wait_until_answers(lean_port)
    # The same broker with OpenTelemetry on: every request gets its span, every answer its
    # metrics, exported to a local sink every second (spans in batches, as the SDK sends them).
    sink = OtlpSink()
    otel, otel_port = start_broker(extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
    })
    wait_until_answers(otel_port)

    basic = base64.b64encode(f"bench:{urllib.parse.quote_plus(SECRET)}".encode()).decode()
    targets = {
        "broker": lambda c: wrk(token_url, c, headers=HOST_HEADERS),
        # The bare servers get the same request as the broker (path and headers): what differs
        # is only what the broker does with it.
        "bare": lambda c: wrk(f"http://127.0.0.1:{bare_port}/api/token/bench", c, headers=HOST_HEADERS),
        "lean": lambda c: wrk(f"http://127.0.0.1:{lean_port}/api/token/bench", c, headers=HOST_HEADERS),
        "otel": lambda c: wrk(f"http://127.0.0.1:{otel_port}/api/token/bench", c, headers=HOST_HEADERS),
        "idp": lambda c: wrk(ready["token_endpoint"], c, headers={"Authorization": f"Basic {basic}"},
                             method="POST", body="grant_type=client_credentials&scope=read"),
    }
    order = list(targets)
    log("warm-up: one unrecorded run of every target")
    for name in order:
        settle([broker, bare, lean, idp, otel])
        targets[name](max(CONCURRENCY))
    log(f"cache hit, bare servers and identity provider: {ROUNDS} interleaved rounds of {DURATION} per cell")
    samples = {(name, c): [] for name in targets for c in CONCURRENCY}
    busy = [broker, bare, lean, idp, otel]
    for round_number in range(ROUNDS):
        # Rotate the order each round so that no target always runs first (or last), and
        # reverse it every other round so that no target always follows the same one (a
        # rotation alone keeps the identity provider just before the broker in every round).
        names = order[round_number % len(order):] + order[:round_number % len(order)]
        if round_number % 2:
            names.reverse()
        for c in CONCURRENCY:
            for name in names:
                settle(busy)
                result = targets[name](c)
                samples[(name, c)].append(result)
                print(f"   round {round_number + 1} c={c} {name}: {result['rps']:.0f} rps, p99 {result['p99']:.2f} ms, "
                      f"{result['total'] - result['ok']} failed", flush=True)

    peak_cache_hits_kib = vm_hwm_kib(broker.pid)
    stop(otel)
    busy.remove(otel)
    exported = dict(sink.received)
    sink.close()
    print(f"   OTLP sink received {exported}", flush=True)
    if not exported.get("/v1/metrics") or not exported.get("/v1/traces"):
        raise SystemExit(f"the OpenTelemetry broker exported nothing to the sink: {exported}")

    log(f"pinned: servers on core 0, wrk on core 1; {ROUNDS} interleaved rounds of {DURATION}")
    pinned = {(name, c): [] for name in ("broker", "lean") for c in PINNED_CONCURRENCY}
    servers = {"broker": (broker, token_url), "lean": (lean, f"http://127.0.0.1:{lean_port}/api/token/bench")}
    for name, (process, _) in servers.items():
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(process.pid)], check=True,
                       capture_output=True)
    for round_number in range(ROUNDS):
        names = list(servers) if round_number % 2 == 0 else list(reversed(servers))
        for c in PINNED_CONCURRENCY:
            for name in names:
                process, url = servers[name]
                settle(busy)
                before = cpu_seconds(process.pid)
                result = wrk(url, c, headers=HOST_HEADERS, core=1)
                result["cpu_us"] = (cpu_seconds(process.pid) - before) / max(result["total"], 1) * 1e6
                pinned[(name, c)].append(result)
                print(f"   pinned round {round_number + 1} c={c} {name}: {result['rps']:.0f} rps, "
                      f"{result['cpu_us']:.2f} us CPU per request", flush=True)
    for name, (process, _) in servers.items():
        subprocess.run(["taskset", "-a", "-p", "-c", f"0-{(os.cpu_count() or 1) - 1}", str(process.pid)],
                       check=True, capture_output=True)

    log("single flight: 1,000 concurrent requests on a cold key")
    before = http_json(f"{ready['issuer']}/_test/stats")["token_requests"]
    flight_ok = concurrent_cold_requests(f"http://127.0.0.1:{broker_port}/api/token/cold", 1000, HOST_HEADERS)
    single_flight_calls = http_json(f"{ready['issuer']}/_test/stats")["token_requests"] - before
    time.sleep(6)  # hit records are written every 5 s, miss and joined within 1 s
    flight = cache_outcomes(broker_log, "cold")
    print(f"   {flight_ok}/1000 answered 200, token endpoint calls: {single_flight_calls}, "
          f"miss {flight['miss']}, joined {flight['joined']}", flush=True)

    log("refresh ahead: 4 s tokens under load for 12 s")
    before = http_json(f"{ready['issuer']}/_test/stats")["token_requests"]
    refresh = wrk(f"http://127.0.0.1:{broker_port}/api/token/short", 16, duration="12s", headers=HOST_HEADERS)
    refreshes = http_json(f"{ready['issuer']}/_test/stats")["token_requests"] - before
    time.sleep(1.5)  # audit records reach stdout within 1 s
    waits = cache_outcomes(broker_log, "short", split_at_first_fetch=True)
    print(f"   {refresh['ok']}/{refresh['total']} answered, {refreshes} token endpoint calls, "
          f"cold start: miss {waits['cold_miss']}, joined {waits['cold_joined']}; after it: "
          f"miss {waits['miss']}, joined {waits['joined']}, stale {waits['stale']}; "
          f"p99 {refresh['p99']:.2f} ms, max {refresh['max']:.2f} ms", flush=True)

    peak_kib = vm_hwm_kib(broker.pid)
    stop(broker)
    stop(bare)
    stop(lean)

    log("cold start: process start to first answer on /, 10 runs each")

    def cold_start(launch):
        samples_ms = []
        for _ in range(10):
            started = time.monotonic()
            process, port = launch()
            wait_until_answers(port)
            samples_ms.append((time.monotonic() - started) * 1000)
            stop(process)
        return samples_ms

    cold_bare = cold_start(lambda: start_bare(body_size))
    cold_broker = cold_start(lambda: start_broker())
    first_token = []
    for _ in range(5):
        started = time.monotonic()
        process, port = start_broker()
        wait_until_answers(port)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/token/bench", headers=HOST_HEADERS)
        with urllib.request.urlopen(request) as response:
            response.read()
        first_token.append((time.monotonic() - started) * 1000)
        stop(process)
    print(f"   bare {statistics.median(cold_bare):.1f} ms, broker {statistics.median(cold_broker):.1f} ms, "
          f"first token {statistics.median(first_token):.1f} ms", flush=True)

    binary_bytes = (RELEASE / "token-broker").stat().st_size
    counts = instructions()
    for process in processes:
        stop(process)

    write_report(samples, pinned, counts, flight_ok, single_flight_calls, flight, refresh, refreshes, waits, peak_kib,
                 peak_cache_hits_kib, cold_bare, cold_broker, first_token, binary_bytes, body_size, exported)
    shutil.rmtree(state, ignore_errors=True)


class OtlpSink:
    """A local OTLP/HTTP endpoint that answers every export with 200 and counts them by path,
    for the broker with OpenTelemetry on: what a collector on the same network costs it."""

    def __init__(self):
        import http.server

        received = self.received = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received[self.path] = received.get(self.path, 0) + 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def cache_outcomes(log_file, connection, split_at_first_fetch=False):
    """The broker's audit records for `connection`, by cache outcome (each record's `count`).
    With `split_at_first_fetch`, the records up to and including the first `miss` and the
    `joined` records that immediately follow it (the cold start) are counted apart, as
    `cold_miss` and `cold_joined`: what comes after is what the refresh-ahead promise is about."""
    counts = {"hit": 0, "miss": 0, "joined": 0, "stale": 0, "cold_miss": 0, "cold_joined": 0}
    cold = split_at_first_fetch
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("connection") != connection or "cache" not in record:
            continue
        outcome, count = record["cache"], int(record.get("count", 1))
        if cold and outcome in ("miss", "joined") and (outcome == "joined" or counts["cold_miss"] == 0):
            counts["cold_" + outcome] += count
            continue
        if cold and counts["cold_miss"] > 0:
            cold = False
        counts[outcome] = counts.get(outcome, 0) + count
    return counts


def ratio_text(pairs, median, target=None):
    """A ratio of medians with as many decimals as the runs' spread justifies (three when every
    pairing of single runs lies within 0.005, two within 0.05, else one), and "runs disagree"
    when some pairings fall on either side of `target`."""
    width = max(pairs) - min(pairs)
    digits = 3 if width <= 0.005 else 2 if width <= 0.05 else 1
    text = f"{median:.{digits}f}"
    if target is not None and min(pairs) < target <= max(pairs):
        text += " (runs disagree)"
    return text


def spread(values, digits):
    """`median (min–max)`."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write_chart(path, title, x_title, y_title, x_labels, series):
    """A line chart as a standalone SVG: `series` is [(label, colour, values)], one value per
    x label; the x labels are evenly spaced (concurrency levels or instance counts)."""
    width, height, left, right, top, bottom = 640, 360, 72, 170, 40, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(v for _, _, values in series for v in values) or 1.0
    magnitude = 10 ** (len(str(int(peak))) - 1) if peak >= 1 else 0.1
    step = next(m * magnitude for m in (0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10) if peak / (m * magnitude) <= 6)
    top_value = step * (int(peak / step) + 1)

    def x(i):
        return left + (plot_w * i / (len(x_labels) - 1) if len(x_labels) > 1 else plot_w / 2)

    def y(v):
        return top + plot_h - plot_h * v / top_value

    def number(v):
        return f"{v:,.0f}" if step >= 1 else f"{v:g}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="24" font-size="14" font-weight="bold">{title}</text>']
    ticks = int(round(top_value / step))
    for k in range(ticks + 1):
        v = k * step
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" stroke="#e1e4e8"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{number(v)}</text>')
    for i, label in enumerate(x_labels):
        out.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">{x_title}</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">{y_title}</text>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#24292f"/>')
    for n, (label, colour, values) in enumerate(series):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in enumerate(values):
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{label}: {v:,.3g}</title></circle>')
        legend_y = top + 10 + 20 * n
        out.append(f'<line x1="{left + plot_w + 16}" y1="{legend_y}" x2="{left + plot_w + 36}" y2="{legend_y}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left + plot_w + 42}" y="{legend_y + 4}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def draw_fleet(fleet):
    """Draws the fleet section's table (written from the fleet measurement test's output) as
    benchmarks-fleet.svg and makes sure the section shows it; returns the section."""
    rows = []
    for line in fleet.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], float(cells[3])))
    if not rows:
        return fleet
    counts = sorted({count for count, _, _ in rows})
    tiers = [("memory only", "#8b949e"), ("memory + shared", "#1f6feb")]
    series = [(tier, colour, [next((v for n, t, v in rows if n == count and t == tier), None) for count in counts])
              for tier, colour in tiers]
    series = [(tier, colour, values) for tier, colour, values in series if None not in values]
    write_chart(ROOT / "benchmarks-fleet.svg", "Token requests per key per token lifetime",
                "broker instances", "requests per key per lifetime", [str(n) for n in counts], series)
    image = "![Token requests per key per lifetime against instance count](benchmarks-fleet.svg)"
    if image not in fleet:
        table = fleet.index("\n| instances")
        fleet = fleet[:table] + "\n" + image + "\n" + fleet[table:]
    return fleet


def write_report(samples, pinned, counts, flight_ok, single_flight_calls, flight, refresh, refreshes, waits, peak_kib,
                 peak_cache_hits_kib, cold_bare, cold_broker, first_token, binary_bytes, body_size, exported):
    def values(name, c, field):
        return [s[field] for s in samples[(name, c)]]

    def median(name, c, field):
        return statistics.median(values(name, c, field))

    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (do not edit by hand). One machine: the load generator (`wrk`),",
        "the broker, the bare servers and the identity provider all share it, so the ratios matter",
        "more than the absolute numbers.",
        "",
        f"- Machine: {machine()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Each cell: {ROUNDS} runs of {DURATION}, interleaved (broker, the two bare servers and the identity provider "
        "in an order that rotates every round and reverses every other one), after one unrecorded warm-up run of "
        "each, every run started once the servers and the identity provider are idle (under 8% of a core); "
        "medians, with the range (min–max) of the runs in brackets.",
        f"- Body {body_size} bytes (a token answer); release profile for both servers; every request carries the "
        "headers the Functions host adds (`X-Azure-Functions-InvocationId`, `X-Azure-Functions-HostVersion`).",
        "",
        "## Cache-hit path versus the machine's limit, and versus the identity provider",
        "",
        "`GET /api/token/bench` (a cached token); two bare servers sent the same request (path and",
        "headers) and answering it with the same bytes as constants (the token answer's three headers",
        "and a body of its size): `bare, no router` through one hand-made service, as the broker itself is served (the",
        "strictest limit, which the targets are graded against), and `bare` through an axum `Router`;",
        "and the identity provider's token endpoint called directly (oidc-provider, client credentials",
        "with Basic authentication), at the same concurrency.",
        "",
        "![Throughput against concurrency](benchmarks-throughput.svg)",
        "![p99 latency against concurrency](benchmarks-p99.svg)",
        "",
        "| concurrency | broker rps | bare rps | bare, no router rps | identity provider rps | broker p99 ms | bare p99 ms | bare, no router p99 ms | identity provider p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONCURRENCY:
        lines.append(
            f"| {c} | {spread(values('broker', c, 'rps'), 0)} | {spread(values('bare', c, 'rps'), 0)} | "
            f"{spread(values('lean', c, 'rps'), 0)} | {spread(values('idp', c, 'rps'), 0)} | "
            f"{spread(values('broker', c, 'p99'), 3)} | {spread(values('bare', c, 'p99'), 3)} | "
            f"{spread(values('lean', c, 'p99'), 3)} | {spread(values('idp', c, 'p99'), 2)} |"
        )
    names = ("broker", "bare", "lean", "idp", "otel")
    failed = {name: sum(s["total"] - s["ok"] for c in CONCURRENCY for s in samples[(name, c)]) for name in names}
    lines += [
        "",
        f"Failed requests (status 400 or above, or socket errors): broker {failed['broker']}, bare server "
        f"{failed['bare']}, bare server without router {failed['lean']}, identity provider {failed['idp']}, broker with "
        f"OpenTelemetry on {failed['otel']}.",
        "",
        "## Targets",
        "",
        f"The cache-hit path should reach at least {THROUGHPUT_TARGET:.2f} of the throughput of the bare server with no "
        f"router, with a p99 within {P99_TARGET}x of its p99, at every concurrency (medians compared). A ratio has three "
        "decimals only when every pairing of a single broker run with a single bare run lies within 0.005 of every "
        "other, two within 0.05, else one; \"runs disagree\" marks a verdict that some of those pairings would "
        "reverse. The same ratios against the bare server with a router are given beside them, with no target.",
        "",
        "| concurrency | throughput ratio, no-router bare | target | p99 ratio, no-router bare | target | throughput ratio, router bare | p99 ratio, router bare | broker / identity provider throughput |",
        "|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    met, missed = [], []
    for c in CONCURRENCY:
        throughput = median("broker", c, "rps") / median("lean", c, "rps")
        p99 = median("broker", c, "p99") / median("lean", c, "p99")
        t_ok, p_ok = throughput >= THROUGHPUT_TARGET, p99 <= P99_TARGET
        t_pairs = [b / r for b in values("broker", c, "rps") for r in values("lean", c, "rps")]
        p_pairs = [b / r for b in values("broker", c, "p99") for r in values("lean", c, "p99")]
        t_text = ratio_text(t_pairs, throughput, THROUGHPUT_TARGET)
        p_text = ratio_text(p_pairs, p99, P99_TARGET)
        (met if t_ok else missed).append(f"throughput at concurrency {c} ({t_text})")
        (met if p_ok else missed).append(f"p99 at concurrency {c} ({p_text}x)")
        router_t = [b / r for b in values("broker", c, "rps") for r in values("bare", c, "rps")]
        router_p = [b / r for b in values("broker", c, "p99") for r in values("bare", c, "p99")]
        lines.append(
            f"| {c} | {t_text} | {'met' if t_ok else '**missed**'} | {p_text} | {'met' if p_ok else '**missed**'} | "
            f"{ratio_text(router_t, median('broker', c, 'rps') / median('bare', c, 'rps'))} | "
            f"{ratio_text(router_p, median('broker', c, 'p99') / median('bare', c, 'p99'))} | "
            f"{median('broker', c, 'rps') / median('idp', c, 'rps'):.0f}x |"
        )
    lines += [
        "",
        "### OpenTelemetry off and on",
        "",
        "A second broker, the same binary and configuration with `OTEL_EXPORTER_OTLP_ENDPOINT` set (a local sink "
        "that answers every export with 200; metrics every second, spans in the SDK's batches every second), "
        "measured in the same interleaved rounds. Off, nothing is built and the cache hit takes the fast path "
        "(the broker above); on, every request takes the full path for its server span, adds to the metrics, "
        "and its span is queued for export (the SDK drops spans past its queue of 2,048 rather than wait). "
        f"The sink received {', '.join(f'{n} exports to {p}' for p, n in sorted(exported.items()))}. No target: "
        "the cost of a span and metrics per request, shown as it is.",
        "",
        "| concurrency | off rps | on rps | on / off throughput | off / no-router bare | on / no-router bare | off p99 ms | on p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONCURRENCY:
        on_off = [o / b for o in values("otel", c, "rps") for b in values("broker", c, "rps")]
        on_lean = [o / r for o in values("otel", c, "rps") for r in values("lean", c, "rps")]
        off_lean = [b / r for b in values("broker", c, "rps") for r in values("lean", c, "rps")]
        lines.append(
            f"| {c} | {spread(values('broker', c, 'rps'), 0)} | {spread(values('otel', c, 'rps'), 0)} | "
            f"{ratio_text(on_off, median('otel', c, 'rps') / median('broker', c, 'rps'))} | "
            f"{ratio_text(off_lean, median('broker', c, 'rps') / median('lean', c, 'rps'))} | "
            f"{ratio_text(on_lean, median('otel', c, 'rps') / median('lean', c, 'rps'))} | "
            f"{spread(values('broker', c, 'p99'), 3)} | {spread(values('otel', c, 'p99'), 3)} |"
        )
    lines += [
        "",
        "### Pinned: the servers on one core, `wrk` on the other",
        "",
        "The same cache hit and no-router bare server, each pinned to core 0 (`taskset`) while `wrk` runs one thread "
        "on core 1, so that the load generator does not compete for the server's core. CPU per request is the "
        "server process's user and system time over the run (`/proc/<pid>/stat`) divided by the requests it "
        "answered: the cost of a request, whatever the machine's other load.",
        "",
        "| concurrency | broker rps | no-router bare rps | throughput ratio | broker CPU µs/request | no-router bare CPU µs/request | CPU ratio (bare / broker) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in PINNED_CONCURRENCY:
        b_rps = [r["rps"] for r in pinned[("broker", c)]]
        l_rps = [r["rps"] for r in pinned[("lean", c)]]
        b_cpu = [r["cpu_us"] for r in pinned[("broker", c)]]
        l_cpu = [r["cpu_us"] for r in pinned[("lean", c)]]
        lines.append(
            f"| {c} | {spread(b_rps, 0)} | {spread(l_rps, 0)} | "
            f"{ratio_text([b / r for b in b_rps for r in l_rps], statistics.median(b_rps) / statistics.median(l_rps), THROUGHPUT_TARGET)} | "
            f"{spread(b_cpu, 2)} | {spread(l_cpu, 2)} | "
            f"{ratio_text([l / b for b in b_cpu for l in l_cpu], statistics.median(l_cpu) / statistics.median(b_cpu), THROUGHPUT_TARGET)} |"
        )
    lines += [
        "",
        "### Counted: instructions per request under callgrind",
        "",
        "The same two servers, each started under callgrind (valgrind's instruction counter), warmed up for 3 s, "
        f"then its counters zeroed, `wrk` run for {COUNTED_DURATION} and the counters dumped: every instruction the "
        "process executed in user space (its HTTP stack, runtime, allocator and, for the broker, everything it does "
        "per request and in the background, the log writer included) over the requests `wrk` saw answered. Unlike "
        "time, the count does not move with what else the machine is doing, which makes it the steadiest measure "
        "of the work a request costs in the server's own code. What it leaves out: the kernel's work (the socket "
        "reads and writes, about the same for both, and the broker's log writes and thread wake-ups, which are "
        "its own), and contention (valgrind runs one thread at a time, and an atomic or a contended cache line "
        "counts as one instruction); the few requests in flight when `wrk` stops are counted as work but not as "
        "answers, which weighs slightly against the slower server. Only caller mode `none` is measured (mode `jwt` "
        "verifies a signature per request, which no bare server does). Graded like throughput: the bare server's "
        f"count over the broker's, at least {THROUGHPUT_TARGET:.2f}.",
        "",
    ]
    if "failed" in counts:
        missed.append(f"instructions per request (not measured: {counts['failed']})")
        lines.append(f"Not measured: {counts['failed']}.")
    else:
        lines += [
            "| concurrency | broker instructions/request | no-router bare instructions/request | ratio (bare / broker) | target |",
            "|---:|---:|---:|---:|---|",
        ]
    for c in ([] if "failed" in counts else COUNTED_CONCURRENCY):
        b, l = counts[("broker", c)], counts[("lean", c)]
        ratio = statistics.median(l) / statistics.median(b)
        text = ratio_text([y / x for x in b for y in l], ratio, THROUGHPUT_TARGET)
        ok = ratio >= THROUGHPUT_TARGET
        (met if ok else missed).append(f"instructions per request at concurrency {c} ({text})")
        lines.append(f"| {c} | {spread(b, 0)} | {spread(l, 0)} | {text} | {'met' if ok else '**missed**'} |")
    series = (("broker", "broker", "#1f6feb"), ("bare", "bare (router)", "#8b949e"),
              ("lean", "bare, no router", "#3fb950"))
    labels = [str(c) for c in CONCURRENCY]
    write_chart(ROOT / "benchmarks-throughput.svg", "Cache-hit throughput (median of the runs)",
                "concurrent connections", "requests per second", labels,
                [(label, colour, [median(name, c, "rps") for c in CONCURRENCY]) for name, label, colour in series])
    write_chart(ROOT / "benchmarks-p99.svg", "Cache-hit p99 latency (median of the runs)",
                "concurrent connections", "p99 latency, ms", labels,
                [(label, colour, [median(name, c, "p99") for c in CONCURRENCY]) for name, label, colour in series])
    sf_ok = single_flight_calls == 1 and flight_ok == 1000 and flight["miss"] == 1
    ra_ok = waits["miss"] == 0 and waits["joined"] == 0 and refresh["ok"] == refresh["total"]
    (met if sf_ok else missed).append(
        f"single flight ({single_flight_calls} token endpoint call and {flight['miss']} miss for 1,000 cold requests)")
    (met if ra_ok else missed).append(
        f"refresh ahead (no failed request; after the cold start {waits['miss'] + waits['joined']} callers waited)")
    lines += [
        "",
        f"Met: {'; '.join(met) if met else 'none'}.",
        "",
        f"Missed: {'; '.join(missed) if missed else 'none'}.",
        "",
        "## Start, memory, size",
        "",
        "| | median (range) |",
        "|---|---:|",
        f"| cold start to first answer on `/`, bare server (10 runs) | {spread(cold_bare, 1)} ms |",
        f"| cold start to first answer on `/`, broker (10 runs) | {spread(cold_broker, 1)} ms |",
        f"| cold start ratio (medians) | {statistics.median(cold_broker) / statistics.median(cold_bare):.2f} |",
        f"| start to first token (Key Vault read + token request, 5 runs) | {spread(first_token, 1)} ms |",
        f"| broker peak resident memory (VmHWM) through the cache-hit runs (up to {max(CONCURRENCY)} connections) | {peak_cache_hits_kib / 1024:.1f} MiB |",
        f"| broker peak resident memory (VmHWM) over the whole run, with the 1,000-connection single-flight burst | {peak_kib / 1024:.1f} MiB |",
        f"| release binary size | {binary_bytes / 1024 / 1024:.1f} MiB |",
        "",
        "## Single flight and refresh ahead",
        "",
        f"- 1,000 concurrent requests on a cold key: {flight_ok} of 1000 answered 200, "
        f"causing **{single_flight_calls}** token endpoint call(s). The broker's audit records: "
        f"{flight['miss']} `miss` (the caller that started the fetch), {flight['joined']} `joined` (callers that "
        f"waited for it), {flight['hit']} `hit` (callers that came after it).",
        f"- 4-second tokens under load (concurrency 16, 12 s, one run): {refresh['ok']} of {refresh['total']} answered; "
        f"{refreshes} token endpoint calls (the cold start and the refreshes). The cold start: "
        f"{waits['cold_miss']} `miss`, {waits['cold_joined']} `joined`. After it, callers that waited for the "
        f"identity provider: **{waits['miss']}** `miss`, **{waits['joined']}** `joined` "
        f"({waits['stale']} answers labelled `stale`, served while a refresh was in flight); "
        f"p50 {refresh['p50']:.3f} ms, p99 {refresh['p99']:.3f} ms, p99.9 {refresh['p999']:.3f} ms, "
        f"max {refresh['max']:.2f} ms.",
        "",
    ]
    # The fleet section is written by the fleet measurement test, not by this script: keep it.
    path = ROOT / "BENCHMARKS.md"
    previous = path.read_text() if path.exists() else ""
    fleet = previous[previous.index("\n## Fleet"):] if "\n## Fleet" in previous else ""
    fleet = draw_fleet(fleet)
    path.write_text("\n".join(lines).rstrip("\n") + "\n" + fleet)
    log("wrote BENCHMARKS.md")


if __name__ == "__main__":
    try:
        main()
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
