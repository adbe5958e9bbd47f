"""Issue 22's multi-GPU scripts of scripts/ at tiny sizes on 4 fake devices (tests/tools/test_scripts.py):
context-parallel scaling rows (8 devices skipped, not faked) and the weak-scaling batch of the throughput script.

usage: multi_gpu_scripts.py SCRIPTS_DIR CP_JSON TP_JSON (the repository's scripts/ and two output files); prints two
"ok" lines."""

import importlib.util
import json
import sys

scripts, cp, tp = sys.argv[1:4]


def load(name):
    spec = importlib.util.spec_from_file_location(name, scripts + "/" + name + ".py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load("context_parallel_scaling").main(["--tiny", "--devices", "1", "4", "8", "--combines", "ppermute",
                                       "--backend", "native_chunkwise", "--reps", "10", "--json", cp])
rows = json.load(open(cp))["rows"]
assert [(r["devices"], r["mode"]) for r in rows] == [(1, "fw"), (1, "fw"), (4, "fw"), (1, "fwbw"), (1, "fwbw"),
                                                    (4, "fwbw")], rows
assert all(r["ms"] > 0 and "error" not in r for r in rows), rows
assert all(r["efficiency"] > 0 for r in rows if r["combine"] == "ppermute"), rows
print("ok context_parallel_scaling")
load("train_throughput").main(["--tiny", "--backends", "native_chunkwise", "--meshes", "none", "data=4",
                               "--batch-per-device", "3", "--reps", "10", "--json", tp])
rows = json.load(open(tp))["results"]
assert [(r["mesh"], r["batch"]) for r in rows] == [("none", 3), ("data=4", 12)], rows
print("ok train_throughput weak scaling")
