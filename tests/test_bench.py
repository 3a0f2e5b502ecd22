"""The benchmark in bench/ still runs end to end (a tool run by hand; this only
checks that it works, on a load far too small to mean anything)."""

import os
import re
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
# The runs take under 30 s here; a busy machine can take several times that.
DEADLINE = 300


def _run_tiny(out_path: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, RUN, "--rounds", "1", "--concurrency", "2", "--sessions", "20",
            "--latency-sessions", "5", "--idle", "20", "--big-size", "1048576",
            "--big-count", "2", "--warmup", "4", "--deadline", "60", "--out", out_path]
    # Own session: on a timeout the servers and load workers go down with the runner.
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"bench/run.py still running after {DEADLINE}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _table(text: str, header_start: str):
    """Rows (lists of cells) of the markdown table whose header starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


NUMBER = re.compile(r"^\d+(\.\d+)?( ms| KiB| MiB)?$")


def test_benchmark_runs_end_to_end_on_a_tiny_load(tmp_path):
    """bench/README.md: one command measures every server and writes the results table
    (go-smtp only where Go and the go-smtp packages are installed)."""
    out_path = tmp_path / "RESULTS.md"
    result = _run_tiny(str(out_path))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out_path.read_text()
    assert text == result.stdout

    with_go = "go-smtp: not measured" not in text
    summary = _table(text, "| load |")
    figures = [row[1] for row in summary]
    assert figures == ["messages/s", "messages/s",
                       "server CPU ms/message (all processes, excluding the programs)",
                       "session p50 latency", "RSS added per connection",
                       "peak RSS above idle baseline"]
    for i, row in enumerate(summary):
        load, figure, ssmtpd, go, aiosmtpd, ratio, go_ratio, target, met = row
        assert NUMBER.match(ssmtpd), (figure, ssmtpd)
        assert NUMBER.match(aiosmtpd), (figure, aiosmtpd)
        assert re.match(r"^\d+\.\d+×$", ratio), (figure, ratio)
        if with_go and i != 1:  # the second line is ssmtpd --workers 2 alone
            assert NUMBER.match(go), (figure, go)
            assert re.match(r"^\d+\.\d+×$", go_ratio), (figure, go_ratio)
        else:
            assert go == go_ratio == "—", row
        assert met in ("yes", "**no**")

    servers = ["ssmtpd", "ssmtpd --workers 2"] + (["go-smtp"] if with_go else []) + ["aiosmtpd"]
    rounds = _table(text, "| round |")
    assert [row[1] for row in rounds] == servers
    for row in rounds:
        assert float(row[2]) > 0, row  # messages/s
        assert row[-1] == "none", f"{row[1]} had failures: {row[-1]}"

    cpu = _table(text, "| server | server own")
    assert [row[0] for row in cpu] == servers
    for row in cpu:
        assert all(re.match(r"^\d+\.\d+$", cell) for cell in row[1:]), row
    assert "machine:" in text and "versions:" in text and "aiosmtpd 1." in text


def test_logins_mode_runs_end_to_end_on_a_tiny_load(tmp_path):
    """bench/README.md "Logins": the --logins mode measures logins without a message,
    with the scrypt auth program, on ssmtpd with and without the auth cache (and
    go-smtp where installed), and writes its own section, keeping the file's rest."""
    out_path = tmp_path / "RESULTS.md"
    out_path.write_text("# Benchmark results\n\nthe four loads' tables\n")
    argv = [sys.executable, RUN, "--logins", "--rounds", "1", "--concurrency", "2",
            "--sessions", "6", "--warmup", "2", "--deadline", "60", "--out", str(out_path)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE,
                            start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out_path.read_text()
    assert text.startswith("# Benchmark results\n\nthe four loads' tables\n\n## Logins")
    assert text.endswith(result.stdout)
    with_go = "go-smtp: not measured" not in text
    servers = ["ssmtpd", "ssmtpd --auth-cache-ttl 300",
               "ssmtpd --workers 2 --auth-cache-ttl 300"] + (["go-smtp"] if with_go else [])
    summary = _table(text, "| server | sessions/s")
    assert [row[0] for row in summary] == servers
    for row in summary:
        assert all(NUMBER.match(cell) for cell in row[1:]), row
    # Answered from the cache, no program ran: the cached servers' programs took no CPU.
    programs_cpu = {row[0]: float(row[-1]) for row in summary}
    assert programs_cpu["ssmtpd --auth-cache-ttl 300"] == 0.0
    assert programs_cpu["ssmtpd"] > 0.0
    rounds = _table(text, "| round |")
    assert [row[1] for row in rounds] == servers
    assert all(row[-1] == "none" for row in rounds), rounds


def test_a_full_run_keeps_the_logins_section(tmp_path, monkeypatch):
    """bench/README.md: the four loads' report replaces its part of the file only."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import run
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nold tables\n\n" + run.LOGINS_HEADING + "\n\nlogins\n")
    run.publish("# Benchmark results\n\nnew tables\n", str(out))
    assert out.read_text() == \
        "# Benchmark results\n\nnew tables\n\n" + run.LOGINS_HEADING + "\n\nlogins\n"
    run.publish(run.LOGINS_HEADING + "\n\nnew logins\n", str(out), section=True)
    assert out.read_text() == \
        "# Benchmark results\n\nnew tables\n\n" + run.LOGINS_HEADING + "\n\nnew logins\n"


INSTRUCTIONS = os.path.join(ROOT, "bench", "instructions.py")


def test_instruction_counts_under_callgrind():
    """bench/README.md "Instruction counts": a session's user-space instructions, split by
    library; the handshake puts libcrypto in it, the dialogue libpython."""
    argv = [sys.executable, INSTRUCTIONS, "--sessions", "2"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    m = re.match(r"ssmtpd at .*: ([\d,]+) user-space instructions per session \(2 measured\)$",
                 lines[0])
    assert m, result.stdout
    per_session = int(m.group(1).replace(",", ""))
    # A full session with a TLS handshake is millions of instructions; nothing
    # counted, or the warm-up counted too, would be far off either way.
    assert 1_000_000 < per_session < 50_000_000, per_session
    objects = [line.split()[-1] for line in lines[1:]]
    assert any(o.startswith("libcrypto") for o in objects), result.stdout
    # The interpreter: a shared libpython, or the python3.X binary itself where
    # it is linked statically (Debian's).
    assert any(o.startswith(("libpython", "python3")) for o in objects), result.stdout


def test_state_cost_runs_on_a_tiny_load():
    """bench/README.md "What --state costs": one round each way against a local
    redis-server, every message accepted, both figures printed."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "state_cost.py"),
                             "--rounds", "1", "--sessions", "60", "--concurrency", "10"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"counts in the process: \d+\.\d+ ms server CPU per message\n",
                     result.stdout), result.stdout
    assert re.search(r"counts in Redis \(--state\): \d+\.\d+ ms \(\+-?\d+\.\d+ ms, x\d+\.\d+\); "
                     r"Redis itself \d+\.\d+ ms", result.stdout), result.stdout
    assert result.stdout.count(", 60 accepted") == 2, result.stdout


def test_upgrade_pause_runs_on_a_tiny_load():
    """bench/README.md "What an upgrade costs": one round of each layout, every
    connection greeted, both rows printed."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "upgrade_pause.py"),
                             "--rounds", "1", "--clients", "2", "--seconds", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = re.findall(r"^(one process|--workers 2) .* (\d+) +(\d+)$", result.stdout, re.M)
    assert [(layout, failed) for layout, _, failed in rows] == [
        ("one process", "0"), ("--workers 2", "0")], result.stdout
    assert all(int(connections) > 0 for _, connections, _ in rows), result.stdout
