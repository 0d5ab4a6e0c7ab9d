"""pydr run after the review of issue 23 (findings of /tmp/rev23a): byte
metrics per item, alerts off the main loop, the vault's absolute path in
alerts. Waits are on events and FIFOs, never on the clock."""

import os
import urllib.request

import pytest

from pydr.dr.service import Service
from pydr.dr.vault import Vault, init_vault

MiB = 1 << 20


def scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("item"), s.labels.get("state")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def vault(tmp_path):
    """A vault with item a on a 4 MiB file disk, replicated once."""
    init_vault(tmp_path / "v")
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(4 * MiB))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("a", [(str(src), str(tmp_path / "ra.img"))])
        v.set_policy("a", target_rpo=3600)
        v.replicate(["a"])
    return tmp_path / "v"


def round_then_stop(service, scraped):
    def on_event(e):
        if e.operation == "run" and e.kind == "finished":
            scraped.update(scrape(service.metrics_port))
            service.stop()
    service.events = service._parts.events = on_event
    service.run()


def test_byte_metrics_count_what_the_cycle_read_and_wrote(vault, tmp_path):
    """64 KiB of a 4 MiB disk changed: the cycle reads the disk and writes
    64 KiB. Before the fix all three counters said one number (written)."""
    with open(tmp_path / "a.img", "r+b") as f:
        f.seek(5 * 65536)
        f.write(os.urandom(65536))
    with Vault(vault) as v:
        newest = v.store.points("a")[-1].data_time
    service = Service(vault, metrics="127.0.0.1:0", warm=False, clock=lambda: newest + 3000,
                      notify=lambda s: None)
    scraped = {}
    round_then_stop(service, scraped)
    with Vault(vault) as v:
        assert len(v.points("a")) == 2
    read = scraped[("pydr_bytes_read_total", "a", None)]
    written = scraped[("pydr_bytes_written_total", "a", None)]
    sent = scraped[("pydr_bytes_sent_total", "a", None)]
    assert written == 65536
    assert read >= 4 * MiB
    assert sent == written  # a local replica: what is sent to its place is what is written
