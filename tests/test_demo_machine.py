import json
import os
import subprocess
import sys

import vistune.demo.foundation as foundation
import vistune.demo.machine as machine
from vistune.demo.report import check_targets, markdown
from vistune.hardware import bf16_support

_SUPPORT = "import json; from vistune.hardware import bf16_support; print(json.dumps(bf16_support()))"


def _support_with(**env) -> tuple[bool, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", _SUPPORT], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return tuple(json.loads(out.stdout))


def test_bf16_support_honours_the_kernel_caps_that_make_a_cpu_run_as_an_avx2_one():
    native, why = _support_with()
    assert why  # a reason, whatever the machine
    # Capped kernels emulate bf16 whatever the CPU has: the demo then takes the fp32 recipe.
    for env in ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
        capped, why = _support_with(**env)
        assert capped is False, env
        assert ("ATEN_CPU_CAPABILITY" in why or "ONEDNN_MAX_CPU_ISA" in why) if native else "no native bf16" in why
    assert _support_with(ONEDNN_MAX_CPU_ISA="ALL")[0] == native


def _fake_cpu(monkeypatch, native: bool) -> None:
    why = "the CPU has AVX512-BF16" if native else "the CPU has no native bf16 (neither AVX512-BF16, AMX nor ARM BF16)"
    monkeypatch.setattr(machine, "bf16_support", lambda: (native, why))
    monkeypatch.setattr(foundation, "native_bf16_cpu", lambda: native)


def test_plan_says_what_it_picked_from_the_machine_and_why(monkeypatch):
    _fake_cpu(monkeypatch, native=False)
    p = machine.plan("auto", "auto", threads=2, side_by_side=True, ablations=True)
    assert (p.precision, p.compiled, p.main_threads, p.side_threads) == ("fp32", False, 1, 1)
    assert not p.time_target_applies and "AVX512-BF16 or AMX" in p.time_target_why
    lines = machine.describe(p, 600)
    assert "precision: fp32 (auto: the CPU has no native bf16" in "\n".join(lines)
    assert any(l.startswith("compile: off (auto: an fp32 step") for l in lines)
    assert any(l.startswith("Muon's orthogonalisation:") for l in lines)
    assert lines[-1].startswith("time target 600 s: not judged")
    p.probe_step_s, p.estimate_s = 0.5, 1080.0
    assert "estimated time here: about 18 min (a stage-2 step took 0.50 s in a probe); `vistune demo --quick`" in \
        "\n".join(machine.describe(p, 600))

    _fake_cpu(monkeypatch, native=True)
    p = machine.plan("auto", "off", threads=2, side_by_side=False, ablations=True)
    assert (p.precision, p.compiled, p.side_threads) == ("bf16", False, 0) and p.compile_why == "set, not auto"
    assert p.time_target_applies and machine.describe(p, 600)[-1].startswith("time target 600 s: applies")
    # Asked for fp32 on a bf16 CPU: the time target still applies (the hardware is the one it was set for).
    p = machine.plan("fp32", "auto", threads=1, side_by_side=True, ablations=True)
    assert p.precision == "fp32" and p.precision_why == "set, not auto" and p.time_target_applies


def test_a_probe_times_a_stage2_step_and_estimates_the_run():
    s = machine.probe_step(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, vocab=64, batch=2,
                           precision="fp32", threads=1, steps=2)
    assert 0 < s < 30
    assert machine.estimate_run_s(s, 100) > 100 * s  # the rest of the run comes on top of stage 2


def _report(native: bool, total_s: float = 900.0) -> dict:
    p = machine.MachinePlan("fp32", "auto: the CPU has no native bf16", False, "auto: fp32", "float32", "no bf16",
                            1, 1, native, "it is set for CPUs with AVX512-BF16 or AMX; here the CPU has no native bf16",
                            probe_step_s=0.5, estimate_s=1000.0)
    return {"seed": 0, "questions": 10, "accuracy": {"full": 0.95}, "accuracy_by_kind": {"full": {}},
            "accuracy_first_word": {"full": 0.95}, "majority_baseline": {"overall": 0.4}, "object_recall": 0.5,
            "train_losses": {}, "timings": {"total_s": total_s}, "machine_plan": p.to_dict()}


def test_the_time_target_is_not_judged_where_it_does_not_apply_and_the_report_says_why():
    r = _report(native=False)
    r["targets"] = check_targets(r, 600, time_applies=False, time_why=r["machine_plan"]["time_target_why"])
    t = r["targets"]["total_s"]
    assert t["met"] is None and "AVX512-BF16 or AMX" in t["not_judged"] and "not judged" in t["target"]
    assert r["targets"]["full_accuracy"]["met"]
    md = markdown(r, {}, [])
    assert "precision: fp32 (auto: the CPU has no native bf16)" in md
    assert "time target: not judged" in md and "estimated before the run: 1000 s" in md and "took 900 s" in md
    # Where it applies, a slow run misses it.
    assert check_targets(_report(native=True), 600, time_applies=True)["total_s"]["met"] is False
