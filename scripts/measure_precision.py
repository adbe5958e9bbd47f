"""Print the relative errors of each mLSTM backend against the float64 reference, per input dtype (markdown).

    python scripts/measure_precision.py [--backends NAME ...] [--dtypes float32 bfloat16 ...]

q, k, v are drawn in float64 and rounded to the dtype (the reference sees the rounded values); gates and initial
states are float32. Errors are ||x - x_ref|| / ||x_ref|| (Frobenius) for h, the last states C, n, m, and the
gradients of q, k, v, i, f, c_initial, n_initial, m_initial under a random weighted loss on h and every last state
(`xlstm_jax.doctor.measure_errors`). Triton backends run where Triton can (a GPU, or XLSTM_JAX_TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse

from xlstm_jax.doctor import Case, backend_availability, measure_errors
from xlstm_jax.mlstm import IMPLEMENTATIONS

CASES = {
    "small": Case(2, 2, 64, 32, 32, 16, True, (-3.0, 3.0), (-1.0, 6.0)),
    "medium": Case(2, 2, 256, 64, 64, 64, True, (-6.0, 6.0), (0.0, 8.0)),
}
DTYPES = ("float32", "bfloat16", "float16")
GRADS = ("dq", "dk", "dv", "di", "df", "dc_initial", "dn_initial", "dm_initial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    for case_name in args.cases:
        case = CASES[case_name]
        print(
            f"\ncase {case_name}: B={case.B} NH={case.NH} S={case.S} DHQK={case.DHQK} DHHV={case.DHHV} "
            f"chunk={case.chunk_size} i~U{case.igate} f~U{case.fgate}, with initial states\n"
        )
        print("| backend | dtype | h | C | n | m | worst gradient |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in args.backends:
            ok, why = backend_availability(name)
            if not ok:
                print(f"| {name} | - | not run: {why} | | | | |")
                continue
            chunk = case.chunk_size if IMPLEMENTATIONS[name].chunk_sizes is not None else None
            run_case = Case(**{**case.__dict__, "chunk_size": chunk})
            for dtype in args.dtypes:
                try:
                    e = measure_errors(name, run_case, dtype=dtype)
                except Exception as exc:  # report the failure in the table and go on with the next row
                    print(f"| {name} | {dtype} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | | |")
                    continue
                worst = max(GRADS, key=lambda g: e[g])
                print(
                    f"| {name} | {dtype} | {e['h']:.1e} | {e['C']:.1e} | {e['n']:.1e} | {e['m']:.1e} "
                    f"| {e[worst]:.1e} ({worst}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
