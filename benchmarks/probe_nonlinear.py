"""Is test accuracy missing from the autoencoder's embedding, or only from a linear read of it? One run.

python -m benchmarks.probe_nonlinear [--checkpoint runs/autoencoder/autoencoder.safetensors]

The same embeddings, targets and folds as `vitzoo probe` (5-fold cross-validation grouped by model): its linear
ridge probe beside an RBF kernel ridge probe whose alpha and gamma are chosen by an inner 3-fold search on each
training fold, and beside the same linear probe on every token latent (all T x k of them and the log scale, before
any pooling into the embedding). Prints held-out R2 for all three.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.kernel_ridge import KernelRidge
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vitzoo.generative.hyper import BUNDLED_AUTOENCODER, embeddings, load_autoencoder
from vitzoo.generative.probe import cross_validated, targets


def kernel_probe_r2(features: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    grid = {"alpha": np.logspace(-3, 1, 5), "gamma": np.logspace(-3, 0, 4)}
    predictions = np.empty(len(y))
    for train, test in GroupKFold(n_splits=5).split(features, y, groups):
        model = make_pipeline(StandardScaler(), GridSearchCV(KernelRidge(kernel="rbf"), grid, cv=3))
        model.fit(features[train], y[train])
        predictions[test] = model.predict(features[test])
    return r2_score(y, predictions)


@torch.no_grad()
def token_latents(bundle, batch: int = 64) -> np.ndarray:
    """[n, W * T * k + 1] every checkpoint's token latents of every window, flattened, and its log10 delta scale."""
    tokens = bundle.data.tokens
    latents = [bundle.model.encode_model(tokens[i : i + batch]).flatten(1) for i in range(0, len(tokens), batch)]
    return torch.cat([torch.cat(latents), bundle.data.scales.log10()[:, None]], dim=1).double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=BUNDLED_AUTOENCODER, help="an autoencoder (default: the shipped)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_autoencoder(args.checkpoint)
    features = embeddings(bundle).double().numpy()
    groups = np.array([e.model_id for e in bundle.data.entries])
    _, y = targets(bundle)["test accuracy"]
    linear, _ = cross_validated(features, "regression", y, groups)
    print(f"test accuracy from the embedding of {args.checkpoint}, {len(y)} checkpoints, held-out R2:")
    print(f"  linear ridge (vitzoo probe): {linear:.3f}")
    print(f"  RBF kernel ridge           : {kernel_probe_r2(features, y, groups):.3f}")
    sequence, _ = cross_validated(token_latents(bundle), "regression", y, groups)
    print(f"  linear ridge on all token latents (before pooling): {sequence:.3f}")


if __name__ == "__main__":
    main()
