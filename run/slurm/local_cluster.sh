#!/usr/bin/env bash
# A private one-node Slurm cluster for tests and trials (root only): slurmctld, slurmd and munged of its own,
# with their slurm.conf, ports, munge key and socket, state, spool, pid and log files all under DIR.
#   run/slurm/local_cluster.sh start DIR     start it (refused while DIR's cluster runs); waits for the node;
#                                            a start after a stop begins with no jobs (slurmctld -c)
#   run/slurm/local_cluster.sh status DIR    its daemons and node; exit 0 running, 3 not running
#   run/slurm/local_cluster.sh stop DIR      cancel its jobs, stop its daemons (by their pid files only)
# Then: export SLURM_CONF=DIR/slurm.conf   (sbatch, squeue, srun, scancel, ... talk to this cluster)
# A site's Slurm and munge are never touched: nothing is read from or written to /etc/slurm or /etc/munge,
# and the system's munged socket is not used. Needs `apt-get install slurm-wlm munge` (run/setup.sh does it
# as root). Knobs: LOCAL_CLUSTER_CPUS (the node's CPUs, default nproc), LOCAL_CLUSTER_TIMEOUT (seconds to
# wait for the node, default 60).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
me=local_cluster.sh
die() { echo "$me: error: $1" >&2; exit "${2:-1}"; }
usage="usage: $me start|stop|status DIR"

[ $# -eq 2 ] || die "$usage" 2
verb=$1
case "$verb" in start|stop|status) ;; *) die "unknown command '$verb'; $usage" 2 ;; esac
[ -n "$2" ] || die "DIR is empty; $usage" 2
DIR=$(realpath -m -- "$2")
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld munged)  # stopped in this order, started in the reverse

pidfile() { case "$1" in munged) echo "$DIR/munge/munged.pid" ;; *) echo "$DIR/run/$1.pid" ;; esac; }

# The pid of DIR's daemon $1 if it runs (the pid file's process, and its command is that daemon), else nothing.
live_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -r "$f" ] || return 0
  pid=$(tr -dc 0-9 < "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
  if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$1"; then echo "$pid"; fi
}

