"""The serving engine on 4 devices (tests/distributed/test_serve_mesh.py): on meshes data=4 and data=2,tensor=2
("single" weights where heads are split) every greedy request gives the tokens of the engine on one device
(fused weights), the pool stays split as placed (slots over data, heads over tensor) through decode steps, prefill
chunks riding on them and slot copies, and meshes that do not fit are refused.

usage: serve_on_mesh.py (no arguments); prints one "ok" line per mesh and one for the refusals."""

import tempfile
import threading

import jax
import numpy as np

from tests.support.xlstm_large_helpers import random_model, tiny_config
from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained
from xlstm_jax.serve.cli import load_served
from xlstm_jax.serve.engine import Engine
from xlstm_jax.serve.requests import Request, SamplingParams
from xlstm_jax.serve.mesh import serving_mesh

directory = tempfile.mkdtemp()
save_pretrained(random_model(tiny_config(num_heads=4, vocab_size=64), seed=5), directory)
rng = np.random.default_rng(0)
prompts = [rng.integers(1, 64, n).tolist() for n in (3, 20, 40, 9, 33, 70, 2, 17)]
ENGINE = dict(max_slots=4, max_queue=16, prefill_chunk=16, prefix_cache_mb=0)


def greedy(engine: Engine) -> list[list[int]]:
    """Every prompt at once, 12 greedy tokens each, on a started engine (stopped afterwards)."""
    results = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def receiver(index):
        def on_event(event):
            results[index].extend(event.token_ids)
            if event.finish_reason is not None:
                done[index].set()
        return on_event

    engine.warm_up()
    engine.start()
    engine.submit([Request(p, SamplingParams(max_tokens=12), receiver(i)) for i, p in enumerate(prompts)])
    for event in done:
        assert event.wait(120), "a request did not finish"
    engine.stop()
    return results


alone = greedy(Engine(load_served(directory)[0], **ENGINE))
for text, mode in (("data=4", "fused"), ("data=2,tensor=2", "single")):
    mesh = serving_mesh(text, num_heads=4, max_slots=4)
    engine = Engine(load_served(directory, weight_mode=mode)[0], **ENGINE, mesh=mesh)
    assert greedy(engine) == alone, text
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    want = ("data" if sizes["data"] > 1 else None, "tensor" if sizes["tensor"] > 1 else None)
    for leaf in jax.tree.leaves(engine._pool):
        assert (*leaf.sharding.spec, None, None)[:2] == want and len(leaf.sharding.device_set) == 4, (text, leaf.sharding)
    if sizes["tensor"] > 1:
        params = jax.tree.unflatten(engine._params_tree, engine._params)  # the engine's flat list, as a State
        q = params["backbone"]["blocks"][0]["mlstm_layer"]["q"]["kernel"]
        assert tuple(q.sharding.spec) == (None, "tensor"), q.sharding
    print("ok", text, flush=True)

for text, devices, message in (("fsdp=2,data=2", 4, "serving splits only"), ("data=2", 4, "multiply to 2"),
                               ("tensor=8", 8, "must divide the model's num_heads"), ("data=8", 4, "multiply to 8")):
    try:
        serving_mesh(text, num_heads=4, max_slots=4, devices=devices)
    except ValueError as err:
        assert message in str(err), (text, err)
    else:
        raise AssertionError(f"{text} was accepted")
try:
    serving_mesh("data=4", num_heads=4, max_slots=6)
except ValueError as err:
    assert "must divide --max-slots=6" in str(err)
else:
    raise AssertionError("data=4 with 6 slots was accepted")
print("ok refusals", flush=True)
