import platform
import subprocess
import sys

import pytest

from vistune.runtime import training_memory

# malloc(16 MiB), then mallinfo2's bytes in mmapped blocks (hblkhd), in a fresh process: with glibc's
# defaults such a block is mmapped (and unmapped again when freed); after training_memory it is not.
_PROBE = """
import ctypes, sys
from vistune.runtime import training_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert training_memory()
before = libc.mallinfo2().hblkhd
p = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(ctypes.c_void_p(p))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_it_keeps():
    def mmapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert mmapped("default") >= 16 << 20
    assert mmapped("keep") == 0
    assert training_memory() is True


def test_describe_machine_names_what_a_timing_depends_on():
    import torch

    from vistune.hardware import cpu_name, describe_machine, native_bf16_cpu

    keep = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = describe_machine()
    finally:
        torch.set_num_threads(keep)
    assert m == {"cpu": cpu_name(), "cores": m["cores"], "threads": 1, "torch": torch.__version__,
                 "native_bf16": native_bf16_cpu()}
    assert m["cores"] >= 1 and m["cpu"]
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert m["cpu"] != "cpu"  # /proc/cpuinfo names the model on x86 Linux
