"""A fake Kubernetes API for tests/images (no cluster exists here): enough for Airflow's
KubernetesExecutor to start: /version, empty pod lists, and pod watches that stay open with
no events. It launches nothing; task pods are what only a real cluster shows.

    python fake_kube_api.py PORT
"""

import http.server
import json
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/api":
            self._json(200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": []})  # fmt: skip
        elif path == "/apis":
            self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif path == "/api/v1":
            verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "watch"]
            resources = [
                {"name": n, "singularName": n[:-1], "namespaced": True, "kind": k, "verbs": verbs}
                for n, k in (("pods", "Pod"), ("events", "Event"), ("configmaps", "ConfigMap"))
            ]
            self._json(200, {"kind": "APIResourceList", "groupVersion": "v1",
                             "resources": resources})  # fmt: skip
        elif path == "/version":
            self._json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"})
        elif "watch=true" in query.lower() or "watch=1" in query:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            time.sleep(30)  # no events; the client re-watches
            self.wfile.write(b"0\r\n\r\n")
        elif path.endswith(("/pods", "/events", "/configmaps")):
            self._json(200, {"kind": "List", "apiVersion": "v1", "items": [],
                             "metadata": {"resourceVersion": "1"}})  # fmt: skip
        else:
            self._json(404, {"kind": "Status", "status": "Failure", "code": 404})

    def log_message(self, format: str, *args: object) -> None:
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
