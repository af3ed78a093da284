"""Rehearsal stand-in for prom/statsd-exporter (not packaged by Debian 12): receives StatsD
over UDP and serves what it received on /metrics in the Prometheus text format. It does not
apply the mapping file (monitoring/statsd-mapping.yml): only that metrics flow is rehearsed.

    statsd-stand-in [--statsd.listen-udp=:9125] [--web.listen-address=:9102] [other flags ignored]
"""

import http.server
import re
import socket
import sys
import threading

udp_port, web_port = 9125, 9102
for arg in sys.argv[1:]:
    if arg.startswith("--statsd.listen-udp="):
        udp_port = int(arg.rsplit(":", 1)[1])
    elif arg.startswith("--web.listen-address="):
        web_port = int(arg.rsplit(":", 1)[1])

lock = threading.Lock()
received: dict[str, float] = {}
packets = 0


def receive() -> None:
    global packets
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", udp_port))
    while True:
        data, _ = sock.recvfrom(65535)
        with lock:
            packets += 1
            for line in data.decode(errors="replace").splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                try:
                    number = float(value)
                except ValueError:
                    continue
                key = re.sub(r"[^a-zA-Z0-9_]", "_", name)
                received[key] = received.get(key, 0.0) + number if kind.startswith("c") else number


class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with lock:
            lines = [f"statsd_stand_in_packets_total {packets}"]
            lines += [f"statsd_{k} {v}" for k, v in sorted(received.items())]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


threading.Thread(target=receive, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", web_port), Metrics).serve_forever()
