"""The evaluation's pictures, drawn with matplotlib (Agg, no display needed).

matplotlib is in the `train` extra: the pictures are made where a model is trained and
evaluated, never on the kiosk, whose runtime stays numpy + onnxruntime + Pillow. prior_grid
needs no matplotlib: `vae-eval --catalog` writes its grid with Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAVERSAL_VALUES = np.linspace(-3.0, 3.0, 9)
PRIOR_GRID = 8
PROJECTION_POINTS = 10000
QUERY_NEIGHBOURS = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name


def _tile(images: np.ndarray, rows: int, columns: int, pad: int = 2) -> np.ndarray:
    """(rows*columns, [C,] h, w) in [0, 1] -> one float canvas ([C,] H, W) with grey gutters."""
    h, w = images.shape[-2:]
    canvas = np.full(images.shape[1:-2] + (rows * (h + pad) + pad, columns * (w + pad) + pad),
                     0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[..., pad + r * (h + pad) : pad + r * (h + pad) + h,
               pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return canvas


def loss_curves(path: Path, history: list[dict]) -> str:
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train -ELBO (z sampled)")
    left.plot(epochs, [r["test_loss"] for r in history], "s-", label="test recon@mu + KL")
    left.plot(epochs, [r["test_recon"] for r in history], "^--", label="test recon@mu")
    left.set_xlabel("epoch")
    left.set_ylabel("nats / image")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(epochs, [r["train_kl"] for r in history], "o-", label="train KL")
    right.plot(epochs, [r["test_kl"] for r in history], "s-", label="test KL")
    right.set_xlabel("epoch")
    right.set_ylabel("KL, nats / image")
    right.grid(alpha=0.3)
    beta_axis = right.twinx()
    beta_axis.plot(epochs, [r["beta"] for r in history], ":", color="grey", label="beta (right)")
    beta_axis.set_ylabel("beta (weight of KL in training)")
    beta_axis.set_ylim(bottom=0)
    lines = right.get_legend_handles_labels()
    extra = beta_axis.get_legend_handles_labels()
    right.legend(lines[0] + extra[0], lines[1] + extra[1], loc="lower right")
    fig.suptitle("Training curves")
    return _save(fig, path)


def traversal(path: Path, rt, variances: np.ndarray) -> str:
    """One row per latent dimension, most active first, from -3 to +3; the others at 0."""
    plt = _pyplot()
    d = rt.latent_dim
    order = np.argsort(-variances, kind="stable")
    z = np.zeros((d, len(TRAVERSAL_VALUES), d))
    for row, dim in enumerate(order):
        z[row, :, dim] = TRAVERSAL_VALUES
    images = rt.decode(z.reshape(-1, d)).reshape(d * len(TRAVERSAL_VALUES), 28, 28)
    canvas = _tile(images, d, len(TRAVERSAL_VALUES))
    fig, ax = plt.subplots(figsize=(len(TRAVERSAL_VALUES) * 0.75 + 1.5, d * 0.75 + 0.8))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([2 + 30 * r + 14 for r in range(d)])
    ax.set_yticklabels([f"z{dim} (var {variances[dim]:.2f})" for dim in order], fontsize=7)
    ax.set_xticks([2 + 30 * c + 14 for c in range(len(TRAVERSAL_VALUES))])
    ax.set_xticklabels([f"{v:+.1f}" for v in TRAVERSAL_VALUES], fontsize=7)
    ax.set_title("Latent traversal: one dimension from -3 to +3, the others at 0\n"
                 "(rows ordered by variance of mu over the test set)", fontsize=9)
    return _save(fig, path)


def prior_grid(rt, seed: int) -> np.ndarray:
    """decoder.onnx's decodes of PRIOR_GRID^2 z ~ N(0, I) drawn with `seed`, tiled into one
    (C, H, W) canvas in [0, 1]: numpy only, so a catalog report can write it with Pillow."""
    return _tile(rt.decode(rt.sample_prior(PRIOR_GRID * PRIOR_GRID, seed=seed)),
                 PRIOR_GRID, PRIOR_GRID)


def prior_samples(path: Path, rt, seed: int) -> str:
    plt = _pyplot()
    canvas = prior_grid(rt, seed)
    fig, ax = plt.subplots(figsize=(6.5, 6.8))
    ax.imshow(canvas[0] if len(canvas) == 1 else canvas.transpose(1, 2, 0), cmap="gray",
              vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"Decoded samples z ~ N(0, I) (seed {seed}), decoder.onnx", fontsize=9)
    return _save(fig, path)


def projection(path: Path, rt, seed: int) -> str:
    """PCA of the catalog's mu (float16 index) to 2-D, coloured by class."""
    plt = _pyplot()
    mu = rt.index.mu.astype(np.float64)
    labels = rt.index.labels
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(mu))[: PROJECTION_POINTS])
    centred = mu - mu.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / max(float((singular**2).sum()), 1e-300)
    xy = centred[pick] @ vt[:2].T
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(rt.label_names):
        sel = labels[pick] == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=2, alpha=0.5, color=cmap(c % 10), label=name)
    ax.legend(markerscale=6, fontsize=7, loc="best")
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)" if len(explained) > 1 else "PC 2")
    ax.set_title(f"Catalog mu, PCA to 2-D ({len(pick)} of {len(mu)} items)", fontsize=9)
    return _save(fig, path)


