#!/usr/bin/env python3
"""token-broker's benchmark: the broker against this machine's own limit, in one run.

Measures, with the load generator `oha`:
  1. the broker's cache-hit path at several concurrency levels,
  2. a bare axum server returning a constant body of the same size (the machine's limit),
  3. callers going straight to the identity provider's token endpoint (no broker),
  4. cold start (process start to first answer on `/`), broker versus bare, and to first token,
  5. the broker's peak resident memory and the release binary's size,
  6. single flight (1,000 concurrent requests on a cold key) and refresh-ahead (short-lived
     tokens under load: latency of requests that arrive while a refresh is in flight).
and writes the results to BENCHMARKS.md. Run it with scripts/bench.
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
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
DURATION = os.environ.get("BENCH_DURATION", "8s")
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64,256").split(",")]
SECRET = "bench secret :%+/= " + base64.urlsafe_b64encode(os.urandom(12)).decode()

processes = []


def log(message):
    print(f"== {message}", flush=True)


def raise_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env=None, stdout=subprocess.DEVNULL, stdin=None):
    process = subprocess.Popen(
        args, env=env, stdout=stdout, stderr=subprocess.DEVNULL, stdin=stdin,
        preexec_fn=raise_file_limit,
    )
    processes.append(process)
    return process


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    raise RuntimeError(f"nothing answered on port {port}")


def http_json(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def oha(url, *extra, duration=DURATION, concurrency=16, requests=None):
    args = ["oha", "--no-tui", "--output-format", "json", "-c", str(concurrency)]
    args += ["-n", str(requests)] if requests else ["-z", duration]
    output = subprocess.run(args + list(extra) + [url], capture_output=True, check=True,
                            preexec_fn=raise_file_limit).stdout
    report = json.loads(output)
    summary = report["summary"]
    percentiles = report["latencyPercentiles"]
    statuses = report.get("statusCodeDistribution", {})
    return {
        "rps": summary["requestsPerSec"],
        "p50": percentiles["p50"] * 1000,
        "p99": percentiles["p99"] * 1000,
        "p999": percentiles["p99.9"] * 1000,
        "max": summary["slowest"] * 1000,
        "ok": sum(v for k, v in statuses.items() if k == "200"),
        "total": sum(statuses.values()),
    }


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


def main():
    state = Path(tempfile.mkdtemp(prefix="token-broker-bench-"))
    if not shutil.which("oha"):
        log("installing oha (the load generator)")
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
    if not (ROOT / "tests/idp/node_modules/oidc-provider").exists():
        subprocess.run(["npm", "ci", "--prefix", str(ROOT / "tests/idp"), "--no-audit", "--no-fund"], check=True)
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "--workspace", "--bins", "--quiet"], cwd=ROOT, check=True)

    log("starting the identity provider and the Azure doubles")
    idp_config = state / "idp.json"
    idp_config.write_text(json.dumps({
        "port": 0, "resource": "api://demo", "scopes": "read write",
        "clients": [
            {"client_id": "bench", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic", "ttl": 3600},
            {"client_id": "bench-short", "client_secret": SECRET, "token_endpoint_auth_method": "client_secret_basic", "ttl": 4},
        ],
    }))
    idp = start(["node", str(ROOT / "tests/idp/server.mjs"), str(idp_config)], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    ready = json.loads(idp.stdout.readline())
    env = dict(os.environ, BENCH_SECRET=SECRET)
    doubles = start([str(RELEASE / "token-broker-doubles"), "--dir", str(state), "--secret", "bench-secret=env:BENCH_SECRET"],
                    env=env, stdout=subprocess.PIPE)
    azure = json.loads(doubles.stdout.readline())
    config = state / "broker.toml"
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
    broker_env = dict(os.environ, **azure, TOKEN_BROKER_CONFIG=str(config), RUST_LOG=os.environ.get("BENCH_RUST_LOG", "info"))
    broker_env.pop("BENCH_SECRET", None)

    def start_broker(port, log_file=None):
        env = dict(broker_env, FUNCTIONS_CUSTOMHANDLER_PORT=str(port))
        out = open(log_file, "wb") if log_file else subprocess.DEVNULL
        return start([str(RELEASE / "token-broker")], env=env, stdout=out)

    def start_bare(port, size):
        env = dict(os.environ, FUNCTIONS_CUSTOMHANDLER_PORT=str(port), BARE_BODY_BYTES=str(size))
        return start([str(RELEASE / "bare-server")], env=env)

    broker_port = free_port()
    broker_log = state / "broker.log"
    broker = start_broker(broker_port, broker_log)
    wait_until_answers(broker_port)
    token_url = f"http://127.0.0.1:{broker_port}/api/token/bench"
    with urllib.request.urlopen(token_url) as response:
        body_size = len(response.read())
    bare_port = free_port()
    bare = start_bare(bare_port, body_size)
    wait_until_answers(bare_port)

    log(f"cache-hit path versus the bare server ({DURATION} per run, body {body_size} bytes)")
    rows = []
    for concurrency in CONCURRENCY:
        b = oha(f"http://127.0.0.1:{bare_port}/", concurrency=concurrency)
        t = oha(token_url, concurrency=concurrency)
        rows.append((concurrency, t, b))
        print(f"   c={concurrency}: broker {t['rps']:.0f} rps p99 {t['p99']:.2f} ms | bare {b['rps']:.0f} rps p99 {b['p99']:.2f} ms", flush=True)

    log("callers straight to the identity provider (no broker)")
    basic = base64.b64encode(f"bench:{urllib.parse.quote_plus(SECRET)}".encode()).decode()
    direct = oha(ready["token_endpoint"], "-m", "POST", "-H", f"Authorization: Basic {basic}",
                 "-H", "Content-Type: application/x-www-form-urlencoded", "-d", "grant_type=client_credentials&scope=read",
                 concurrency=16)
    print(f"   c=16: {direct['rps']:.0f} rps p99 {direct['p99']:.2f} ms", flush=True)

    peak_cache_hits_kib = vm_hwm_kib(broker.pid)

    log("single flight: 1,000 concurrent requests on a cold key")
    before = http_json(f"{ready['issuer']}/_test/stats")["token_requests"]
    flight = oha(f"http://127.0.0.1:{broker_port}/api/token/cold", concurrency=1000, requests=1000)
    single_flight_calls = http_json(f"{ready['issuer']}/_test/stats")["token_requests"] - before
    print(f"   {flight['ok']}/{flight['total']} answered 200, token endpoint calls: {single_flight_calls}", flush=True)

    log("refresh ahead: 4 s tokens under load for 12 s")
    before = http_json(f"{ready['issuer']}/_test/stats")["token_requests"]
    refresh = oha(f"http://127.0.0.1:{broker_port}/api/token/short", duration="12s", concurrency=16)
    refreshes = http_json(f"{ready['issuer']}/_test/stats")["token_requests"] - before
    misses = sum(1 for line in broker_log.read_text().splitlines()
                 if '"connection":"short"' in line and '"cache":"miss"' in line)
    print(f"   {refresh['ok']}/{refresh['total']} answered 200, {refreshes} token endpoint calls, "
          f"{misses} caller(s) waited (cold start), p99 {refresh['p99']:.2f} ms, max {refresh['max']:.2f} ms", flush=True)

    peak_kib = vm_hwm_kib(broker.pid)
    stop(broker)
    stop(bare)

    log("cold start: process start to first answer on /, 10 runs each")

    def cold_start(launch):
        samples = []
        for _ in range(10):
            port = free_port()
            started = time.monotonic()
            process = launch(port)
            wait_until_answers(port)
            samples.append((time.monotonic() - started) * 1000)
            stop(process)
        return statistics.median(samples)

    cold_bare = cold_start(lambda port: start_bare(port, body_size))
    cold_broker = cold_start(lambda port: start_broker(port))
    first_token = []
    for _ in range(5):
        port = free_port()
        started = time.monotonic()
        process = start_broker(port)
        wait_until_answers(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/token/bench") as response:
            response.read()
        first_token.append((time.monotonic() - started) * 1000)
        stop(process)
    print(f"   bare {cold_bare:.1f} ms, broker {cold_broker:.1f} ms, first token {statistics.median(first_token):.1f} ms", flush=True)

    binary_bytes = (RELEASE / "token-broker").stat().st_size
    for process in processes:
        stop(process)

    write_report(rows, direct, single_flight_calls, flight, refresh, refreshes, misses, peak_kib,
                 peak_cache_hits_kib, cold_bare, cold_broker, statistics.median(first_token), binary_bytes, body_size)
    shutil.rmtree(state, ignore_errors=True)


def write_report(rows, direct, single_flight_calls, flight, refresh, refreshes, misses, peak_kib,
                 peak_cache_hits_kib, cold_bare, cold_broker, first_token, binary_bytes, body_size):
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (do not edit by hand). One run, one machine: the load generator",
        "(`oha`), the broker, the bare server and the identity provider all share it, so the ratios",
        "matter more than the absolute numbers.",
        "",
        f"- Machine: {machine()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Each load run: {DURATION}; body {body_size} bytes (a token answer); release profile for both servers.",
        "",
        "## Cache-hit path versus the machine's limit",
        "",
        "`GET /api/token/bench` (a cached token) against `bare-server` (axum answering a constant body of",
        "the same size).",
        "",
        "| concurrency | broker rps | bare rps | throughput ratio | broker p50 / p99 / p99.9 ms | bare p50 / p99 / p99.9 ms | p99 ratio |",
        "|---:|---:|---:|---:|---|---|---:|",
    ]
    for concurrency, t, b in rows:
        lines.append(
            f"| {concurrency} | {t['rps']:.0f} | {b['rps']:.0f} | {t['rps'] / b['rps']:.2f} | "
            f"{t['p50']:.3f} / {t['p99']:.3f} / {t['p999']:.3f} | {b['p50']:.3f} / {b['p99']:.3f} / {b['p999']:.3f} | "
            f"{t['p99'] / b['p99']:.2f} |"
        )
    best = max(rows, key=lambda r: r[1]["rps"])
    lines += [
        "",
        "Targets: throughput at least 0.90 of the bare server, p99 within 1.5x.",
        "",
        "## Without the broker",
        "",
        "Each request straight to the identity provider's token endpoint (oidc-provider, client",
        "credentials with Basic authentication), concurrency 16:",
        "",
        f"| | rps | p50 ms | p99 ms | p99.9 ms |",
        f"|---|---:|---:|---:|---:|",
        f"| identity provider directly | {direct['rps']:.0f} | {direct['p50']:.2f} | {direct['p99']:.2f} | {direct['p999']:.2f} |",
        f"| broker cache hit (best row above) | {best[1]['rps']:.0f} | {best[1]['p50']:.3f} | {best[1]['p99']:.3f} | {best[1]['p999']:.3f} |",
        "",
        f"The broker serves {best[1]['rps'] / direct['rps']:.0f}x the requests per second.",
        "",
        "## Start, memory, size",
        "",
        "| | value |",
        "|---|---:|",
        f"| cold start to first answer on `/`, bare server (median of 10) | {cold_bare:.1f} ms |",
        f"| cold start to first answer on `/`, broker (median of 10) | {cold_broker:.1f} ms |",
        f"| cold start ratio | {cold_broker / cold_bare:.2f} |",
        f"| start to first token (Key Vault read + token request, median of 5) | {first_token:.1f} ms |",
        f"| broker peak resident memory (VmHWM) through the cache-hit runs (up to {max(CONCURRENCY)} connections) | {peak_cache_hits_kib / 1024:.1f} MiB |",
        f"| broker peak resident memory (VmHWM) over the whole run, with the 1,000-connection single-flight burst | {peak_kib / 1024:.1f} MiB |",
        f"| release binary size | {binary_bytes / 1024 / 1024:.1f} MiB |",
        "",
        "## Single flight and refresh ahead",
        "",
        f"- 1,000 concurrent requests on a cold key: {flight['ok']} of {flight['total']} answered 200, "
        f"causing **{single_flight_calls}** token endpoint call(s).",
        f"- 4-second tokens under load (concurrency 16, 12 s): {refresh['ok']} of {refresh['total']} answered 200; "
        f"{refreshes} token endpoint calls (refreshes); {misses} caller(s) waited for the identity provider "
        f"(the first, cold request); p50 {refresh['p50']:.3f} ms, p99 {refresh['p99']:.3f} ms, "
        f"p99.9 {refresh['p999']:.3f} ms, max {refresh['max']:.2f} ms.",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    log("wrote BENCHMARKS.md")


if __name__ == "__main__":
    try:
        main()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
