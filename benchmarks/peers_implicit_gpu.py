"""implicit's ALS and recforge's side by side on the 20M synthetic set of ``bench_scale.py``, on one GPU.

Usage (the GPU check's ``implicit`` part installs the peer from ``.whl-implicit/``, see docs/gpu.md)::

    python benchmarks/peers_implicit_gpu.py                       # 200k users × 50k items, 20M interactions
    python benchmarks/peers_implicit_gpu.py --n-users 20000 --n-items 5000 --n-interactions 1000000

Same data and split as ``bench_scale.py`` (the 'random' protocol's 80/20, seed 0). Both models: 64 factors, 15
iterations of conjugate-gradient steps (3 a row); implicit on the binary matrix with its own defaults
(regularization 0.01, alpha 1), recforge's ALS with its defaults. Fit seconds are wall-clock around ``fit`` (implicit's
includes building its binary matrix, as recforge's includes its own preparation) and the copy of the factors to
the CPU, after one warm-up fit of one iteration each (CUDA contexts, kernels loaded);
both models' factors are then ranked by recforge's evaluator for the same ``--eval-users`` test users (full
catalogue, seen items excluded). implicit runs on the GPU when its ``implicit.gpu.HAS_CUDA`` (its wheel's CUDA
kernels load only with RMM and CUDA 13's runtime, which torch's CUDA 13 wheels bring), else on the CPU, and the
table says which and why. Results: ``--out`` (JSON), and the ratio line recforge/implicit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import add_size_arguments, sampled_test, synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="implicit's CPU threads when it has no CUDA (0: all)")
    p.add_argument("--out", default=str(HERE / "results" / "implicit_gpu.json"))
    args = p.parse_args()

    import torch  # first: its CUDA 13 libraries (cuBLAS, cuRAND, the runtime) are what implicit's kernels link to

    from recforge.core.device import resolve_device
    from recforge.evaluation import evaluate, get_protocol
    from recforge.models import create_model
    from recforge.models.factors import FactorModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import implicit
            import implicit.gpu
            from implicit.als import AlternatingLeastSquares
            from threadpoolctl import threadpool_limits
    except (ImportError, OSError, RuntimeError) as exc:  # a CUDA library that fails to load raises OSError
        sys.exit(f"implicit could not be imported: {type(exc).__name__}: {exc}")
    why = "; ".join(str(w.message) for w in caught) or "implicit.gpu.HAS_CUDA is false (RMM or CUDA 13 missing)"

    class PeerFactors(FactorModel):
        """A peer's factors, scored and ranked by recforge's own code (on the GPU when present)."""

        def fit_from(self, train, user_factors: np.ndarray, item_factors: np.ndarray) -> PeerFactors:  # type: ignore[no-untyped-def]
            self.user_map_, self.item_map_ = train.user_map, train.item_map
            self.seen_ = binary(train)
            self.user_factors_ = np.ascontiguousarray(user_factors, np.float32)
            self.item_factors_ = np.ascontiguousarray(item_factors, np.float32)
            return self

    def binary(inter) -> sp.csr_matrix:  # type: ignore[no-untyped-def]
        x = inter.csr("ones").astype(np.float32)
        x.data[:] = 1.0
        return x

    device = resolve_device("auto")
    gpu = implicit.gpu.HAS_CUDA
    where = "GPU" if gpu else f"CPU ({why})"
    print(f"implicit {implicit.__version__} on the {where}; recforge's ALS on {device}", flush=True)
    data = synthetic(args.n_users, args.n_items, args.n_interactions)
    (split,) = get_protocol("random").splits(data, seed=0)
    test = sampled_test(split, args.eval_users)

    def fit_implicit(iterations: int) -> tuple[np.ndarray, np.ndarray]:
        kw = {} if gpu else {"num_threads": args.threads}
        model = AlternatingLeastSquares(factors=64, iterations=iterations, random_state=0, use_gpu=gpu, **kw)
        with threadpool_limits(1, "blas"):  # implicit's CPU solver threads itself, and asks for this
            model.fit(binary(split.train), show_progress=False)  # its matrix built inside the time, as ours is
        model = model.to_cpu() if gpu else model
        return model.user_factors, model.item_factors

    def fit_ours(epochs: int):  # type: ignore[no-untyped-def]
        return create_model("als", n_factors=64, epochs=epochs, progress=False).fit(split.train)

    rows, timings = [], []
    for name, fit in (("implicit ALS", fit_implicit), ("recforge ALS", fit_ours)):
        fit(1)  # warm-up
        t = time.perf_counter()
        fitted = fit(15)
        seconds = time.perf_counter() - t
        model = PeerFactors().fit_from(split.train, *fitted) if name.startswith("implicit") else fitted
        res = evaluate(model, test, k=10)
        rows.append({"model": name, "where": where if name.startswith("implicit") else str(device),
                     "fit seconds": round(seconds, 3), "ndcg@10": round(res["ndcg@10"], 4),
                     "hr@10": round(res["hr@10"], 4)})
        timings.append(seconds)
        print(rows[-1], flush=True)
    ratio = timings[1] / max(timings[0], 1e-9)  # above 1: recforge is the slower
    print(f"fit seconds, 64 factors, 15 iterations: recforge {rows[1]['fit seconds']:.2f}, implicit "
          f"{rows[0]['fit seconds']:.2f} ({where}): recforge/implicit = {ratio:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "device": str(device),
                               "gpu name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                               "rows": rows, "recforge/implicit": round(ratio, 3)}, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
