#!/usr/bin/env bash
# A real one-node Slurm cluster (with accounting) on localhost, for tests and demos.
#
#   slurm/local_cluster.sh up       install Debian packages if missing, start munged, MariaDB,
#                                   slurmdbd, slurmctld, slurmd; wait until the node is idle
#   slurm/local_cluster.sh status   daemons and sinfo
#   slurm/local_cluster.sh env      shell exports a client needs:  eval "$(slurm/local_cluster.sh env)"
#   slurm/local_cluster.sh down     cancel jobs, stop every daemon this script started
#
# Everything (configs, logs, pid files, spool, database) lives in the state dir
# ${PARSIMONY_SLURM_DIR:-/tmp/parsimony-slurm}; nothing is written to /etc/slurm.
# No systemd needed: daemons are started by hand.  Must run as root (or via sudo).
#
# Exit codes: 0 ok, 1 failure (message names the log to read), 3 packages cannot be installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/templates"
STATE="${PARSIMONY_SLURM_DIR:-/tmp/parsimony-slurm}"
CLUSTER="${PARSIMONY_SLURM_CLUSTER:-parsimony}"
CPUS="${PARSIMONY_SLURM_CPUS:-2}"
CTLD_PORT="${PARSIMONY_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${PARSIMONY_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${PARSIMONY_SLURM_DBD_PORT:-6819}"
DB_PORT="${PARSIMONY_SLURM_DB_PORT:-3316}"
WAIT_S="${PARSIMONY_SLURM_WAIT_S:-60}"
HOST="$(hostname -s)"
CONF="$STATE/etc/slurm.conf"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin"

PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "must run as root (or have sudo)"
  SUDO="sudo"
  # Re-run the whole script as root, keeping our settings.
  exec sudo --preserve-env=PARSIMONY_SLURM_DIR,PARSIMONY_SLURM_CLUSTER,PARSIMONY_SLURM_CPUS,PARSIMONY_SLURM_CTLD_PORT,PARSIMONY_SLURM_SLURMD_PORT,PARSIMONY_SLURM_DBD_PORT,PARSIMONY_SLURM_DB_PORT,PARSIMONY_SLURM_WAIT_S \
    bash "$0" "$@"
fi

# ---------------------------------------------------------------- packages
missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

ensure_packages() {
  local missing
  missing="$(missing_packages | tr '\n' ' ')"
  [ -z "${missing// /}" ] && return 0
  command -v apt-get >/dev/null || { log "no apt-get: cannot install $missing"; exit 3; }
  log "installing Debian packages: $missing"
  local t0=$SECONDS
  mkdir -p "$STATE/log"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $missing; } \
         >"$STATE/log/apt.log" 2>&1; then
    log "apt-get failed, see $STATE/log/apt.log"; tail -5 "$STATE/log/apt.log" >&2; exit 3
  fi
  [ -z "$(missing_packages)" ] || { log "still missing after install: $(missing_packages | tr '\n' ' ')"; exit 3; }
  log "packages installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- processes
pidfile() {
  # mariadbd runs as mysql and writes its pid file in its own (mysql-owned) dir.
  if [ "$1" = mariadbd ]; then echo "$STATE/mysql/mariadbd.pid"; else echo "$STATE/run/$1.pid"; fi
}

# pid of a running daemon (from its pid file, checked against /proc), or nothing.
# A stale pid file (dead pid, or pid reused by another program) is removed.
daemon_pid() {
  local name=$1 f pid comm
  f="$(pidfile "$name")"
  [ -s "$f" ] || return 0
  pid="$(tr -dc 0-9 <"$f")"
  # (a zombie -- dead, not yet reaped by init -- counts as stopped)
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    # comm is cut at 15 chars; mariadbd may show as mysqld on some builds.
    case "$name:$comm" in
      munged:munged|mariadbd:mariadbd|mariadbd:mysqld|slurmdbd:slurmdbd|slurmctld:slurmctld|slurmd:slurmd)
        echo "$pid"; return 0 ;;
    esac
  fi
  rm -f "$f"
}

running() { [ -n "$(daemon_pid "$1")" ]; }

# stop_daemon NAME [timeout_s]: TERM, wait, then KILL.
stop_daemon() {
  local name=$1 timeout=${2:-20} pid i
  pid="$(daemon_pid "$name")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 5; i++)); do
    [ -d "/proc/$pid" ] || break
    # a zombie child of ours counts as gone
    grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
    log "$name ($pid) ignored SIGTERM for ${timeout}s, killing"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$(pidfile "$name")"
  log "stopped $name ($pid)"
}

