#!/bin/bash
# A stand-in for a site's container image, which has no Slurm client commands: `no_slurm_task.sh LOG CMD…` runs CMD
# with a PATH that holds every command of this machine except Slurm's, and appends to LOG where it ran and whether
# scontrol could be found. The launch tests put a phase's tasks in it (cluster.container, runtime `command`) to show
# that the requeue decision and job submission happen outside the task.
set -euo pipefail
log=$1
shift
bin="${TMPDIR:-/tmp}/cz-no-slurm-bin-$(id -u)"
if [ ! -d "$bin" ]; then  # built once; ranks that start together race to the rename, the loser drops its copy
  tmp=$(mktemp -d "$bin.XXXXXX")
  IFS=: read -ra dirs <<< "$PATH"
  for d in "${dirs[@]}"; do
    for f in "$d"/*; do
      name=${f##*/}
      case "$name" in
        sbatch|srun|scontrol|squeue|sacct|scancel|salloc|sinfo|sacctmgr|sattach|sbcast|sdiag|sprio|sreport|sshare|\
        sstat|strigger|sview|sh5util|scrontab) continue ;;
      esac
      [ -e "$tmp/$name" ] || ln -s "$f" "$tmp/$name"
    done
  done
  mv -T "$tmp" "$bin" 2>/dev/null || rm -rf "$tmp"
fi
export PATH="$bin"
echo "$(hostname) job=${SLURM_JOB_ID:-} rank=${SLURM_PROCID:-} scontrol=$(command -v scontrol || echo none)" >> "$log"
exec "$@"
