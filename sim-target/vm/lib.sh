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

# The Debian mirror the machine's own apt sources name for its own suite
# ($STP_VM_MIRROR when set), or nothing.
stp_vm_mirror() {
    local mirror="${STP_VM_MIRROR:-}" codename
    if [[ -z "$mirror" ]]; then
        codename="$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")"
        mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
            awk -v c="$codename" '$2 == c { print $1; exit }')"
    fi
    printf '%s\n' "$mirror"
}

# A private apt state for one Debian suite in DIR: its own sources list (one
# entry of TYPE, deb or deb-src, on the machine's own mirror), lists and
# archives; the machine's apt state is not touched. Sets the array
# STP_VM_APT to the apt-get/apt-cache options that use it, then updates its
# lists (output in DIR/update.log; when any list could not be fetched, the
# log is printed and the status is non-zero). Dies when no mirror can be told.
#   stp_vm_private_apt DIR SUITE TYPE
stp_vm_private_apt() {
    local st="$1" suite="$2" type="$3" mirror codename
    mirror="$(stp_vm_mirror)"
    codename="$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")"
    [[ -n "$mirror" ]] ||
        die "cannot tell which Debian mirror this machine uses (no '${codename:-?}' suite in its apt sources); set STP_VM_MIRROR"
    mkdir -p "$st/lists/partial" "$st/cache/archives/partial" || die "cannot create $st"
    printf '%s [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$type" "$mirror" "$suite" >"$st/sources.list"
    STP_VM_APT=(-o "Dir::Etc::SourceList=$st/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$st/lists" -o "Dir::Cache=$st/cache" -o APT::Sandbox::User=root)
    say "apt-get update ($type $suite, private state in $st)"
    # apt-get update exits 0 when a mirror cannot be reached (a warning):
    # a list it failed to fetch is a failure here.
    if ! apt-get "${STP_VM_APT[@]}" update -qq >"$st/update.log" 2>&1 ||
        grep -Eq '^[WE]: (Failed to fetch|Some index files failed)' "$st/update.log"; then
        cat "$st/update.log" >&2
        return 1
    fi
}

# The cmd_type values the io_uring_cmd engine of the fio binary FIO takes,
# one a line, as `fio --enghelp=io_uring_cmd,cmd_type` lists them (nothing
# when it has no such engine or option; fio 3.33 lists nvme).
stp_fio_cmd_types() {
    "$1" --enghelp=io_uring_cmd,cmd_type 2>/dev/null |
        awk '/^[[:space:]]*(valid values)?:[[:space:]]/ { sub(/^[^:]*:[[:space:]]*/, ""); print $1 }'
}