# wait_for DESCRIPTION LOGFILE TIMEOUT CMD...: poll CMD every 0.25 s (CMD bounds its own time).
wait_for() {
  local what=$1 logf=$2 timeout=$3 deadline
  shift 3
  deadline=$((SECONDS + timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    # WAIT_PID: the process we are waiting on; stop early if it died.
    if [ -n "${WAIT_PID:-}" ] && ! kill -0 "$WAIT_PID" 2>/dev/null; then
      log "$what exited during start-up"; [ -f "$logf" ] && tail -15 "$logf" >&2
      die "$what failed to start; see $logf"
    fi
    sleep 0.25
  done
  log "timed out after ${timeout}s waiting for $what"
  [ -f "$logf" ] && { log "last lines of $logf:"; tail -15 "$logf" >&2; }
  die "$what not ready; see $logf"
}

# ---------------------------------------------------------------- config
mem_mb() {
  # Offer most of the machine's memory (configurable), at least 1 GiB.
  if [ -n "${PARSIMONY_SLURM_MEM_MB:-}" ]; then echo "$PARSIMONY_SLURM_MEM_MB"; return; fi
  local total
  total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  total=$((total * 8 / 10))
  [ "$total" -lt 1024 ] && total=1024
  echo "$total"
}

db_pass() {
  local f="$STATE/etc/db.pass"
  [ -s "$f" ] || { head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$f"; chmod 600 "$f"; }
  cat "$f"
}

render() {  # render TEMPLATE DEST
  sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$(mem_mb)|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
      -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$(db_pass)|g" "$1" >"$2.tmp"
  mv "$2.tmp" "$2"
}

prepare_state() {
  mkdir -p "$STATE"/{etc,run,log,ctld,slurmd,munge,mysql}
  chmod 755 "$STATE"
  render "$TEMPLATES/slurm.conf" "$STATE/etc/slurm.conf"
  render "$TEMPLATES/slurmdbd.conf" "$STATE/etc/slurmdbd.conf"
  chmod 644 "$STATE/etc/slurm.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd insists; it holds the DB password
}

# ---------------------------------------------------------------- daemons
start_munged() {
  running munged && return 0
  local d="$STATE/munge"
  if [ ! -s "$d/munge.key" ]; then
    dd if=/dev/urandom of="$d/munge.key" bs=1024 count=1 status=none
  fi
  rm -f "$d/munge.socket.2" "$d/munge.socket.2.lock"
  chown -R munge:munge "$d"
  chmod 755 "$d"; chmod 400 "$d/munge.key"
  touch "$STATE/log/munged.log"; chown munge:munge "$STATE/log/munged.log"
  # munged runs as the munge user and keeps key, socket, seed and log in its own dir.
  runuser -u munge -- /usr/sbin/munged --key-file="$d/munge.key" --socket="$d/munge.socket.2" \
    --pid-file="$d/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$d/munged.seed" \
    >>"$STATE/log/munged.log" 2>&1 9>&- || die "munged failed to start; see $STATE/log/munged.log"
  wait_for munged "$STATE/log/munged.log" 10 test -s "$d/munged.pid"
  cp "$d/munged.pid" "$(pidfile munged)"
  wait_for "munge socket" "$STATE/log/munged.log" 10 \
    sh -c "munge -n -S '$d/munge.socket.2' | unmunge -S '$d/munge.socket.2'"
  log "munged up (pid $(daemon_pid munged))"
}

mysql_root() { timeout 20 mariadb --no-defaults -S "$STATE/mysql/mysqld.sock" -u root "$@"; }

start_mariadb() {
  running mariadbd && return 0
  local d="$STATE/mysql" lf="$STATE/log/mariadb.log"
  chown mysql:mysql "$d"
  touch "$lf"; chown mysql:mysql "$lf"
  if [ ! -d "$d/data/mysql" ]; then
    log "initialising MariaDB data dir $d/data"
    rm -rf "$d/data"
    mariadb-install-db --no-defaults --user=mysql --datadir="$d/data" \
      --auth-root-authentication-method=socket --skip-test-db >>"$lf" 2>&1 \
      || die "mariadb-install-db failed; see $lf"
  fi
  rm -f "$d/mysqld.sock"
  setsid mariadbd --no-defaults --user=mysql --datadir="$d/data" --socket="$d/mysqld.sock" \
    --pid-file="$(pidfile mariadbd)" --log-error="$lf" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    --innodb-log-file-size=16M --max-connections=50 </dev/null >>"$lf" 2>&1 9>&- &
  WAIT_PID=$! wait_for MariaDB "$lf" 60 mysql_root -e "SELECT 1"
  local pass; pass="$(db_pass)"
  mysql_root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" >>"$lf" 2>&1 \
    || die "could not create the slurm DB user; see $lf"
  log "MariaDB up on 127.0.0.1:$DB_PORT (pid $(daemon_pid mariadbd))"
}

start_slurmdbd() {
  running slurmdbd && return 0
  local lf="$STATE/log/slurmdbd.log"
  # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF.
  slurmdbd >>"$lf" 2>&1 9>&- || die "slurmdbd failed to start; see $lf"
  wait_for slurmdbd "$lf" 60 timeout 10 sacctmgr -n show cluster
  log "slurmdbd up on 127.0.0.1:$DBD_PORT (pid $(daemon_pid slurmdbd))"
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >>"$lf" 2>&1 || die "sacctmgr add cluster failed; see $lf"
    log "registered cluster '$CLUSTER' in accounting"
  fi
}

start_slurmctld() {
  running slurmctld && return 0
  local lf="$STATE/log/slurmctld.log"
  slurmctld -i >>"$lf" 2>&1 9>&- || die "slurmctld failed to start; see $lf"
  wait_for slurmctld "$lf" 30 timeout 10 scontrol ping
  log "slurmctld up (pid $(daemon_pid slurmctld))"
}

start_slurmd() {
  running slurmd && return 0
  local lf="$STATE/log/slurmd.log"
  slurmd >>"$lf" 2>&1 9>&- || die "slurmd failed to start; see $lf"
  wait_for slurmd "$lf" 15 running slurmd
  log "slurmd up (pid $(daemon_pid slurmd))"
}

node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }

wait_node_idle() {
  local i=0 st="" deadline=$((SECONDS + WAIT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    i=$((i + 1))
    st="$(node_state)"
    case "$st" in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*)
        # e.g. left down by an earlier unclean stop: bring it back once
        [ $((i % 20)) = 4 ] && scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.25
  done
  log "node $HOST is '$st' after ${WAIT_S}s"
  scontrol show node "$HOST" >&2 || true
  log "last lines of $STATE/log/slurmd.log:"; tail -10 "$STATE/log/slurmd.log" >&2 || true
  die "node not idle; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

all_up() {
  local d
  for d in "${DAEMONS[@]}"; do running "$d" || return 1; done
  [ -n "$(node_state)" ]
}

# ---------------------------------------------------------------- commands
cmd_up() {
  local t0=$SECONDS
  if [ -z "$(missing_packages)" ] && [ -f "$CONF" ] && all_up; then
    log "already up ($STATE): node $HOST is $(node_state)"
    return 0
  fi
  ensure_packages
  local t1=$SECONDS
  prepare_state
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_node_idle
  log "cluster '$CLUSTER' up in $((SECONDS - t1)) s (plus $((t1 - t0)) s checking/installing packages): node $HOST $(node_state), state dir $STATE"
  log "client env:  eval \"\$($0 env)\""
}

cmd_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export PARSIMONY_SLURM_DIR=$STATE"
}

cmd_status() {
  local d pid rc=0
  echo "state dir: $STATE"
  for d in "${DAEMONS[@]}"; do
    pid="$(daemon_pid "$d")"
    if [ -n "$pid" ]; then printf '  %-10s running (pid %s)\n' "$d" "$pid"
    else printf '  %-10s stopped\n' "$d"; rc=1; fi
  done
  if running slurmctld; then
    sinfo || rc=1
    squeue || true
  fi
  return $rc
}

# slurmstepd processes that belong to this cluster (they hold files in our spool dir).
our_stepds() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    if ls -l "$p/fd" 2>/dev/null | grep -q -- "$STATE/"; then basename "$p"; fi
  done
}

cmd_down() {
  if [ ! -d "$STATE/run" ]; then log "nothing to stop ($STATE does not exist)"; return 0; fi
  local i pids
  if running slurmctld; then
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      log "cancelling jobs"
      scancel --full --quiet $(squeue -h -o %i) 2>/dev/null || true
      for ((i = 0; i < 60; i++)); do
        [ -z "$(squeue -h -t all -o %i 2>/dev/null | head -1)" ] && break
        # jobs in COMPLETING state still show up; give them up to 15 s
        squeue -h -o %T 2>/dev/null | grep -qvE 'COMPLETING' || break
        sleep 0.25
      done
    fi
  fi
  stop_daemon slurmd 20
  stop_daemon slurmctld 20
  pids="$(our_stepds)"
  if [ -n "$pids" ]; then
    log "killing leftover slurmstepd: $pids"
    kill -KILL $pids 2>/dev/null || true
  fi
  stop_daemon slurmdbd 20
  stop_daemon mariadbd 60
  stop_daemon munged 10
  rm -f "$STATE/munge/munged.pid"
  log "down"
}

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-}"
  case "$cmd" in
    up|down|status|env) ;;
    -h|--help|help) usage; return 0 ;;
    *) usage >&2; return 2 ;;
  esac
  if [ "$cmd" = env ]; then cmd_env; return 0; fi
  mkdir -p "$STATE"
  # One up/down at a time (pytest sessions, make targets and humans may race).
  # (fd 9 is closed for every daemon we start, or they would hold the lock forever.)
  exec 9>"$STATE/.lock"
  flock -w 300 9 || die "another local_cluster.sh holds $STATE/.lock"
  "cmd_$cmd"
}

main "$@"
