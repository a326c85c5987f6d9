"""benchmarks/anyres.py's task: its labels name the stripes' real direction, and its grating is
absent from one 64 px view but plain in AnyRes's tiles (else the benchmark measures nothing)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "anyres.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("anyres_benchmark", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# One step along the stripes, (dx, dy) with image y pointing down.
ALONG = {"vertical": (0, 1), "horizontal": (1, 0), "rising": (1, -1), "falling": (1, 1)}


@pytest.mark.parametrize("way", sorted(ALONG))
def test_label_is_the_stripes_direction(bench, way):
    s = bench.draw(random.Random(0), way)
    s["period"], s["contrast"] = 24.0, 60.0  # coarse and strong, so steps along the stripes change least
    g = np.asarray(bench.render(s), np.float32)[4:-4, 4:-4]

    def change(dx, dy):
        a = g[max(dy, 0):g.shape[0] + min(dy, 0), max(dx, 0):g.shape[1] + min(dx, 0)]
        b = g[max(-dy, 0):g.shape[0] + min(-dy, 0), max(-dx, 0):g.shape[1] + min(-dx, 0)]
        return float(np.abs(a - b).mean())

    assert min(ALONG, key=lambda w: change(*ALONG[w])) == way


def test_single_view_holds_no_grating_while_tiles_do(bench):
    check = bench.signal_check(8)
    single, tiles = check["single view"], check["anyres tiles"]
    assert single["grating_rms"] < 1.0 < single["background_rms"]  # a rounding-level trace under the mottle
    assert tiles["grating_rms"] > 3 * tiles["background_rms"]
    assert tiles["orientation_feature_accuracy"] == 1.0
