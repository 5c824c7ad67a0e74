"""Block-mean heavy-tail alpha on the embedded model: layerif against WeightWatcher 0.7.7's fits.

Compares, per decoder block, the mean over its projections of layerif's alpha (AlphaPruning's
``xmin_peak`` Hill estimator, ``layerif.spectral``) with WeightWatcher's ``fit_powerlaw`` with
``fix_fingers="xmin_peak"`` and with its default fit. Prints JSON: the largest block difference and the
Spearman correlation over blocks for each fit. Needs ``pip install weightwatcher==0.7.7`` (optional).

    python bench/check_weightwatcher.py
"""
import logging, time, json
import numpy as np
from scipy.stats import spearmanr
import weightwatcher as ww
from layerif.models import load_model, find_blocks, iter_projections, weight_out_in
from layerif.spectral import esd, hill_alpha
logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
t = time.time()
lm = load_model()
model = lm.model
_, blocks = find_blocks(model)
w = ww.WeightWatcher()
per = {k: [[] for _ in blocks] for k in ("layerif", "ww_xmin_peak", "ww_default")}
for p in iter_projections(model):
    ev = esd(weight_out_in(p.module))
    a = hill_alpha(ev)
    b = w.fit_powerlaw(ev, plot=False, fix_fingers="xmin_peak", pl_package="powerlaw")[0]
    c = w.fit_powerlaw(ev, plot=False, pl_package="powerlaw")[0]
    for k, v in zip(per, (a, b, c)):
        if np.isfinite(v) and v != -1:
            per[k][p.block].append(v)
m = {k: np.array([np.mean(x) for x in v]) for k, v in per.items()}
out = {"max_abs_diff_xmin_peak": float(np.max(np.abs(m["layerif"] - m["ww_xmin_peak"]))),
       "spearman_xmin_peak": float(spearmanr(m["layerif"], m["ww_xmin_peak"])[0]),
       "max_abs_diff_default": float(np.max(np.abs(m["layerif"] - m["ww_default"]))),
       "spearman_default": float(spearmanr(m["layerif"], m["ww_default"])[0]),
       "blocks": {k: v.round(4).tolist() for k, v in m.items()}, "seconds": time.time() - t}
print(json.dumps(out, indent=1))
