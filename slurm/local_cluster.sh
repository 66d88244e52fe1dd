#!/usr/bin/env bash
# A real Slurm cluster (with accounting) on this one machine, for tests and demos.
#
#   slurm/local_cluster.sh up [--nodes N]
#                                   install Debian packages if missing, start munged, MariaDB,
#                                   slurmdbd, slurmctld, slurmd; wait until the nodes are idle.
#                                   N = 1 (default): one node, this host, partition "debug".
#                                   N > 1: also N nodes pnode1..pnodeN (partition "multi"), each
#                                   slurmd in its own network + UTS namespace with its own hostname
#                                   and address (veth pairs on a bridge, no route off the machine)
#   slurm/local_cluster.sh status   daemons, nodes (with their namespaces and addresses), sinfo
#   slurm/local_cluster.sh env      shell exports a client needs:  eval "$(slurm/local_cluster.sh env)"
#   slurm/local_cluster.sh kill-node NAME
#                                   lose a node: SIGKILL every process in its namespace (its slurmd,
#                                   job steps and tasks) and cut its link; `up --nodes N` restores it
#   slurm/local_cluster.sh down     cancel jobs, stop every daemon, remove namespaces, veths, bridge
#
# Everything (configs, logs, pid files, spool, database, hosts file) lives in the state dir
# ${PARSIMONY_SLURM_DIR:-/tmp/parsimony-slurm-<user>-<checkout id>}: one per user and per checkout
# (the id is a hash of this checkout's path); nothing is written to /etc.  The ports, bridge and
# namespaces are the machine's: `up` claims them in /tmp/parsimony-slurm-claim-<ctld port> and
# refuses (exit 5) while another checkout's cluster holds them, naming it.
# No systemd needed: daemons are started by hand.  Must run as root (or via sudo).
#
# Exit codes: 0 ok, 1 failure (message names the log to read), 2 usage, 3 packages cannot be installed,
# 4 this machine does not allow network namespaces (up --nodes N > 1), 5 another checkout's cluster
# runs on this machine's ports.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/templates"
CHECKOUT="$(cd "$HERE/.." && pwd -P)"
OWNER="${SUDO_USER:-$(id -un)}"
# per user and checkout; exported so that the sudo re-run below (and `env`) keep the same one
STATE="${PARSIMONY_SLURM_DIR:-/tmp/parsimony-slurm-$OWNER-$(printf %s "$CHECKOUT" | sha1sum | cut -c1-8)}"
export PARSIMONY_SLURM_DIR="$STATE"
CLUSTER="${PARSIMONY_SLURM_CLUSTER:-parsimony}"
CPUS="${PARSIMONY_SLURM_CPUS:-2}"
CTLD_PORT="${PARSIMONY_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${PARSIMONY_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${PARSIMONY_SLURM_DBD_PORT:-6819}"
DB_PORT="${PARSIMONY_SLURM_DB_PORT:-3316}"
WAIT_S="${PARSIMONY_SLURM_WAIT_S:-60}"
# Multi-node mode (up --nodes N, N > 1): the namespaced nodes' names, subnet and bridge.
NODES=1
NODE_PREFIX="${PARSIMONY_SLURM_NODE_PREFIX:-pnode}"
SUBNET="${PARSIMONY_SLURM_SUBNET:-10.77.0}"          # /24: bridge .1, node k at .(10 + k)
BRIDGE="${PARSIMONY_SLURM_BRIDGE:-pslbr0}"
NODE_IF="clus0"                                      # the node's interface inside its namespace
SLURMD_TIMEOUT="${PARSIMONY_SLURM_SLURMD_TIMEOUT:-30}"  # a silent node is DOWN after this
MULTI_PARTITION=multi
HOST="$(hostname -s)"
CONF="$STATE/etc/slurm.conf"
export SLURM_CONF="$CONF"
# who holds this machine's cluster resources (the ports from CTLD_PORT on, the bridge, the namespaces)
CLAIM="/tmp/parsimony-slurm-claim-$CTLD_PORT"
EXIT_TAKEN=5
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin"

PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server iproute2)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "must run as root (or have sudo)"
  SUDO="sudo"
  # Re-run the whole script as root, keeping our settings.
  exec sudo --preserve-env=PARSIMONY_SLURM_DIR,PARSIMONY_SLURM_CLUSTER,PARSIMONY_SLURM_CPUS,PARSIMONY_SLURM_CTLD_PORT,PARSIMONY_SLURM_SLURMD_PORT,PARSIMONY_SLURM_DBD_PORT,PARSIMONY_SLURM_DB_PORT,PARSIMONY_SLURM_WAIT_S,PARSIMONY_SLURM_MEM_MB,PARSIMONY_SLURM_NODE_PREFIX,PARSIMONY_SLURM_SUBNET,PARSIMONY_SLURM_BRIDGE,PARSIMONY_SLURM_SLURMD_TIMEOUT \
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
# Daemon names: munged mariadbd slurmdbd slurmctld slurmd (this host's node), slurmd@NODE (a
# namespaced node).  Every slurmd writes $STATE/run/slurmd-<node>.pid (SlurmdPidFile=...-%n.pid).
pidfile() {
  case "$1" in
    mariadbd) echo "$STATE/mysql/mariadbd.pid" ;;  # mariadbd runs as mysql: a dir it owns
    slurmd) echo "$STATE/run/slurmd-$HOST.pid" ;;
    slurmd@*) echo "$STATE/run/slurmd-${1#slurmd@}.pid" ;;
    *) echo "$STATE/run/$1.pid" ;;
  esac
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
      munged:munged|mariadbd:mariadbd|mariadbd:mysqld|slurmdbd:slurmdbd|slurmctld:slurmctld|slurmd:slurmd|slurmd@*:slurmd)
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

ctld_addr() { if [ "$NODES" -gt 1 ]; then echo "$SUBNET.1"; else echo 127.0.0.1; fi; }

render() {  # render TEMPLATE DEST
  sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" \
      -e "s|@CTLD_ADDR@|$(ctld_addr)|g" -e "s|@SLURMD_TIMEOUT@|$SLURMD_TIMEOUT|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$(mem_mb)|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
      -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$(db_pass)|g" "$1" >"$2.tmp"
  mv "$2.tmp" "$2"
}

# ---------------------------------------------------------------- namespaced nodes
node_name() { echo "$NODE_PREFIX$1"; }          # node k (1-based)
node_ns() { echo "parsimony-$NODE_PREFIX$1"; }  # its network namespace
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_veth() { echo "pslv$1"; }                  # the host end of its veth pair, on the bridge
node_index() {                                  # NAME -> k, or nothing
  local k
  for ((k = 1; k <= NODES; k++)); do [ "$(node_name $k)" = "$1" ] && { echo $k; return; }; done
}
nodes_of_state() { cat "$STATE/etc/nodes" 2>/dev/null || echo 1; }  # N of the cluster last brought up
all_node_names() {  # every Slurm node of the cluster: this host, then pnode1..N (N > 1 only)
  local k; echo "$HOST"
  [ "$NODES" -gt 1 ] || return 0
  for ((k = 1; k <= NODES; k++)); do node_name $k; done
}

# The names the nodes resolve: the controller at the bridge, every node at its address.  Bind-mounted
# over /etc/hosts inside each node's own mount namespace only; the machine's /etc/hosts is untouched.
write_hosts() {
  local k f="$STATE/etc/hosts"
  {
    echo "# written by local_cluster.sh: the namespaced nodes' view of the cluster"
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$SUBNET.1 $HOST"
    for ((k = 1; k <= NODES; k++)); do echo "$(node_addr $k) $(node_name $k)"; done
  } >"$f.tmp"
  chmod 644 "$f.tmp"; mv "$f.tmp" "$f"
}

no_namespaces() {  # exit 4: this machine does not let us build the namespaced nodes
  log "cannot $1: the namespaced nodes need CAP_NET_ADMIN and CAP_SYS_ADMIN (root outside a restricted container)"
  net_down
  exit 4
}

# Bridge + one namespace per node, joined by a veth pair.  Idempotent: it also brings back a link a
# kill-node cut.  No default route, no forwarding, no NAT: nothing leaves the machine.
net_up() {
  local k ns veth
  command -v ip >/dev/null || die "the multi-node cluster needs iproute2 (ip)"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge || no_namespaces "create bridge $BRIDGE"
  ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((k = 1; k <= NODES; k++)); do
    ns="$(node_ns $k)"; veth="$(node_veth $k)"
    [ -e "/run/netns/$ns" ] || ip netns add "$ns" || no_namespaces "create network namespace $ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip -n "$ns" link del "$NODE_IF" >/dev/null 2>&1 || true
      ip link add "$veth" type veth peer name "$NODE_IF" netns "$ns" || no_namespaces "create veth $veth"
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$(node_addr $k)/24" dev "$NODE_IF"
    ip -n "$ns" link set "$NODE_IF" up
  done
}

