"""--metrics-bind: Prometheus metrics of the whole server (README "Monitoring").

The test does known things (logins that work, fail, fail temporarily and are
throttled; messages accepted and rejected; a connection over the limit),
scrapes /metrics with curl while sessions are open, and checks every count.
"""

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PASSWORD, USER, free_port, plain_token, wait_until


def scrape(port) -> dict:
    """{(sample name, labels as a sorted tuple): value} from curl's GET /metrics."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (.ci/run installs it)")
    out = subprocess.run([curl, "-fsS", f"http://127.0.0.1:{port}/metrics"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    samples = {}
    for family in text_string_to_metric_families(out.stdout.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def traffic(srv, port):
    """What the metrics must then show; returns two sessions still open."""
    for sender in ("a@example.org", "b@example.org", "exit1@example.org"):
        raw = srv.raw()
        raw.login(srv.tls_context())
        raw.send_message(body=b"Subject: m\r\n\r\n" + b"x" * 100 + b"\r\n", sender=sender)
        raw.cmd("QUIT")
        raw.close()
    raw = srv.raw()
    raw.hello(srv.tls_context())
    assert raw.cmd(f"AUTH PLAIN {plain_token('tempfail', PASSWORD)}")[0] == 454
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, 'wrong')}")[0] == 535
    assert raw.cmd(f"AUTH PLAIN {plain_token(USER, PASSWORD)}")[0] == 421  # throttled
    raw.close()
    # Every slot free again before the per-address limit of 2 is tried.
    assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 0, timeout=10)
    held = []
    for _ in range(2):
        raw = srv.raw()
        assert raw.reply()[0] == 220
        held.append(raw)
    refused = srv.raw()
    assert refused.reply()[0] == 421  # the per-address limit of 2
    refused.close()
    return held


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_what_happened(make_server, workers):
    """README "Monitoring": every SPEC metric, scraped during traffic, matches what the
    test did, with one process and summed over workers."""
    port = free_port()
    srv = make_server("--metrics-bind", f"127.0.0.1:{port}", "--workers", str(workers),
                      "--max-auth-failures-per-ip", "1", "--max-connections-per-ip", "2")
    if workers > 1:
        assert wait_until(lambda: srv.log().count("accepting on") == workers)
    base = scrape(port)
    probes = value(base, "ssmtpd_connections_total", result="accepted")  # the harness's
    held = traffic(srv, port)
    try:
        # The last session's end is recorded after its client saw the close.
        assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 2, timeout=10)
        m = scrape(port)
        assert value(m, "ssmtpd_connections_total", result="accepted") == probes + 6
        assert value(m, "ssmtpd_connections_total", result="max-connections-per-ip") == 1
        assert value(m, "ssmtpd_auth_total", result="ok") == 3
        assert value(m, "ssmtpd_auth_total", result="invalid") == 1
        assert value(m, "ssmtpd_auth_total", result="tempfail") == 1
        assert value(m, "ssmtpd_auth_total", result="throttled") == 1
        assert value(m, "ssmtpd_messages_total", code="250") == 2
        assert value(m, "ssmtpd_messages_total", code="554") == 1
        # Each message: the 106 octets sent, plus the Received header.
        assert 3 * 106 < value(m, "ssmtpd_message_bytes_total") < 3 * 106 + 3 * 300
        assert value(m, "ssmtpd_auth_program_seconds_count") == 5
        assert value(m, "ssmtpd_process_program_seconds_count") == 3
        assert value(m, "ssmtpd_process_program_seconds_bucket", le="+Inf") == 3
    finally:
        for raw in held:
            raw.close()
    assert wait_until(lambda: value(scrape(port), "ssmtpd_sessions") == 0, timeout=10)


def test_metrics_port_in_use_is_a_start_up_error(tmp_path, certs):
    """README "Configuration": a --metrics-bind that cannot be bound: one line, exit 2."""
    import socket
    from conftest import ServerProcess
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = ServerProcess(str(tmp_path), certs, ["--metrics-bind", f"127.0.0.1:{port}"])
        result = subprocess.run(srv.argv, env=srv.env, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"ssmtpd: --metrics-bind: cannot listen on 127.0.0.1 port {port}: Address already in use"]
