#!/usr/bin/env bash
# A one-node SLURM cluster on this host for the tests marked `slurm` (run by scripts/services.sh,
# as root): Debian's slurm-wlm and munge. Writes a minimal /etc/slurm/slurm.conf for this host
# (no cgroups: proctrack/linuxproc, task/none), creates the munge key if missing, starts munged,
# MariaDB + slurmdbd (accounting: submitit reads job states with `sacct`, and without it waits
# forever for a job that was cancelled), slurmctld and slurmd unless they run already, and waits
# until the node is idle and `srun true` works. Idempotent: a second run with the cluster up
# changes nothing.
# KillWait is short (5 s) so that `scancel` of a job that ignores SIGTERM ends it quickly in tests.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm: must run as root (starts munged, slurmctld, slurmd)" >&2
  exit 2
fi
for bin in munged slurmdbd slurmctld slurmd sinfo srun scontrol sacct sacctmgr mariadbd; do
  command -v "$bin" >/dev/null || { echo "slurm: $bin not found (apt-get install slurm-wlm slurmdbd munge mariadb-server)" >&2; exit 2; }
done

host=$(hostname -s)
cpus=$(nproc)
# RealMemory (MB): below what slurmd detects, so the node is never drained for "low memory".
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf=/etc/slurm/slurm.conf

# ------------------------------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  echo "slurm: creating /etc/munge/munge.key" >&2
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "slurm: starting munged" >&2
  rm -f /run/munge/munge.socket.2.lock
  su -s /bin/sh munge -c "/usr/sbin/munged --force"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.2
  done
  munge -n | unmunge >/dev/null || { echo "slurm: munged does not answer" >&2; exit 1; }
fi

install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
# A daemon runs when a process of that name exists that is not a zombie (init here may leave
# the zombies of dead daemons around, and pgrep lists them).
running() {
  local pid
  for pid in $(pgrep -x "$1"); do
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z* | "") ;; *) return 0 ;; esac
  done
  return 1
}

# ---------------------------------------------------------------------------------- slurm.conf
new=$(mktemp)
cat >"$new" <<CONF
# Written by chronicle-integrations scripts/services/slurm.sh: a one-node test cluster.
ClusterName=chronicle
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=5
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
changed=0
if ! cmp -s "$new" "$conf"; then
  install -m 0644 "$new" "$conf"
  changed=1
  echo "slurm: wrote $conf" >&2
fi
rm -f "$new"

# ------------------------------------------------------------------- accounting: MariaDB, slurmdbd
if ! mysqladmin ping >/dev/null 2>&1; then
  echo "slurm: starting MariaDB" >&2
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  (setsid mysqld_safe </dev/null >/dev/null 2>&1 &)
  for _ in $(seq 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin ping >/dev/null || { echo "slurm: MariaDB does not answer" >&2; exit 1; }
fi
db_pass=chronicle-slurm-test
mysql -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
dbd_conf=/etc/slurm/slurmdbd.conf
new=$(mktemp)
cat >"$new" <<CONF
# Written by chronicle-integrations scripts/services/slurm.sh: accounting for the test cluster.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
CONF
dbd_changed=0
if ! cmp -s "$new" "$dbd_conf"; then
  install -m 0600 "$new" "$dbd_conf"
  dbd_changed=1
fi
rm -f "$new"
if running slurmdbd && [ "$dbd_changed" -eq 1 ]; then
  pkill -x slurmdbd || true
  for _ in $(seq 50); do running slurmdbd || break; sleep 0.2; done
fi
if ! running slurmdbd; then
  echo "slurm: starting slurmdbd" >&2
  setsid /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1
fi
for _ in $(seq 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster >/dev/null || { echo "slurm: slurmdbd does not answer" >&2; exit 1; }
if ! sacctmgr -n -P list cluster format=cluster | grep -qx chronicle; then
  sacctmgr -i add cluster chronicle >/dev/null
fi

if running slurmctld && [ "$changed" -eq 1 ]; then
  echo "slurm: configuration changed; restarting the daemons" >&2
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 50); do running slurmctld || running slurmd || break; sleep 0.2; done
fi
if ! running slurmctld; then
  echo "slurm: starting slurmctld" >&2
  setsid /usr/sbin/slurmctld </dev/null >/dev/null 2>&1
fi
if ! running slurmd; then
  echo "slurm: starting slurmd" >&2
  setsid /usr/sbin/slurmd </dev/null >/dev/null 2>&1
fi

# ------------------------------------------------------------------------------------- ready?
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -N -n "$host" -o '%T' 2>/dev/null || true)
  case "$state" in
    idle*|mixed*|allocated*) break ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle*|mixed*|allocated*) ;;
  *) echo "slurm: node $host is '${state:-not known}', not idle; see /var/log/slurm/" >&2; exit 1 ;;
esac
if ! timeout 60 srun -N1 -t 1 true; then
  echo "slurm: 'srun true' failed; see /var/log/slurm/" >&2
  exit 1
fi
echo "slurm: node $host $state, srun works" >&2
