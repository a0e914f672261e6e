"""The benchmark protocol: median forward+backward time, peak extra memory and kernel launches
per case and provider, side by side in one run (speed-ups are over ``reference`` of this run)."""

import pytest

import harness

DEVICE = harness.device()
ROUNDS = {"smoke": 30, "user": 20, "long": 7, "user-padded-none": 10, "dac-mel": 5}


@pytest.mark.parametrize("provider", harness.providers(DEVICE))
@pytest.mark.parametrize("case_name", list(harness.CASES))
def test_forward_backward(benchmark, results, case_name, provider):
    case = harness.CASES[case_name]
    if provider not in harness.providers(DEVICE, case):
        pytest.skip(f"{provider} is not timed on {case_name}")
    step = harness.make_step(provider, case, DEVICE)
    try:
        step()  # first call: compiles what needs compiling
    except Exception as exc:  # torch.compile where it does not work: recorded, not hidden
        if not provider.startswith("reference+torch.compile"):
            raise
        results.append({"case": case_name, "provider": provider, "median_ms": None,
                        "peak_mem_mb": None, "launches": None,
                        "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        pytest.skip(f"torch.compile does not work here: {exc}")

    if DEVICE.type == "cuda":
        median_ms = harness.time_cuda(step)
        benchmark.pedantic(step, rounds=5, iterations=1)  # wall clock, for pytest's own table
    else:
        benchmark.pedantic(step, rounds=ROUNDS[case_name], warmup_rounds=2, iterations=1)
        median_ms = benchmark.stats.stats.median * 1e3
    results.append({
        "case": case_name,
        "provider": provider,
        "median_ms": round(median_ms, 4),
        "peak_mem_mb": _rounded(harness.peak_memory_mb(step, DEVICE)),
        "launches": harness.count_launches(step, DEVICE),
        "dispatched_launches": (harness.count_dispatched_launches(step, DEVICE)
                                if provider == "torch" else None),
    })


def _rounded(value):
    return None if value is None else round(value, 2)
