#!/usr/bin/env bash
# Multi-host check on one machine: network namespaces stand in for hosts. Creates N namespaces ("hosts"
# h1..hN, addresses 10.77.0.1..N on a bridge that lives in a namespace of its own, so nothing is added to
# the machine's own network and no packet can leave these namespaces), starts MPICH's mpiexec (hydra) in
# h1 with a launcher that plays ssh: it drops the ssh options hydra passes and runs the command under
# `ip netns exec` in the namespace that owns the host's address, inside `unshare --uts` with the host's
# own hostname, so MPI.Get_processor_name() and the results' host column tell the hosts apart. Runs a tiny
# lthmpi experiment (digits) over all of them, with the run directory on the shared filesystem, checks
# that the results record every host, and removes the namespaces on exit, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=multihost.sh

usage() {
  cat <<EOF
usage: run/$PROG [options] [--set KEY=VALUE ...] [-- more lthmpi.main arguments]

Runs a tiny lthmpi experiment over N network namespaces acting as hosts (needs root: ip netns, unshare)
and checks that the results name every host. The namespaces and temporary files are removed on exit
(only the lock file /tmp/PREFIX.lock stays).

options:
  --hosts N            namespaces (hosts h1..hN), N >= 2 (default 2)
  --ranks-per-host R   MPI ranks on each host (default 1)
  --run-dir DIR        run directory (default: a temporary one, removed on exit); must not exist yet
  --force              delete an existing --run-dir first
  --prefix NAME        prefix of the namespace names (default lthmpi-mh); leftovers with it are removed first
  --subnet A.B.C       /24 used inside the namespaces (default 10.77.0)
  --timeout S          seconds before the MPI job is killed (default 600)
  --keep               keep the temporary run directory and the launcher files
  --cleanup            only remove namespaces left by an earlier run with this prefix, then exit
  --set KEY=VALUE      added after the tiny config (digits, 3 masks x 2 resets x ticket + random re-init)
  -h, --help           this text

environment: PYTHON (default .venv/bin/python), MPIEXEC (default .venv/bin/mpiexec, MPICH's hydra)
prints: one line "multihost: OK: ..." with the hosts and the results file; exit 1 if the check fails,
2 for a usage error or a machine that cannot make namespaces.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }
fail() { echo "$PROG: FAILED: $*" >&2; exit 1; }

HOSTS=2 RPH=1 RUN_DIR="" FORCE=0 PREFIX=lthmpi-mh SUBNET=10.77.0 TIMEOUT=600 KEEP=0 CLEAN_ONLY=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hosts) [ $# -ge 2 ] || die "--hosts needs a value"; HOSTS=$2; shift 2 ;;
    --ranks-per-host) [ $# -ge 2 ] || die "--ranks-per-host needs a value"; RPH=$2; shift 2 ;;
    --run-dir) [ $# -ge 2 ] || die "--run-dir needs a directory"; RUN_DIR=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
    --subnet) [ $# -ge 2 ] || die "--subnet needs a value"; SUBNET=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --cleanup) CLEAN_ONLY=1; shift ;;
    --set) [ $# -ge 2 ] || die "--set needs a value"; PASS+=("$1" "$2"); shift 2 ;;
    --set=*) PASS+=("$1"); shift ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

isint() { [[ $1 =~ ^[0-9]+$ ]]; }
isint "$HOSTS" && [ "$HOSTS" -ge 2 ] && [ "$HOSTS" -le 200 ] || die "--hosts must be an integer in 2..200, not '$HOSTS'"
isint "$RPH" && [ "$RPH" -ge 1 ] || die "--ranks-per-host must be an integer >= 1, not '$RPH'"
isint "$TIMEOUT" && [ "$TIMEOUT" -ge 1 ] || die "--timeout must be a number of seconds, not '$TIMEOUT'"
[[ $PREFIX =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,20}$ ]] || die "--prefix must be 1-21 letters, digits, '.', '_' or '-', not '$PREFIX'"
[[ $SUBNET =~ ^(10\.[0-9]{1,3}\.[0-9]{1,3}|192\.168\.[0-9]{1,3}|172\.(1[6-9]|2[0-9]|3[01])\.[0-9]{1,3})$ ]] ||
  die "--subnet must be the first three numbers of a private /24 (e.g. 10.77.0), not '$SUBNET'"