def query_sheet(path: Path, rt, test_images, test_labels, rows, catalog_images, title: str) -> str:
    """The first test image of each class, then its nearest catalog items (red: other class)."""
    plt = _pyplot()
    names = rt.label_names
    queries = [int(np.flatnonzero(test_labels == c)[0]) for c in range(len(names))
               if (test_labels == c).any()]
    k = min(QUERY_NEIGHBOURS, rows.shape[1])
    fig, axes = plt.subplots(len(queries), k + 1, figsize=((k + 1) * 1.05, len(queries) * 1.2),
                             squeeze=False)
    cat_labels = rt.index.labels
    for r, q in enumerate(queries):
        axes[r, 0].imshow(test_images[q], cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_title(f"query: {names[test_labels[q]][:11]}", fontsize=6, color="blue")
        for j in range(k):
            row = rows[q, j]
            ax = axes[r, j + 1]
            ax.imshow(catalog_images[row], cmap="gray", vmin=0, vmax=255)
            ok = cat_labels[row] == test_labels[q]
            ax.set_title(names[cat_labels[row]][:11], fontsize=6, color="black" if ok else "red")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def slider_sheet(path: Path, rt, slider_tops: dict, catalog_images, per_source: int = 4) -> str:
    """For a few z of each slider source: decode(z), then the top item's catalog image by the
    latent and by the decoded match mode."""
    plt = _pyplot()
    names = rt.label_names
    columns = [("decoded z", None), ("match by latent", "latent"),
               ("match by decoded", "decoded")]
    lines = [(source, i) for source in slider_tops for i in range(per_source)]
    fig, axes = plt.subplots(len(lines), 3, figsize=(3 * 1.3, len(lines) * 1.35),
                             squeeze=False)
    for r, (source, i) in enumerate(lines):
        z, rows = slider_tops[source]
        for c, (title, by) in enumerate(columns):
            ax = axes[r, c]
            if by is None:
                ax.imshow(rt.decode(z[i])[0], cmap="gray", vmin=0, vmax=1)
                ax.set_ylabel(source, fontsize=6)
                ax.set_title(title, fontsize=6, color="blue")
            else:
                row = rows[by][i]
                ax.imshow(catalog_images[row], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{title}: {names[rt.index.labels[row]][:10]}", fontsize=5)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Slider z: the decoded garment and the top catalog item by each mode",
                 fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def draw_all(out: Path, *, rt, history, test_images, test_labels, rows, pixel_rows,
             catalog_images, variances, seed: int, slider_tops: dict | None = None) -> dict:
    """Every picture into `out`; returns {what: file name} (loss curves need a history)."""
    made = {}
    if history:
        made["loss_curves"] = loss_curves(out / "loss_curves.png", history)
    made["traversal"] = traversal(out / "traversal.png", rt, variances)
    made["prior_samples"] = prior_samples(out / "prior_samples.png", rt, seed)
    made["projection"] = projection(out / "latent_pca.png", rt, seed)
    made["query_sheet"] = query_sheet(
        out / "query_sheet.png", rt, test_images, test_labels, rows, catalog_images,
        "Test queries (left) and their most likely catalog items, rt.nearest(mu)")
    if pixel_rows is not None:
        made["query_sheet_pixels"] = query_sheet(
            out / "query_sheet_pixels.png", rt, test_images, test_labels, pixel_rows,
            catalog_images, "Baseline: the same queries, nearest catalog items by raw-pixel L2")
    if slider_tops:
        made["slider_sheet"] = slider_sheet(out / "slider_sheet.png", rt, slider_tops,
                                            catalog_images)
    return made
