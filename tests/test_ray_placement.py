"""servers/ray_placement.place(): instances onto Ray nodes by CPU/GPU counts and role resources (pure, no Ray)."""
from __future__ import annotations

import pytest

from splitbench.errors import InputError
from splitbench.servers.ray_placement import Need, node_resources, place


def test_roles_go_to_nodes_named_for_them_whatever_the_node_order():
    nodes = {"a": {"CPU": 4, "token": 1}, "b": {"CPU": 4, "prompt": 1}}
    got = place([Need("prompt-0", "prompt"), Need("token-0", "token")], nodes)
    assert got == {"prompt-0": "b", "token-0": "a"}


def test_a_neutral_node_is_preferred_to_one_named_for_another_role():
    nodes = {"tok": {"CPU": 8, "token": 1}, "plain": {"CPU": 1}}
    assert place([Need("prompt-0", "prompt")], nodes) == {"prompt-0": "plain"}


def test_falls_back_to_other_nodes_when_the_named_one_is_full():
    nodes = {"p": {"CPU": 1, "prompt": 1}, "t": {"CPU": 2, "token": 1}}
    got = place([Need("prompt-0", "prompt"), Need("prompt-1", "prompt"), Need("token-0", "token")], nodes)
    assert got == {"prompt-0": "p", "prompt-1": "t", "token-0": "t"}


def test_cpus_and_gpus_are_consumed_and_instances_spread():
    nodes = {"n0": {"CPU": 8, "GPU": 2}, "n1": {"CPU": 8, "GPU": 2}}
    needs = [Need(f"baseline-{k}", "baseline", cpus=1, gpus=1) for k in range(4)]
    got = place(needs, nodes)
    assert sorted(got.values()) == ["n0", "n0", "n1", "n1"]
    assert got["baseline-0"] != got["baseline-1"]   # spread: the next goes where most GPUs are free


def test_gpu_instance_skips_cpu_only_node():
    nodes = {"cpu": {"CPU": 64}, "gpu": {"CPU": 4, "GPU": 1}}
    assert place([Need("token-0", "token", cpus=1, gpus=1)], nodes) == {"token-0": "gpu"}


def test_cannot_place_names_the_instance_and_what_is_missing():
    with pytest.raises(InputError) as e:
        place([Need("prompt-0", "prompt", cpus=2), Need("token-0", "token", cpus=2)], {"a": {"CPU": 3}})
    msg = str(e.value)
    assert "\n" not in msg and "token-0" in msg and "2 free CPU" in msg and "most free: 1" in msg
    with pytest.raises(InputError, match=r"prompt-0 .*no node has 2 free GPU\(s\) \(most free: 1\)"):
        place([Need("prompt-0", "prompt", gpus=2)], {"a": {"CPU": 8, "GPU": 1}})
    with pytest.raises(InputError, match="no alive nodes"):
        place([Need("prompt-0", "prompt")], {})


def test_node_resources_from_ray_nodes_rows_labels_count_as_roles_dead_nodes_dropped():
    rows = [{"NodeID": "x", "Alive": True, "Resources": {"CPU": 2.0, "prompt": 1.0}, "Labels": {}},
            {"NodeID": "y", "Alive": True, "Resources": {"CPU": 2.0}, "Labels": {"splitbench-role": "token"}},
            {"NodeID": "z", "Alive": False, "Resources": {"CPU": 64.0}}]
    res = node_resources(rows)
    assert set(res) == {"x", "y"} and res["y"]["token"] == 1.0
    assert place([Need("token-0", "token"), Need("prompt-0", "prompt")], res) == {"token-0": "y", "prompt-0": "x"}