[ "$(id -u)" = 0 ] || die "needs root (network namespaces: ip netns add, unshare --uts); run it as root or with sudo"
for tool in ip unshare flock timeout; do
  command -v "$tool" >/dev/null || die "needs '$tool' (Debian/Ubuntu: apt-get install iproute2 util-linux coreutils)"
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$ROOT/.venv/bin/mpiexec}
[ -x "$PY" ] || die "no Python at $PY (run run/setup.sh, or set PYTHON)"
[ -x "$MPIEXEC" ] || die "no mpiexec at $MPIEXEC (run run/setup.sh, or set MPIEXEC to MPICH's hydra mpiexec)"
# read the whole answer first: `| grep -q` stops reading at the match, mpiexec then dies of SIGPIPE, and
# pipefail turned that into "not hydra" now and then
mpiexec_version=$("$MPIEXEC" --version 2>/dev/null || true)
grep -qi hydra <<<"$mpiexec_version" || die "$MPIEXEC is not MPICH's hydra mpiexec (-launcher-exec is hydra's option)"

SW="$PREFIX-sw"
host_ns() { echo "$PREFIX-h$1"; }

# One run at a time per prefix (the namespace names are fixed).
exec 9>"/tmp/$PREFIX.lock"
flock -w 60 9 || die "another $PROG with prefix $PREFIX holds /tmp/$PREFIX.lock; wait or use --prefix"

remove_namespaces() {  # every namespace named $PREFIX-*, after ending the processes this script started in them
  local ns pids
  for ns in $(ip netns list 2>/dev/null | awk -v p="$PREFIX-" 'index($1, p) == 1 { print $1 }'); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        sleep 0.5
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] || break
      done
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || echo "$PROG: warning: could not remove namespace $ns" >&2
  done
}

WORK=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  remove_namespaces
  if [ -n "$WORK" ] && [ "$KEEP" = 0 ]; then rm -rf -- "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_namespaces  # leftovers of an interrupted run: idempotent
if [ "$CLEAN_ONLY" = 1 ]; then echo "$PROG: removed namespaces $PREFIX-*"; exit 0; fi

# -- the run directory ---------------------------------------------------------------------------------
WORK=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
if [ -z "$RUN_DIR" ]; then
  RUN_DIR="$WORK/run"
else
  if [ -e "$RUN_DIR" ]; then
    [ "$FORCE" = 1 ] || die "$RUN_DIR exists; the check needs a fresh run (choose another --run-dir or pass --force)"
    rm -rf -- "$RUN_DIR"
  fi
  mkdir -p "$(dirname "$RUN_DIR")"
  RUN_DIR="$(cd "$(dirname "$RUN_DIR")" && pwd)/$(basename "$RUN_DIR")"
fi

# -- hosts: namespaces on a bridge in a namespace of its own ---------------------------------------------
if ! err=$(ip netns add "$SW" 2>&1); then
  die "cannot create a network namespace (ip netns add: $err); this check needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN (not in an unprivileged container)"
fi
ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge || die "cannot create a bridge in namespace $SW (kernel without bridge support?)"
ip -n "$SW" link set br0 up
: > "$WORK/hosts.map"
: > "$WORK/hostfile"
for i in $(seq 1 "$HOSTS"); do
  ns=$(host_ns "$i")
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$SW"
  ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$SW" link set "p$i" master br0
  ip -n "$SW" link set "p$i" up
  echo "$SUBNET.$i $ns h$i" >> "$WORK/hosts.map"
  echo "$SUBNET.$i:$RPH" >> "$WORK/hostfile"
done

