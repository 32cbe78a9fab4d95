"""The slider scenario through the kiosk's JSON API: does the top match look like the garment?

    python benchmarks/slider_api.py [--bundle DIR] [--queries 1000] [--range 5]

Starts `make_server` on 127.0.0.1 (a free port), POSTs /api/nearest {"z", "k": 1, "by"} for
z uniform in [-a, a]^d and at the corners {-a, a}^d (the z of `vae-eval`'s slider scenario,
same seed), and prints the median [quartiles] Pearson correlation between decode(z) and the
top item's real catalog image, per match mode, and whether every answer equals the library's
Runtime.nearest. Needs the Fashion-MNIST training images (the shipped catalog).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading

import numpy as np

from vae_edge.evaluation.report import pixel_correlation, slider_queries
from vae_edge.runtime import Runtime
from vae_edge.runtime.server import make_server
from vae_edge.training.data import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: shipped)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--range", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rt = Runtime.load(args.bundle)
    # A Fashion-MNIST bundle's ids are row numbers of its split: the item's real photo.
    catalog = load_split("train").images[rt.index.ids.astype(np.int64)]
    server = make_server(rt, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        queries = slider_queries(rt.latent_dim, args.queries, args.range, args.seed)
        for source in ("uniform", "corners"):
            z = queries[source]
            decoded = rt.decode(z)
            for by in ("latent", "decoded"):
                ids, rows = [], []
                for vector in z:
                    connection.request("POST", "/api/nearest",
                                       json.dumps({"z": vector.tolist(), "k": 1, "by": by}),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = json.loads(response.read())
                    if response.status != 200:
                        raise SystemExit(f"HTTP {response.status}: {payload}")
                    ids.append(payload["results"][0]["id"])
                    rows.append(payload["results"][0]["row"])
                same = ids == rt.nearest(z, k=1, by=by).ids[:, 0].tolist()
                correlation = pixel_correlation(decoded, catalog[rows])
                q25, median, q75 = np.quantile(correlation, [0.25, 0.5, 0.75])
                print(f"{source:<8} by {by:<8} median {median:.3f} [{q25:.3f}, {q75:.3f}] "
                      f"over {len(z)} z; ids equal the library's: {same}")
    finally:
        connection.close()
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
