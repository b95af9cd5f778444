#!/usr/bin/env bash
# The fault-and-input battery: every case of tests/test_faults.py and tests/test_bad_config.py, the slow
# variants included (several mpirun launches: SIGINT to mpirun, SIGTERM to a serial run, rank 0 killed in
# the gather, a full disk without mpirun, a read-only disk under mpirun), each on the tiny digits
# experiment through the real CLI and the real mpirun. Prints a table: case -> outcome.
#
#   ./run/fault_battery.sh              # all 106 cases (several minutes on 2 cores)
#   ./run/fault_battery.sh -k disk      # pytest options pass through
#
# The disk cases mount a tmpfs and a read-only bind mount: they need root (skipped otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run ./run/setup.sh first" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export LTHMPI_FAULT_BATTERY=1 LTHMPI_BATTERY_REPORT="$work/notes.tsv"
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider -m "battery or not battery" tests/test_faults.py tests/test_bad_config.py \
    --junitxml="$work/junit.xml" "$@" > "$work/pytest.log" 2>&1
rc=$?
"$PY" - "$work" "$(( $(date +%s) - start ))" <<'PYEOF'
import os, sys, xml.etree.ElementTree as ET

work, seconds = sys.argv[1], int(sys.argv[2])
notes = {}
if os.path.exists(os.path.join(work, "notes.tsv")):
    for line in open(os.path.join(work, "notes.tsv")):
        test, case, outcome = line.rstrip("\n").split("\t", 2)
        notes[test.split("::", 1)[-1]] = (case, outcome)
rows = []
if os.path.exists(os.path.join(work, "junit.xml")):
    for tc in ET.parse(os.path.join(work, "junit.xml")).getroot().iter("testcase"):
        name = tc.get("name")
        status = "PASS"
        for tag, word in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
            el = tc.find(tag)
            if el is not None:
                status = word
                detail = (el.get("message") or "").splitlines()[0][:100] if el.get("message") else ""
                break
        case, outcome = notes.get(name, (name, ""))
        if status != "PASS" and not outcome:
            outcome = detail
        rows.append((status, case, outcome))
w = max([len(c) for _, c, _ in rows] + [4])
print(f"{'':5}  {'case':{w}}  outcome")
for status, case, outcome in rows:
    print(f"{status:5}  {case:{w}}  {outcome}")
counts = {s: sum(1 for r in rows if r[0] == s) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
print(f"\n{len(rows)} cases: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + f" in {seconds} s")
PYEOF
if [ $rc -ne 0 ]; then
    echo; echo "pytest output (tail):"; tail -40 "$work/pytest.log"
fi
exit $rc