# -- the launcher hydra runs instead of ssh: SCRIPT [ssh options] HOST COMMAND... -------------------------
cat > "$WORK/launcher" <<EOF
#!/usr/bin/env bash
# hydra's -launcher-exec for namespace hosts: drop ssh options, run COMMAND (joined and parsed by a shell,
# as ssh does) in the namespace that owns HOST's address, under its own hostname.
set -euo pipefail
while [ \$# -gt 0 ]; do
  case "\$1" in
    -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
[ \$# -ge 1 ] || { echo "launcher: no host given" >&2; exit 255; }
host=\$1; shift
line=\$(awk -v h="\$host" '\$1 == h || \$3 == h { print \$2, \$3; exit }' "$WORK/hosts.map")
[ -n "\$line" ] || { echo "launcher: unknown host \$host (not in $WORK/hosts.map)" >&2; exit 255; }
ns=\${line% *}; name=\${line#* }
exec ip netns exec "\$ns" unshare --uts sh -c 'hostname "\$0" && exec sh -c "\$1"' "\$name" "\$*"
EOF
chmod +x "$WORK/launcher"

TINY=(--set data.dataset=digits --set data.validation=200 --set train.epochs=2 --set train.batch_size=32
      --set 'prune.remaining=[0.5, 0.2, 0.1]' --set 'reset.points=["0ep", "10it"]'
      --set 'reset.controls=["random_reinit"]' --set train.eval_every=10it --set parallel.threads=1)
NP=$((HOSTS * RPH))
echo "$PROG: $HOSTS hosts ($(cut -d' ' -f1,3 "$WORK/hosts.map" | tr '\n' ' ' | sed 's/ $//; s/ h/=h/g')), $RPH ranks each; run directory $RUN_DIR"
# mpiexec runs on host h1 (its namespace and hostname), in the background so that a signal reaches the
# trap at once: the clean-up then ends every process inside the namespaces.
ip netns exec "$(host_ns 1)" unshare --uts sh -c 'hostname h1 && exec "$@"' sh \
  timeout -k 10 "$TIMEOUT" "$MPIEXEC" -launcher ssh -launcher-exec "$WORK/launcher" -f "$WORK/hostfile" -iface eth0 \
  -n "$NP" "$PY" -m lthmpi.main --run-dir "$RUN_DIR" --quiet "${TINY[@]}" "${PASS[@]}" > "$WORK/mpiexec.out" 2>&1 &
rc=0
wait $! || rc=$?
if [ "$rc" != 0 ]; then
  tail -n 30 "$WORK/mpiexec.out" >&2
  [ "$rc" = 124 ] && fail "the MPI job did not finish within $TIMEOUT s"
  fail "the MPI job over the namespace hosts exited with status $rc"
fi

# -- the check: the results name every host ------------------------------------------------------------
"$PY" - "$RUN_DIR" "$HOSTS" "$NP" <<'PYEOF'
import collections, json, sys
from lthmpi.results import load

run_dir, n_hosts, n_ranks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
res = load(run_dir)
prov = res["provenance"]
hosts = prov.get("hosts", [])
if isinstance(hosts, str):  # stored as JSON text
    hosts = json.loads(hosts) if hosts.startswith("[") else [hosts]
want = [f"h{i}" for i in range(1, n_hosts + 1)]
per_host = collections.Counter(t["host"] for t in res["tasks"])
problems = []
if prov.get("ranks") != n_ranks:
    problems.append(f"provenance ranks {prov.get('ranks')} != {n_ranks}")
if sorted(hosts) != sorted(want):
    problems.append(f"provenance hosts {hosts} != {want}")
if len(per_host) < min(2, len(res["tasks"])) or not set(per_host) <= set(want):
    problems.append(f"tasks ran on hosts {dict(per_host)}, expected at least 2 of {want}")
if problems:
    sys.exit("multihost.sh: FAILED: " + "; ".join(problems))
tasks = ", ".join(f"{h} {n}" for h, n in sorted(per_host.items()))
print(f"multihost: OK: {n_ranks} ranks on hosts {', '.join(hosts)} (tasks per host: {tasks}); results: {res['path']}")
PYEOF
