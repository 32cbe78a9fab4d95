"""Print the API example of docs/kiosk.md: a nearest request for z = 0 and the shipped model's
answer, asked of a real `vae-run serve` server over HTTP.

    python docs/kiosk_api_example.py [--bundle DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import textwrap
import threading


def example(bundle=None) -> str:
    """The example block: the curl command and the answer, wrapped at 100 columns."""
    from vae_edge.runtime import Runtime
    from vae_edge.runtime.server import make_server

    runtime = Runtime.load(bundle)
    server = make_server(runtime, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"z": [0] * runtime.latent_dim, "k": 2, "by": "decoded"}
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request("POST", "/api/nearest", json.dumps(body))
        answer = connection.getresponse().read().decode()
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    command = f"$ curl -s -d '{json.dumps(body)}' http://127.0.0.1:8000/api/nearest"
    pretty = json.dumps(json.loads(answer), separators=(", ", ": "))
    return command + "\n" + textwrap.fill(pretty, width=100, break_long_words=False,
                                          break_on_hyphens=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="default: the shipped model")
    print(example(parser.parse_args(argv).bundle))


if __name__ == "__main__":
    main()
