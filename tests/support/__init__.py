"""Shared test code: `helpers` (inputs, the float64 reference, tolerances, assertions), `backend_cases` (the
backends and per-backend callables), `devices` (scripts run on several devices in a fresh Python), and
`xlstm_large_helpers` (tiny xLSTM-7B models)."""
