# Shared helpers for the STP test-VM scripts. Sourced, not executed.
# shellcheck shell=bash

# Directory of these scripts and the repository root.
STP_VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
STP_REPO_ROOT="$(cd "$STP_VM_DIR/../.." && pwd -P)"

# Where kernels, debs and initramfs images are kept. Absolute, so the
# paths can be handed to the guest (which sees the host root at the same
# paths).
stp_vm_cache() {
    local c="${STP_VM_CACHE:-$STP_REPO_ROOT/target/vm/cache}"
    mkdir -p "$c" || die "cannot create the cache directory $c"
    (cd "$c" && pwd -P)
}

# The script's own name, for messages.
STP_VM_PROG="${STP_VM_PROG:-$(basename "$0")}"

say() { printf '%s: %s\n' "$STP_VM_PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$STP_VM_PROG" "$*" >&2
    exit "${STP_VM_DIE_STATUS:-1}"
}

# Serialise work on one cache (two runs at once must not unpack the same
# kernel twice). Holds the lock on fd 9 until the calling script exits.
stp_vm_lock() {
    local cache="$1"
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        say "waiting for another user of $cache"
        flock 9
    fi
}

# The kernel version recorded in the cache by fetch-kernel, or nothing.
stp_vm_cached_version() {
    local cache="$1" v=""
    if [[ -f "$cache/kernel-version" ]]; then
        read -r v <"$cache/kernel-version" || true
    fi
    if [[ -n "$v" && -f "$cache/kernel/$v/.stp-complete" ]]; then
        printf '%s\n' "$v"
    fi
}
