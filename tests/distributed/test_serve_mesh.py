"""`xlstm-jax serve --mesh`: the engine on 4 devices gives the greedy tokens of one device, keeps its slot pool split
as placed, and refuses meshes that do not fit (tests/distributed/scripts/serve_on_mesh.py)."""

import pytest

from tests.support.devices import run_on_devices


@pytest.mark.slow
def test_the_engine_on_a_mesh_gives_the_tokens_of_one_device():
    run_on_devices("serve_on_mesh.py", 4, oks=3)
