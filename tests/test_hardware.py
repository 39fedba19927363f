"""Hardware catalog: packaged figures, user overrides, one-line validation errors, cost/energy arithmetic."""
from __future__ import annotations

import pytest

from splitbench.errors import InputError
from splitbench.hardware.catalog import MachineType, cost_usd, get_machine, load_catalog, provisioned_energy_j


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("SPLITBENCH_HARDWARE", raising=False)


def test_packaged_catalog_has_issue_figures():
    cat = load_catalog()
    assert {"dgx-a100", "dgx-h100", "dgx-h100-pcap", "dgx-h200", "cpu-host"} <= set(cat)
    a100, h100, pcap = cat["dgx-a100"], cat["dgx-h100"], cat["dgx-h100-pcap"]
    assert (a100.accelerator, a100.accelerators, a100.usd_per_hour) == ("a100-80gb", 8, 17.6)
    assert (a100.accelerator_power_w, a100.server_power_w) == (400, 6500)
    assert (h100.accelerator, h100.accelerators, h100.usd_per_hour) == ("h100-80gb", 8, 38.0)
    assert (h100.accelerator_power_w, h100.server_power_w) == (700, 10200)
    assert pcap.usd_per_hour == h100.usd_per_hour and pcap.accelerators == 8
    assert pcap.power_cap_fraction == 0.7
    assert pcap.accelerator_power_w == pytest.approx(0.7 * 700)
    assert pcap.server_power_w == pytest.approx(0.7 * 10200)
    assert cat["dgx-h200"].accelerator == "h200-141gb" and cat["dgx-h200"].estimated
    for name, acc, gpu_w, server_w, price in (("1x-a100", "a100-80gb", 400, 6500 / 8, 27.44705 / 8),
                                               ("1x-h100", "h100-80gb", 700, 10200 / 8, 55.04 / 8),
                                               ("1x-h200", "h200-141gb", 700, 10200 / 8, 63.296 / 8)):
        one = cat[name]   # one SXM GPU: its TDP, the DGX's per-GPU server power, a cloud per-GPU list price
        assert (one.accelerator, one.accelerators, one.accelerator_power_w) == (acc, 1, gpu_w)
        assert one.server_power_w == pytest.approx(server_w) and one.usd_per_hour == pytest.approx(price, abs=5e-3)
        assert "on-demand" in one.source and not one.estimated
    cpu = cat["cpu-host"]
    assert cpu.accelerators == 0 and cpu.estimated and cpu.usd_per_hour > 0 and cpu.server_power_w > 0
    for m in cat.values():
        assert m.source.strip(), m.name
        assert not m.estimated or "ESTIMATE" in m.source, m.name


def test_cost_and_energy_hand_computed():
    cat = load_catalog()
    assert cost_usd(cat["dgx-h100"], 3, 1800) == pytest.approx(57.0)        # 3 x $38 x 0.5 h
    assert provisioned_energy_j(cat["dgx-a100"], 2, 60) == pytest.approx(2 * 6500 * 60)
    m = MachineType("x", "none", 0, usd_per_hour=2.0, accelerator_power_w=0, server_power_w=50)
    assert cost_usd(m, 1, 7200) == pytest.approx(4.0)
    assert provisioned_energy_j(m, 0, 100) == 0
    with pytest.raises(ValueError):
        cost_usd(m, -1, 10)


def test_get_machine_unknown_lists_known_names():
    cat = load_catalog()
    assert get_machine("dgx-a100", cat) is cat["dgx-a100"]
    with pytest.raises(InputError) as ei:
        get_machine("tpu-v9", cat)
    assert "tpu-v9" in str(ei.value) and "dgx-h100" in str(ei.value) and "\n" not in str(ei.value)


def test_user_file_overrides_price_and_adds_type(tmp_path, monkeypatch):
    f = tmp_path / "hw.toml"
    f.write_text('[dgx-h100]\nusd_per_hour = 30.5\n\n'
                 '[my-box]\naccelerator = "l4"\naccelerators = 2\nusd_per_hour = 1.5\n'
                 'accelerator_power_w = 72\nserver_power_w = 600\nsource = "my invoice"\n')
    cat = load_catalog(f)
    h100 = cat["dgx-h100"]
    assert h100.usd_per_hour == 30.5
    assert h100.server_power_w == 10200 and h100.accelerators == 8      # untouched keys kept
    assert str(f) in h100.source and "usd_per_hour" in h100.source
    assert cat["my-box"] == MachineType("my-box", "l4", 2, 1.5, 72, 600, source="my invoice")
    assert load_catalog()["dgx-h100"].usd_per_hour == 38.0               # packaged data unchanged
    assert cost_usd(h100, 2, 3600) == pytest.approx(61.0)
    monkeypatch.setenv("SPLITBENCH_HARDWARE", str(f))                    # env var path
    assert load_catalog()["dgx-h100"].usd_per_hour == 30.5


@pytest.mark.parametrize("body, needle, line", [
    ('[dgx-a100]\nusd_per_hour = 1.0\nwatts = 5\n', "dgx-a100.watts", 3),
    ('[dgx-a100]\n\nusd_per_hour = -3\n', "dgx-a100.usd_per_hour", 3),
    ('[dgx-h100]\nserver_power_w = "lots"\n', "dgx-h100.server_power_w", 2),
    ('[dgx-h100]\naccelerators = 2.5\n', "dgx-h100.accelerators", 2),
    ('[dgx-h100]\naccelerator_power_w = true\n', "dgx-h100.accelerator_power_w", 2),
    ('[dgx-h100]\nusd_per_hour = 1.0\nserver_power_w 5\n', "TOML", 3),
    ('[new-box]\naccelerator = "x"\nusd_per_hour = 1\n', "accelerators", 1),
    ('dgx-h100 = 5\n', "dgx-h100", None),
])
def test_malformed_user_file_one_line_error(tmp_path, body, needle, line):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(InputError) as ei:
        load_catalog(f)
    msg = str(ei.value)
    assert "\n" not in msg and str(f) in msg and needle in msg, msg
    if line is not None:
        assert msg.startswith(f"{f}:{line}:"), msg


def test_missing_user_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_catalog(tmp_path / "nope.toml")