running() {
  local d p out=()
  for d in "${DAEMONS[@]}"; do p=$(live_pid "$d"); [ -z "$p" ] || out+=("$d $p"); done
  if [ ${#out[@]} -gt 0 ]; then printf '%s\n' "${out[@]}" | paste -sd, - | sed 's/,/, /g'; fi
}

node_state() { SLURM_CONF=$CONF timeout 10 sinfo -h -N -o %t 2>/dev/null | head -n 1 || true; }

stop_daemon() {
  local pid i
  pid=$(live_pid "$1")
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  echo "$me: $1 (pid $pid) did not end within 10 s of SIGTERM: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

do_stop() {
  if [ -n "$(live_pid slurmctld)" ]; then  # its jobs first, so that no job step outlives the cluster
    local jobs i
    jobs=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF=$CONF timeout 10 scancel $jobs 2>/dev/null || true
      for i in $(seq 100); do
        [ -z "$(SLURM_CONF=$CONF timeout 10 squeue -h -t all -o %T 2>/dev/null | grep -v -E 'CANCELLED|COMPLETED|FAILED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED' || true)" ] && break
        sleep 0.1
      done
    fi
  fi
  local d
  for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
}

if [ "$verb" = status ]; then
  now=$(running)
  if [ -z "$now" ]; then echo "$me: no cluster of $DIR is running"; exit 3; fi
  echo "$me: $DIR: running: $now; node: $(node_state)"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if [ "$verb" = stop ]; then
  now=$(running)
  if [ -z "$now" ]; then echo "$me: no cluster of $DIR is running"; exit 0; fi
  do_stop
  echo "$me: stopped the cluster of $DIR ($now)"
  exit 0
fi

# ---- start --------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as their users; SlurmUser=root here)"
missing=()
for b in slurmctld slurmd munged sinfo sbatch squeue scontrol scancel srun; do
  command -v "$b" >/dev/null || missing+=("$b")
done
[ ${#missing[@]} -eq 0 ] || die "not installed: ${missing[*]} (apt-get install slurm-wlm munge; run/setup.sh does it as root)"
now=$(running)
# Unix socket paths (munge's socket, slurmstepd's under the spool directory) hold at most 107 bytes.
[ ${#DIR} -le 64 ] || die "DIR is too long (${#DIR} characters; at most 64, for the daemons' Unix sockets under it): $DIR" 2
[ -z "$now" ] || die "the cluster of $DIR is already running ($now): use it (export SLURM_CONF=$CONF) or stop it first ($me stop $DIR)"

mkdir -p "$DIR"/{state,spool,run,log}
install -d -m 0755 "$DIR/munge"  # munged: its socket directory must be searchable by all
rm -f "$DIR"/run/*.pid "$DIR"/munge/munged.pid "$DIR"/munge/munge.socket*

# Two free TCP ports (the kernel's choice; a daemon that loses a race to them fails and says so in its log).
read -r CTLD_PORT SLURMD_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
HOST=$(hostname -s)
CPUS=${LOCAL_CLUSTER_CPUS:-$(nproc)}
case "$CPUS" in ''|*[!0-9]*|0) die "LOCAL_CLUSTER_CPUS must be an integer >= 1, not '$CPUS'" 2 ;; esac
# A config of more CPUs than the machine has needs slurmd to report the configured ones.
overrides=$([ "$CPUS" -gt "$(nproc)" ] && echo "SlurmdParameters=config_overrides" || true)
name=lthmpi$(printf '%s' "$DIR" | cksum | cut -c1-6)
# Job ids never repeat across starts (slurmctld -c would begin again at 1): MPICH names its shared-memory
# segment after the job step (/dev/shm/mpich_shm_*), a rank killed by SIGKILL leaves it behind, and the next
# step of the same id then fails in MPI_Init ("failed to unpack address, invalid bandwidth 0.00", "Out of
# memory" in MPIDI_POSIX_comm_bootstrap). The start's second, below MaxJobId (67043328) by a margin.
FIRST_JOB_ID=$(( $(date +%s) % 60000000 + 1 ))

cat > "$CONF" <<EOF
# A private one-node cluster made by run/slurm/local_cluster.sh: everything under $DIR.
ClusterName=$name
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
FirstJobId=$FIRST_JOB_ID
# A job past its time limit gets SIGTERM, then SIGKILL KillWait seconds later (no grace minutes).
KillWait=2
OverTimeLimit=0
MinJobAge=600
$overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
: > "$DIR/plugstack.conf"

if [ ! -s "$DIR/munge/munge.key" ]; then
  (umask 077; head -c 1024 /dev/urandom > "$DIR/munge/munge.key")
fi
chmod 0400 "$DIR/munge/munge.key"

logs="$DIR/log/munged.log, $DIR/log/slurmctld.log, $DIR/log/slurmd.log"
fail() { do_stop >/dev/null 2>&1 || true; die "$1 (logs: $logs)"; }

munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" --pid-file="$(pidfile munged)" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" >>"$DIR/log/munged.log" 2>&1 ||
  fail "munged did not start"
slurmctld -f "$CONF" -c >>"$DIR/log/slurmctld.log" 2>&1 || fail "slurmctld did not start"
slurmd -f "$CONF" >>"$DIR/log/slurmd.log" 2>&1 || fail "slurmd did not start"

timeout_s=${LOCAL_CLUSTER_TIMEOUT:-60}
deadline=$((SECONDS + timeout_s))
state=
while [ $SECONDS -lt $deadline ]; do
  state=$(node_state)
  case "$state" in idle*) break ;; esac
  if [ $((SECONDS + timeout_s - deadline)) -ge 5 ]; then  # a daemon that died does not come back
    for d in munged slurmctld slurmd; do [ -n "$(live_pid "$d")" ] || fail "$d is not running"; done
  fi
  sleep 0.2
done
case "$state" in idle*) ;; *) fail "node $HOST is not idle after ${timeout_s} s (sinfo says '${state:-nothing}')" ;; esac

echo "$me: cluster $name ($(slurmctld -V)) is up: node $HOST ($CPUS CPUs) idle, slurmctld on port $CTLD_PORT, all files under $DIR"
echo "$me: use it with:  export SLURM_CONF=$CONF      stop it with:  $0 stop $DIR"
