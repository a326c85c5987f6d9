"""An inference process keeps freed activation memory instead of page-faulting it back in at every step."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vistune import runtime

# A batched prefill in miniature: four residual MLP layers on (8, 96, 256), whose 3 MB
# activations are allocated and freed at every layer. Prints the page faults of passes 7-10
# (the first passes settle where the blocks go).
SCRIPT = """
import importlib.util, resource, sys, torch
spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])  # the module alone: a quick start
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
if not runtime.inference_process():
    print("unsupported")
    sys.exit()
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
x = torch.randn(8, 96, 256)
def prefill():
    h = x
    for _ in range(4):
        h = h + mlp(h)
with torch.inference_mode():
    for _ in range(6):
        prefill()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        prefill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def late_faults() -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, runtime.__file__], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_activations_are_reused_without_page_faults():
    faults = late_faults()
    if faults == "unsupported":
        pytest.skip("C library is not glibc")
    # With glibc's defaults the activations go back to the OS and fault in again: ~12,000 here
    # in most runs (some heap layouts happen to avoid it).
    assert int(faults) < 200
