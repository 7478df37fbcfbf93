"""Big inputs at flat memory: `scmmgpt embed` and `annotate` read a backed `.h5ad` chunk by chunk and keep only what
they return, so ten times the cells must not cost much more memory (benchmarks/bench_jobs_scale.py measures 20k vs
200k cells; this slow test runs 2k vs 20k)."""

import pytest

from benchmarks.bench_jobs_scale import run


@pytest.mark.slow
def test_embed_and_annotate_peak_memory_is_flat_in_the_number_of_cells():
    rows = run([2_000, 20_000])
    for job in ("embed", "annotate"):
        small, large = (r["peak_rss_mb"] for r in rows if r["job"] == job)
        assert large <= 1.5 * small, f"{job}: {large:.0f} MB on 20k cells vs {small:.0f} MB on 2k"