# Remove every namespace, veth and the bridge this script made (any N: whatever exists).
net_down() {
  local ns pids veth
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^parsimony-$NODE_PREFIX[0-9]*$"); do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    [ -n "${pids// /}" ] && { log "killing processes left in $ns: $pids"; kill -KILL $pids 2>/dev/null || true; }
    ip netns del "$ns" 2>/dev/null || true
  done
  for veth in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^pslv[0-9]*$'); do
    ip link del "$veth" 2>/dev/null || true
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  return 0
}

prepare_state() {
  mkdir -p "$STATE"/{etc,run,log,ctld,slurmd,munge,mysql}
  chmod 755 "$STATE"
  render "$TEMPLATES/slurm.conf" "$STATE/etc/slurm.conf.new"
  if [ "$NODES" -gt 1 ]; then
    local k
    {
      echo ""
      echo "# up --nodes $NODES: namespaced nodes, each slurmd in its own network + UTS namespace"
      for ((k = 1; k <= NODES; k++)); do
        echo "NodeName=$(node_name $k) NodeAddr=$(node_addr $k) NodeHostname=$(node_name $k) CPUs=$CPUS RealMemory=$(mem_mb) State=UNKNOWN"
      done
      echo "PartitionName=$MULTI_PARTITION Nodes=${NODE_PREFIX}[1-$NODES] MaxTime=INFINITE State=UP"
    } >>"$STATE/etc/slurm.conf.new"
    write_hosts
  fi
  chmod 644 "$STATE/etc/slurm.conf.new"
  render "$TEMPLATES/slurmdbd.conf" "$STATE/etc/slurmdbd.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd insists; it holds the DB password
}

# Install the new slurm.conf; if the cluster runs with another one (another --nodes), restart
# slurmctld and the slurmds on it (jobs are kept in the controller's state).
install_conf() {
  local new="$STATE/etc/slurm.conf.new" prev_nodes k
  if [ -f "$CONF" ] && ! cmp -s "$new" "$CONF"; then
    prev_nodes="$(nodes_of_state)"
    if running slurmctld; then
      log "the cluster's configuration changes (nodes: $prev_nodes -> $NODES): restarting slurmctld and slurmds"
    fi
    stop_daemon slurmd 20
    for ((k = 1; k <= prev_nodes; k++)); do stop_daemon "slurmd@$(node_name $k)" 20; done
    stop_daemon slurmctld 20
    [ "$NODES" -gt 1 ] || net_down
  fi
  mv "$new" "$CONF"
  echo "$NODES" >"$STATE/etc/nodes"
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
  local lf="$STATE/log/slurmd-$HOST.log"
  slurmd >>"$lf" 2>&1 9>&- || die "slurmd failed to start; see $lf"
  wait_for slurmd "$lf" 15 running slurmd
  log "slurmd up (pid $(daemon_pid slurmd))"
}

# slurmd of namespaced node k: in its network namespace, with its own UTS namespace
# (hostname = node name: slurmd finds its NodeName from it) and mount namespace (our hosts file
# over /etc/hosts).  Its job steps and tasks inherit all three.
start_node_slurmd() {
  local k=$1 name ns lf
  name="$(node_name $k)"; ns="$(node_ns $k)"; lf="$STATE/log/slurmd-$name.log"
  running "slurmd@$name" && return 0
  mkdir -p "$STATE/slurmd/$name"
  # (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd needs)
  if ! nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- true 2>>"$lf"; then
    no_namespaces "enter namespace $ns with its own hostname and mounts (see $lf)"
  fi
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd' _ "$name" "$STATE/etc/hosts" \
    >>"$lf" 2>&1 9>&- || die "slurmd of node $name failed to start; see $lf"
  wait_for "slurmd of $name" "$lf" 15 running "slurmd@$name"
  log "slurmd of $name up in namespace $ns at $(node_addr $k) (pid $(daemon_pid "slurmd@$name"))"
}

node_state() { timeout 10 sinfo -h -N -n "${1:-$HOST}" -o %T 2>/dev/null | head -1; }

wait_node_idle() {
  local node=${1:-$HOST} i=0 st="" deadline=$((SECONDS + WAIT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    i=$((i + 1))
    st="$(node_state "$node")"
    case "$st" in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*)
        # e.g. left down by an earlier unclean stop or a kill-node: bring it back
        [ $((i % 20)) = 4 ] && scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.25
  done
  log "node $node is '$st' after ${WAIT_S}s"
  scontrol show node "$node" >&2 || true
  log "last lines of $STATE/log/slurmd-$node.log:"; tail -10 "$STATE/log/slurmd-$node.log" >&2 || true
  die "node $node not idle; see $STATE/log/slurmctld.log and $STATE/log/slurmd-$node.log"
}

all_up() {
  local d k
  for d in "${DAEMONS[@]}"; do running "$d" || return 1; done
  for ((k = 1; k <= NODES; k++)); do
    [ "$NODES" -gt 1 ] || break
    running "slurmd@$(node_name $k)" || return 1
    # a link cut by kill-node
    ip link show "$(node_veth $k)" 2>/dev/null | grep -q "state UP\|LOWER_UP" || return 1
  done
  [ -n "$(node_state)" ]
}

# ---------------------------------------------------------------- the machine's claim
claim_field() { [ -f "$CLAIM" ] || return 0; sed -n "s/^$1=//p" "$CLAIM" | head -1; }

# Is the cluster of state dir $1 running?  (its slurmctld or mariadbd, checked through /proc)
state_running() {
  local f pid
  for f in "$1/run/slurmctld.pid" "$1/mysql/mariadbd.pid"; do
    pid="$(tr -dc 0-9 <"$f" 2>/dev/null || true)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -qE '^(slurmctld|mariadbd|mysqld)$' "/proc/$pid/comm" && return 0
  done
  return 1
}

# Take the claim for this state dir, or exit 5 naming the checkout, user and state dir that hold it.
# A claim whose cluster no longer runs is stale and taken over.  An unclaimed slurmctld port in use
# (a cluster of an older version of this script, or another program) is refused too.
take_claim() {
  (
    flock -w 60 8 || die "another local_cluster.sh holds $CLAIM.lock"
    if others_claim; then
      log "ERROR: this machine's local cluster (ports $CTLD_PORT-$DBD_PORT, $DB_PORT, bridge $BRIDGE) is" \
          "$(claim_holder); it is not taken over. Bring it down with:" \
          "$(claim_field checkout)/slurm/local_cluster.sh down" \
          "(or give this cluster other PARSIMONY_SLURM_*_PORT, _SUBNET, _BRIDGE and _NODE_PREFIX)"
      exit "$EXIT_TAKEN"
    fi
    if [ "$(claim_field state)" != "$STATE" ] && ! running slurmctld \
        && (exec 3<>"/dev/tcp/127.0.0.1/$CTLD_PORT") 2>/dev/null; then
      log "ERROR: port $CTLD_PORT (slurmctld) is in use by a process this checkout did not start" \
          "(a local cluster not claimed by this script); stop that cluster (an older one keeps its state in" \
          "/tmp/parsimony-slurm: PARSIMONY_SLURM_DIR=/tmp/parsimony-slurm $0 down) or set PARSIMONY_SLURM_CTLD_PORT"
      exit "$EXIT_TAKEN"
    fi
    printf 'state=%s\ncheckout=%s\nuser=%s\n' "$STATE" "$CHECKOUT" "$OWNER" >"$CLAIM.tmp"
    chmod 644 "$CLAIM.tmp"; mv "$CLAIM.tmp" "$CLAIM"
  ) 8>"$CLAIM.lock"
}

# Is this machine's cluster another checkout's?  (then its namespaces and nodes are not ours to touch)
others_claim() {
  local other; other="$(claim_field state)"
  [ -n "$other" ] && [ "$other" != "$STATE" ] && state_running "$other"
}

# Who holds the claim, in words: "run by checkout C of user U, state dir S".
claim_holder() {
  echo "run by checkout $(claim_field checkout) of user $(claim_field user), state dir $(claim_field state)"
}

drop_claim() { [ "$(claim_field state)" = "$STATE" ] && rm -f "$CLAIM"; return 0; }

# ---------------------------------------------------------------- commands
cmd_up() {
  local t0=$SECONDS k
  if [ -z "$(missing_packages)" ] && [ -f "$CONF" ] && [ "$(nodes_of_state)" = "$NODES" ] && all_up; then
    log "already up ($STATE): $(all_node_names | while read -r n; do printf '%s %s, ' "$n" "$(node_state "$n")"; done)"
    return 0
  fi
  take_claim
  ensure_packages
  local t1=$SECONDS
  prepare_state
  install_conf
  [ "$NODES" -gt 1 ] && net_up
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  for ((k = 1; k <= NODES; k++)); do [ "$NODES" -gt 1 ] && start_node_slurmd $k; done
  while read -r n; do wait_node_idle "$n"; done < <(all_node_names)
  log "cluster '$CLUSTER' up in $((SECONDS - t1)) s (plus $((t1 - t0)) s checking/installing packages):" \
      "$(all_node_names | while read -r n; do printf '%s %s, ' "$n" "$(node_state "$n")"; done)state dir $STATE"
  log "client env:  eval \"\$($0 env)\""
}

cmd_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export PARSIMONY_SLURM_DIR=$STATE"
  # the namespaced nodes' partition ("" for a one-node cluster)
  if [ "$NODES" -gt 1 ]; then echo "export PARSIMONY_SLURM_MULTI_PARTITION=$MULTI_PARTITION"
  else echo "export PARSIMONY_SLURM_MULTI_PARTITION="; fi
}

cmd_status() {
  local d pid rc=0 k name ns link
  echo "state dir: $STATE"
  for d in "${DAEMONS[@]}"; do
    pid="$(daemon_pid "$d")"
    if [ -n "$pid" ]; then printf '  %-10s running (pid %s)\n' "$d" "$pid"
    else printf '  %-10s stopped\n' "$d"; rc=1; fi
  done
  echo "nodes:"
  printf '  %-10s 127.0.0.1     this host (partition debug)\n' "$HOST"
  for ((k = 1; k <= NODES; k++)); do
    [ "$NODES" -gt 1 ] || break
    name="$(node_name $k)"; ns="$(node_ns $k)"
    pid="$(daemon_pid "slurmd@$name")"
    link="$(ip -br link show "$(node_veth $k)" 2>/dev/null | awk '{print $2}')"
    printf '  %-10s %-13s namespace %s, link %s, slurmd %s (partition %s)\n' "$name" "$(node_addr $k)" "$ns" \
      "${link:-missing}" "${pid:-stopped}" "$MULTI_PARTITION"
    [ -n "$pid" ] && [ "$link" = UP ] || rc=1
  done
  if running slurmctld; then
    sinfo -N -o '%N %P %T %c %m' || rc=1
    squeue || true
  fi
  return $rc
}

# Lose node NAME as a machine is lost: every process in its namespace (slurmd, slurmstepd, tasks) is
# SIGKILLed and its link cut.  The controller marks it DOWN after SlurmdTimeout.  `up --nodes N` restores it.
cmd_kill_node() {
  local name=$1 k ns pids
  others_claim && die "this machine's local cluster is $(claim_holder), not by this one"
  k="$(node_index "$name")"
  [ -n "$k" ] || die "no namespaced node '$name' (the nodes are: $(for ((k = 1; k <= NODES; k++)); do printf '%s ' "$(node_name $k)"; done))"
  ns="$(node_ns $k)"
  ip link set "$(node_veth $k)" down 2>/dev/null || true
  pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null || true
  rm -f "$(pidfile "slurmd@$name")"
  log "node $name lost: link down, killed ${pids:-nothing}"
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
  if others_claim; then
    log "nothing to stop: this machine's local cluster is $(claim_holder), not by this one ($STATE)"
    return 0
  fi
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
  for ((i = 1; i <= NODES; i++)); do stop_daemon "slurmd@$(node_name $i)" 20; done
  stop_daemon slurmctld 20
  net_down
  pids="$(our_stepds)"
  if [ -n "$pids" ]; then
    log "killing leftover slurmstepd: $pids"
    kill -KILL $pids 2>/dev/null || true
  fi
  stop_daemon slurmdbd 20
  stop_daemon mariadbd 60
  stop_daemon munged 10
  rm -f "$STATE/munge/munged.pid"
  drop_claim
  log "down"
}

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-}" arg=""
  shift || true
  case "$cmd" in
    up)
      NODES=1
      while [ $# -gt 0 ]; do
        case "$1" in
          --nodes) NODES="${2:-}"; shift 2 || { usage >&2; return 2; } ;;
          --nodes=*) NODES="${1#--nodes=}"; shift ;;
          *) log "unknown option '$1'"; usage >&2; return 2 ;;
        esac
      done
      [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { log "--nodes must be a number from 1 to 99, got '$NODES'"; return 2; } ;;
    down|status|env) NODES="$(nodes_of_state)" ;;
    kill-node) NODES="$(nodes_of_state)"; arg="${1:-}"; [ -n "$arg" ] || { usage >&2; return 2; } ;;
    -h|--help|help) usage; return 0 ;;
    *) usage >&2; return 2 ;;
  esac
  if [ "$cmd" = env ]; then cmd_env; return 0; fi
  mkdir -p "$STATE"
  # One up/down at a time (pytest sessions, make targets and humans may race).
  # (fd 9 is closed for every daemon we start, or they would hold the lock forever.)
  exec 9>"$STATE/.lock"
  flock -w 300 9 || die "another local_cluster.sh holds $STATE/.lock"
  "cmd_${cmd//-/_}" $arg
}

main "$@"
