"""The host VMM driver maps batches through kvmem.native, with and without the extension."""

from __future__ import annotations

import pytest

from kvmem import native
from kvmem.backends.vmem.host import HostDriver

PAGE = 4096


@pytest.fixture(params=[True, False], ids=["native", "python"])
def driver(request, monkeypatch):
    if request.param and not native.enabled():
        pytest.skip(f"native primitives unavailable: {native.status()}")
    real = native.host_map_pages

    def forced(*args, **kw):
        return real(*args, native=request.param, **kw)

    monkeypatch.setattr(native, "host_map_pages", forced)
    d = HostDriver()
    yield d
    d.close()


def test_map_many_maps_every_page_with_its_own_memory(driver):
    base = driver.reserve(8 * PAGE)
    handles = driver.create_many(4, PAGE)
    addrs = [base + i * PAGE for i in (0, 2, 3, 7)]
    done, err = driver.map_many(list(zip(addrs, handles, strict=True)), PAGE)
    assert (done, err) == (4, None)
    for i, a in enumerate(addrs):
        driver.tensor(a, PAGE).fill_(i + 1)
    for i, a in enumerate(addrs):
        assert int(driver.tensor(a, PAGE).sum()) == (i + 1) * PAGE
    driver.free_range(base, 8 * PAGE)


def test_map_many_stops_at_a_page_outside_the_reservation(driver):
    base = driver.reserve(2 * PAGE)
    handles = driver.create_many(3, PAGE)
    pages = [(base, handles[0]), (base + PAGE, handles[1]), (base + 2 * PAGE, handles[2])]
    done, err = driver.map_many(pages, PAGE)
    assert done == 2 and err is not None and "reserved range" in str(err)
    assert int(driver.tensor(base + PAGE, PAGE).sum()) == 0  # the two inside are mapped
    driver.free_range(base, 2 * PAGE)


def test_map_many_refuses_an_unknown_page_handle(driver):
    base = driver.reserve(2 * PAGE)
    (h,) = driver.create_many(1, PAGE)
    done, err = driver.map_many([(base, h), (base + PAGE, h + 10 * PAGE)], PAGE)
    assert done == 0 and err is not None and "no page" in str(err)
    driver.free_range(base, 2 * PAGE)
