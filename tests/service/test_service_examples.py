"""docs/SERVICE.md and its examples (examples/pydr-run.service,
examples/prometheus/*.yml) against the code: the files are the doc's
blocks, the YAML parses, the rules and the metrics table name only metrics
ServiceMetrics serves, and the systemd unit has what pydr run needs (and
passes `systemd-analyze verify` where systemd is installed)."""

import configparser
import os
import re
import shutil
import subprocess
import sys

from pydr.dr.health import HEALTHS
from pydr.dr.metrics import ServiceMetrics

from conftest import ROOT

DOC = os.path.join(ROOT, "docs", "SERVICE.md")
EXAMPLES = os.path.join(ROOT, "examples")


def read(*parts):
    with open(os.path.join(*parts)) as f:
        return f.read()


def doc_block(after, lang):
    """The first ```lang block after the text `after` in docs/SERVICE.md."""
    text = read(DOC)
    start = text.index(f"```{lang}\n", text.index(after)) + len(lang) + 4
    return text[start:text.index("```", start)]


def without_comment_lines(text):
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()


def load_yaml(text):
    """The YAML as Python data (PyYAML), or -- PyYAML not installed -- a
    structural check of the subset these files use: consistent two-space
    indentation, every line a comment, a "key: value", a "- item" or a
    flow mapping; returned as the raw text for the callers' own checks."""
    try:
        import yaml
    except ImportError:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            assert indent % 2 == 0 and "\t" not in line, f"line {number}: {line!r}"
            body = line.strip()
            assert re.match(r"(- )?[A-Za-z_]\w*:( .*)?$|- ", body), f"line {number}: {line!r}"
        return text
    return yaml.safe_load(text)


def served_names():
    """The sample names a ServiceMetrics with one item serves."""
    m = ServiceMetrics()
    m.set_item("web", 1.0, 10.0, "ok")
    m.track_item("db", 100.0, 10.0, lambda now: "warning")  # RPO at the scrape: a point's age
    m.set_round_end(100.0)
    m.observe_cycle("web", 1.0, 1, 1, 1, ok=False)
    m.set_queue(1)
    return {s.name for family in m.registry.collect() for s in family.samples}


def test_the_example_files_are_the_docs_blocks():
    assert without_comment_lines(read(EXAMPLES, "prometheus", "scrape.yml")) == \
        without_comment_lines(doc_block("A scrape config", "yaml"))
    assert without_comment_lines(read(EXAMPLES, "prometheus", "alerts.yml")) == \
        without_comment_lines(doc_block("Alerting rules", "yaml"))
    assert read(EXAMPLES, "pydr-run.service") == doc_block("A sample unit", "ini")


def test_the_alerting_rules_parse_and_name_served_metrics():
    text = read(EXAMPLES, "prometheus", "alerts.yml")
    rules = load_yaml(text)
    served = served_names()
    if isinstance(rules, str):  # no PyYAML: the structural check passed; read the pairs
        names = re.findall(r"- alert: (\w+)", text)
        exprs = re.findall(r"expr: (.+)", text)
    else:
        [group] = rules["groups"]
        assert group["name"] == "pydr"
        names = [r["alert"] for r in group["rules"]]
        exprs = [r["expr"] for r in group["rules"]]
        assert all(isinstance(r.get("annotations", {}).get("summary"), str)
                   for r in group["rules"])
    assert names == ["PydrRpoWarning", "PydrRpoCritical", "PydrDown", "PydrStuck",
                     "PydrCycleFailures"]
    assert 'pydr_health{state="warning"} == 1' in exprs[0]
    assert 'pydr_health{state="critical"} == 1' in exprs[1]
    assert "up{" in exprs[2] and "pydr_up" in exprs[2]
    assert exprs[3].startswith("time() - pydr_last_round_end_timestamp_seconds > ")
    assert exprs[4] == "increase(pydr_cycle_failures_total[15m]) > 0"
    for expr in exprs:
        for metric in re.findall(r"\bpydr_\w+", expr):
            assert metric in served, f"{metric} (in {expr!r}) is not a metric pydr run serves"
        for state in re.findall(r'state="(\w+)"', expr):
            assert state in HEALTHS


def test_the_scrape_config_parses():
    config = load_yaml(read(EXAMPLES, "prometheus", "scrape.yml"))
    if isinstance(config, str):
        assert "job_name: pydr" in config and "targets:" in config
        return
    [job] = config["scrape_configs"]
    assert job["job_name"] == "pydr"  # PydrDown's up{job="pydr"}
    [targets] = job["static_configs"]
    assert all(re.match(r"[\w.-]+:\d+$", t) for t in targets["targets"])


def test_the_metrics_table_is_what_is_served():
    table = re.findall(r"^\| `(pydr_\w+)` \| (gauge|counter) \|", read(DOC), re.MULTILINE)
    served = served_names()
    documented = {name for name, _ in table}
    assert documented == {n for n in served if not n.endswith("_created")}
    m = ServiceMetrics()
    types = {f.name: f.type for f in m.registry.collect()}
    for name, kind in table:
        assert types[name[:-len("_total")] if kind == "counter" else name] == kind


def test_the_systemd_unit(tmp_path):
    text = read(EXAMPLES, "pydr-run.service")
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "60"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the cycles' children are not killed under them
    assert service["Restart"] == "on-failure"
    assert service["TimeoutStopSec"].endswith("min")
    assert service["ExecStart"].split()[1:3] == ["run", "--vault"]
    # the passphrase by its path (read again each round), never the passphrase itself
    assert service["Environment"].startswith("PYDR_PASSPHRASE_FILE=/")
    assert "PYDR_PASSPHRASE=" not in text
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # the structural checks above stand alone
        return
    # systemd checks that ExecStart's program exists: the installed pydr
    pydr = os.path.join(os.path.dirname(sys.executable), "pydr")
    pydr = pydr if os.access(pydr, os.X_OK) else shutil.which("pydr")
    assert pydr, "no installed pydr to put in ExecStart"
    local = tmp_path / "pydr-run.service"
    local.write_text(text.replace("/usr/local/bin/pydr", pydr))
    r = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
