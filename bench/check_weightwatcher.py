"""Block-mean heavy-tail alpha on the embedded model: layerif against WeightWatcher 0.7.7's fits.

Compares, per decoder block, the mean over its projections of layerif's alpha (AlphaPruning's
``xmin_peak`` Hill estimator, ``layerif.spectral``) with WeightWatcher's ``fit_powerlaw`` with
``fix_fingers="xmin_peak"`` and with its default fit. Prints JSON: the largest block difference and the
Spearman correlation over blocks for each fit. Needs ``pip install weightwatcher==0.7.7`` (optional).

    python bench/check_weightwatcher.py [--model NAME_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from layerif.models import find_blocks, iter_projections, load_model, weight_out_in
from layerif.spectral import esd, hill_alpha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="hub name or local folder (default: embedded SmolLM2-135M)")
    a = ap.parse_args()

    import numpy as np
    import weightwatcher as ww  # optional: only the check itself needs it
    from scipy.stats import spearmanr

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    t = time.time()
    model = load_model(a.model).model
    _, blocks = find_blocks(model)
    w = ww.WeightWatcher()
    per = {k: [[] for _ in blocks] for k in ("layerif", "ww_xmin_peak", "ww_default")}
    for p in iter_projections(model):
        ev = esd(weight_out_in(p.module))
        fits = (hill_alpha(ev), w.fit_powerlaw(ev, plot=False, fix_fingers="xmin_peak", pl_package="powerlaw")[0],
                w.fit_powerlaw(ev, plot=False, pl_package="powerlaw")[0])
        for k, v in zip(per, fits):
            if np.isfinite(v) and v != -1:
                per[k][p.block].append(v)
    m = {k: np.array([np.mean(x) for x in v]) for k, v in per.items()}
    out = {"max_abs_diff_xmin_peak": float(np.max(np.abs(m["layerif"] - m["ww_xmin_peak"]))),
           "spearman_xmin_peak": float(spearmanr(m["layerif"], m["ww_xmin_peak"])[0]),
           "max_abs_diff_default": float(np.max(np.abs(m["layerif"] - m["ww_default"]))),
           "spearman_default": float(spearmanr(m["layerif"], m["ww_default"])[0]),
           "blocks": {k: v.round(4).tolist() for k, v in m.items()}, "seconds": time.time() - t}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
