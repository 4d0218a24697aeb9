#!/usr/bin/env bash
# Makes sure the host's 2 MiB huge page pool has at least PAGES free pages,
# growing vm.nr_hugepages by what is missing (root only). Domains with
# `hugepages = true` take their RAM from this pool.
#
# Usage: scripts/hugepage-pool.sh PAGES
set -euo pipefail
want=${1:?usage: scripts/hugepage-pool.sh PAGES}
pool=/sys/kernel/mm/hugepages/hugepages-2048kB
[ -d "$pool" ] || { echo "hugepage-pool: this kernel has no 2 MiB huge pages ($pool)" >&2; exit 1; }
available=$(( $(cat "$pool/free_hugepages") - $(cat "$pool/resv_hugepages") ))
[ "$available" -ge "$want" ] && exit 0
total=$(( $(cat "$pool/nr_hugepages") + want - available ))
if ! echo "$total" >"$pool/nr_hugepages" 2>/dev/null; then
    echo "hugepage-pool: $available free 2 MiB huge pages, $want needed; as root: sysctl -w vm.nr_hugepages=$total" >&2
    exit 1
fi
available=$(( $(cat "$pool/free_hugepages") - $(cat "$pool/resv_hugepages") ))
[ "$available" -ge "$want" ] || {
    echo "hugepage-pool: the kernel found only $available free 2 MiB huge pages of $want (memory too fragmented?)" >&2
    exit 1
}
echo "hugepage-pool: vm.nr_hugepages is now $(cat "$pool/nr_hugepages") ($available free)"
